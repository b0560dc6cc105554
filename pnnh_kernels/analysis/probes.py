"""Probes of how much of the input a network's layers keep: ReLU survival, representation
similarity, and a linear (ridge) reconstruction of the input from a layer's features."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from pnnh_kernels.coder import PNNHCoder
from pnnh_kernels.pnnh_conv import FusedPNNHConv
from pnnh_kernels.pnnh_linear import FusedPNNHLinear


def survival_fraction(activations: Tensor) -> float:
    """Fraction of post-activation values that are > 0, i.e. of pre-activations that survived.

    ReLU: the others are zeroed, lost. GELU (``x * Phi(x)``, a ViT's MLP): its output is > 0 exactly
    where its input is, so this is the fraction of units in the passing regime (gain Phi(x) >= 1/2);
    the others are not zeroed but squashed into [-0.17, 0): attenuated, mostly rather than wholly
    lost (GELU is one-to-one above x = -0.75). A GELU's survival is therefore an upper bound on what
    it loses, not a count of it."""
    return float((activations > 0).float().mean())


def mean_cosine_similarity(features: Tensor) -> float:
    """Mean cosine similarity between the representations of different samples (rows).

    Near 1: every input maps to (almost) the same direction, the input is no longer recoverable.
    """
    flat = features.reshape(features.shape[0], -1).double()
    normed = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    gram = normed @ normed.t()
    n = gram.shape[0]
    if n < 2:
        raise ValueError(f"features: need at least 2 samples, got {n}")
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


def ridge_r2(
    features: Tensor, inputs: Tensor, ridge: float = 1e-3, train_fraction: float = 0.7
) -> float:
    """R^2 on held-out samples of a ridge regression that reconstructs ``inputs`` from ``features``.

    1: the layer still holds the input linearly; 0: no better than predicting the mean input. The
    ridge strength is relative to the features' mean squared value, so it is scale-free.
    """
    x = features.reshape(features.shape[0], -1).double()
    y = inputs.reshape(inputs.shape[0], -1).double()
    split = int(train_fraction * x.shape[0])
    if split < 2 or x.shape[0] - split < 2:
        raise ValueError(f"features: need at least 7 samples for the train/test split, got {x.shape[0]}")
    x_train, x_test, y_train, y_test = x[:split], x[split:], y[:split], y[split:]
    x_mean, y_mean = x_train.mean(0), y_train.mean(0)
    xc, yc = x_train - x_mean, y_train - y_mean
    scale = xc.square().mean().clamp_min(1e-30)
    if x.shape[1] <= split:  # primal: (F^T F + lambda I)^-1 F^T Y
        gram = xc.t() @ xc + ridge * scale * split * torch.eye(x.shape[1], dtype=x.dtype)
        weights = torch.linalg.solve(gram, xc.t() @ yc)
    else:  # dual, cheaper when features outnumber samples
        gram = xc @ xc.t() + ridge * scale * split * torch.eye(split, dtype=x.dtype)
        weights = xc.t() @ torch.linalg.solve(gram, yc)
    prediction = (x_test - x_mean) @ weights + y_mean
    residual = (y_test - prediction).square().sum()
    total = (y_test - y_test.mean(0)).square().sum().clamp_min(1e-30)
    return float(1 - residual / total)


def coder_gain(coder: PNNHCoder) -> float:
    """Largest singular value of the coder path's linear part, ``W_D W_E`` (``W_E^T W_E`` when tied).

    It is the path's gain on inputs whose code units are all active (on non-negative inputs, for the
    default rectified-isometry coder, all of them are). The coder path reaches the layer's output
    without a norm, so over L layers that share a coder its gain compounds as ``gain ** L``: 1.05 at
    depth 64 is a factor of 23, which is how the pretrained shared coder (gain 1.08-1.19) diverged.
    """
    with torch.no_grad():
        path = coder.decoder().double() @ coder.encoder_weight.double()
        return float(torch.linalg.matrix_norm(path, 2))


@dataclass(frozen=True)
class ReluSiteStats:
    index: int  # order of the call in the forward pass
    site: str  # module name (a module reused k times appears k times)
    survival: float
    cosine_similarity: float
    ridge_r2: Optional[float]
    coder_gain: Optional[float] = None  # coder_gain() of a fused PNNH layer's coder, else None
    nonlinearity: str = "relu"  # "relu" or "gelu" (see survival_fraction for what survival means)

    def as_dict(self) -> dict:
        return asdict(self)


def _is_relu_site(module: nn.Module) -> bool:
    if isinstance(module, (nn.ReLU, nn.GELU)):
        return True
    return isinstance(module, (FusedPNNHConv, FusedPNNHLinear)) and module.activation == "relu"


@torch.no_grad()
def dissipation_report(
    model: nn.Module, batch: Tensor, probe_inputs: bool = False, max_features: int = 4096
) -> list[ReluSiteStats]:
    """Per ReLU call of ``model`` on ``batch``: survival, cosine similarity between samples,
    with ``probe_inputs`` the ridge R^2 of reconstructing ``batch`` from that layer's output and, for
    a fused PNNH layer with a coder, the coder path's gain (:func:`coder_gain`; a product of gains
    above 1 over the layers is a net heading for divergence, visible before training).

    Works on any nn.Module: it hooks every nn.ReLU and nn.GELU module (torchvision's ResNets and
    the ViTs of pnnh_kernels.models.vit included; see survival_fraction for a GELU's survival) and the
    fused PNNH layers whose activation is a ReLU. ReLUs called as functions (torch.relu) are not
    seen. Features larger than ``max_features`` per sample are average-pooled spatially for the
    probe (the survival and similarity use all of them).
    """
    names = {module: name for name, module in model.named_modules()}
    records: list[tuple[str, Tensor, Optional[float], str]] = []
    gains: dict[int, float] = {}  # per coder: a shared coder is measured once

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        coder = getattr(module, "coder", None)
        gain = None
        if isinstance(coder, PNNHCoder):
            if id(coder) not in gains:
                gains[id(coder)] = coder_gain(coder)
            gain = gains[id(coder)]
        name = names.get(module, type(module).__name__)
        kind = "gelu" if isinstance(module, nn.GELU) else "relu"
        records.append((name, output.detach().float().cpu(), gain, kind))

    handles = [m.register_forward_hook(hook) for m in model.modules() if _is_relu_site(m)]
    was_training = model.training
    try:
        model.eval()
        model(batch)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    stats = []
    for index, (site, output, gain, kind) in enumerate(records):
        r2 = None
        if probe_inputs:
            features = output
            while features.dim() == 4 and features[0].numel() > max_features and features.shape[-1] > 1:
                features = nn.functional.avg_pool2d(features, 2, ceil_mode=True)
            r2 = ridge_r2(features, batch.detach().float().cpu())
        stats.append(
            ReluSiteStats(
                index,
                site,
                survival_fraction(output),
                mean_cosine_similarity(output),
                r2,
                gain,
                kind,
            )
        )
    return stats
