"""The torch.library ops of the fused backends, one module per op stem (pnnh_conv, pnnh_linear):
each holds its ops, their fakes and their autograd; backends supply the launchers."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Optional

import torch

from pnnh_kernels.backends import Backend, register_backend
from pnnh_kernels.ops import pnnh_conv, pnnh_linear


def register_fused_backend(
    name: str,
    library: str,
    launchers: pnnh_conv.FusedKernels,
    unavailable_reason: Callable[[torch.device, torch.dtype, str], Optional[str]],
) -> None:
    """Make ``launchers`` the implementations of ``library``'s ops and register the backend
    ``name`` over them (what each fused backend's package does on import)."""
    pnnh_conv.register_kernels(library, launchers)
    register_backend(
        Backend(
            name,
            functools.partial(pnnh_conv.conv2d, library),
            functools.partial(pnnh_linear.linear, library),
            unavailable_reason,
        )
    )
