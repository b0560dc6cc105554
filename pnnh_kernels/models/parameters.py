"""Parameter counting that counts a shared coder once."""

from __future__ import annotations

from torch import nn

from pnnh_kernels.coder import PNNHCoder


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements, each distinct tensor counted once.

    A coder shared by many layers appears once: its tensors are deduplicated by identity, as
    ``nn.Module.parameters()`` does.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Parameters split into ``coder`` (shared coders counted once) and ``other``, their ``total``,
    and the ``trainable`` ones (requiring gradients; the default coders are fixed)."""
    coder_ids = {
        id(p) for module in model.modules() if isinstance(module, PNNHCoder) for p in module.parameters()
    }
    coder = other = 0
    for p in model.parameters():
        if id(p) in coder_ids:
            coder += p.numel()
        else:
            other += p.numel()
    trainable = count_parameters(model, trainable_only=True)
    return {"coder": coder, "other": other, "total": coder + other, "trainable": trainable}
