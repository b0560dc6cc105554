"""Registers the CUDA backend (its launchers under the ``pnnh_cuda`` ops, and the backend table):
imported by ``import pnnh_kernels``. The ops need no GPU and no extension until they run."""

from __future__ import annotations

import functools

from pnnh_kernels.backends import Backend, register_backend
from pnnh_kernels.cuda import launch
from pnnh_kernels.cuda.availability import unavailable_reason
from pnnh_kernels.ops import pnnh_conv, pnnh_linear

pnnh_conv.register_kernels("pnnh_cuda", launch)
register_backend(
    Backend(
        "cuda",
        functools.partial(pnnh_conv.conv2d, "pnnh_cuda"),
        functools.partial(pnnh_linear.linear, "pnnh_cuda"),
        unavailable_reason,
        # Not picked by "auto" until its GPU tests have passed on a GPU (docs/kernels.md).
        auto_device_types=(),
    )
)
