"""The implementations compared in the layer benchmarks, built the same way for every shape."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pnnh_kernels import BackendUnavailableError, FusedPNNHConv, PNNHCoder
from pnnh_kernels.backends import resolve_backend
from pnnh_kernels.benchmarking.baselines import ResNetBasicBlock, ResNetLayer

__all__ = ["ResNetBasicBlock", "ResNetLayer", "backend_of", "build", "pnnh_layer", "unavailable"]


PNNH_BACKENDS = ("torch", "torch-compile", "triton", "cuda")


def pnnh_layer(channels: int, backend: str, coder: Optional[PNNHCoder] = None) -> FusedPNNHConv:
    return FusedPNNHConv(
        channels,
        channels,
        bias=False,
        norm="batch",
        coder=coder,
        # the default coder (rectified_isometry, fixed): what users train
        backend="torch" if backend == "torch-compile" else backend,
    )


def backend_of(name: str) -> Optional[str]:
    """The PNNH backend an implementation name uses ("pnnh-block-triton" -> "triton"), or None."""
    for prefix in ("pnnh-block-", "pnnh-"):
        if name.startswith(prefix):
            return name.removeprefix(prefix)
    return None


def unavailable(backend: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``backend`` cannot be benchmarked here, or None."""
    if backend == "torch-compile":
        if device.type != "cuda":
            return "torch.compile is benchmarked on GPUs only (on a CPU each shape compiles ~40 s)"
        return None
    try:
        resolve_backend(backend, device, dtype, "conv2d")
    except BackendUnavailableError as error:
        return str(error)
    return None


def build(name: str, channels: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``name``: "resnet-layer", "resnet-block", "pnnh-<backend>" or "pnnh-block-<backend>".

    BatchNorm is in eval mode everywhere (the fused backends fold it into their kernels). Every
    backend also computes training-mode BatchNorm itself; bench/time_pnnh_conv.py's train-BN rows
    time that path.
    """
    if name == "resnet-layer":
        module: nn.Module = ResNetLayer(channels)
    elif name == "resnet-block":
        module = ResNetBasicBlock(channels)
    elif name.startswith("pnnh-block-"):
        backend = name.removeprefix("pnnh-block-")
        coder = PNNHCoder(channels, channels // 2)  # the default: fixed rectified isometry
        module = nn.Sequential(
            pnnh_layer(channels, backend, coder), pnnh_layer(channels, backend, coder)
        )
    else:
        backend = name.removeprefix("pnnh-")
        module = pnnh_layer(channels, backend)
    module = module.to(device, dtype, memory_format=torch.channels_last).eval()
    if name.endswith("torch-compile"):
        module = torch.compile(module)
    return module
