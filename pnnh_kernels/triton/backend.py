"""Registers the Triton backend (its launchers under the ``pnnh`` ops, and the backend table) when
Triton is installed: imported by ``import pnnh_kernels``."""

from __future__ import annotations

import functools

from pnnh_kernels.backends import Backend, register_backend
from pnnh_kernels.ops import pnnh_conv, pnnh_linear
from pnnh_kernels.triton import pnnh_conv as launchers
from pnnh_kernels.triton.availability import unavailable_reason

pnnh_conv.register_kernels("pnnh", launchers)
register_backend(
    Backend(
        "triton",
        functools.partial(pnnh_conv.conv2d, "pnnh"),
        functools.partial(pnnh_linear.linear, "pnnh"),
        unavailable_reason,
        # The CPU interpreter runs them, far slower than PyTorch there: "auto" picks Triton on GPUs.
        auto_device_types=("cuda",),
    )
)
