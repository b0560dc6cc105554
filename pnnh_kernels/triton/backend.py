"""Registers the Triton backend (its launchers under the ``pnnh`` ops, and the backend table) when
Triton is installed: imported by ``import pnnh_kernels``."""

from __future__ import annotations

from pnnh_kernels.ops import register_fused_backend
from pnnh_kernels.triton import pnnh_conv as launchers
from pnnh_kernels.triton.availability import unavailable_reason

# Where "auto" runs it is decided by measurements: pnnh_kernels.backends.auto.
register_fused_backend("triton", "pnnh", launchers, unavailable_reason)
