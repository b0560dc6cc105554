"""What ``backend="auto"`` runs: the backend measured fastest on the device's family, and why.

A fused backend is promoted here only by a GPU measurement committed to docs/perf in which it beat
the other backends on that card family, with its GPU tests passed there; until then "auto" runs the
PyTorch reference backend, which is never slower than what has been measured. The rule and its
evidence are one row, so that ``FusedPNNHConv.backend_reason`` can say why a layer runs where it
does. Where the chosen backend cannot run a call (a dtype it does not support, say), "auto" runs the
torch backend and says so.

To promote a backend: measure it with ``bash bench/device_check.sh`` on the card, commit the
tables to docs/perf, and add or change the card family's row, citing the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class AutoRule:
    """The backend "auto" runs on one device family and the measurement behind it."""

    backend: str
    evidence: str


# By (device type, compute capability or None). Every row names the file of its measurement.
MEASURED_FASTEST: dict[tuple[str, Optional[tuple[int, int]]], AutoRule] = {
    ("cpu", None): AutoRule(
        "torch",
        "on a CPU the fused kernels run only for checking (the Triton interpreter, the CUDA "
        "emulation), far slower than PyTorch",
    ),
    ("cuda", (9, 0)): AutoRule(
        "torch",
        "measured on an H200 (docs/perf/pnnh_conv_nvidia-h200_2026-11-28*.md): the torch backend's "
        "layer step beat the Triton and CUDA backends' at every CIFAR stage shape (1.8-2.9x cuDNN's "
        "against 4.1-7.4x), and neither fused backend has passed its GPU tests since their rewrite",
    ),
}

UNMEASURED = AutoRule(
    "torch",
    "no fused backend has been measured faster than the torch backend on this device family (a "
    "backend is promoted only by a GPU measurement in docs/perf; pnnh_kernels.backends.auto)",
)


def device_family(device: torch.device) -> tuple[str, Optional[tuple[int, int]]]:
    """(device type, compute capability) of a CUDA device, (device type, None) otherwise."""
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return ("cuda", (major, minor))
    return (device.type, None)


def auto_rule(device: torch.device) -> AutoRule:
    """The rule "auto" follows on ``device``."""
    return MEASURED_FASTEST.get(device_family(device), UNMEASURED)
