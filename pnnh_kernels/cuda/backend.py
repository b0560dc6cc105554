"""Registers the CUDA backend (its launchers under the ``pnnh_cuda`` ops, and the backend table):
imported by ``import pnnh_kernels``. The ops need no GPU and no extension until they run."""

from __future__ import annotations

from pnnh_kernels.cuda import launch
from pnnh_kernels.cuda.availability import unavailable_reason
from pnnh_kernels.ops import register_fused_backend

# Not picked by "auto" until its GPU tests have passed on a GPU (docs/kernels.md).
register_fused_backend("cuda", "pnnh_cuda", launch, unavailable_reason, auto_device_types=())
