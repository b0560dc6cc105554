"""Registers the CUDA backend (its launchers under the ``pnnh_cuda`` ops, and the backend table):
imported by ``import pnnh_kernels``. The ops need no GPU and no extension until they run."""

from __future__ import annotations

from pnnh_kernels.cuda import launch
from pnnh_kernels.cuda.availability import unavailable_reason
from pnnh_kernels.ops import register_fused_backend

# Where "auto" runs it is decided by measurements: pnnh_kernels.backends.auto.
register_fused_backend("cuda", "pnnh_cuda", launch, unavailable_reason)
