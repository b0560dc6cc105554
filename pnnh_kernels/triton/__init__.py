"""Fused Triton kernels for the PNNH layer (``backend="triton"``).

Triton is optional: this package imports without it, and :func:`unavailable_reason` says why the
backend cannot run a call (Triton missing, a CPU tensor without ``TRITON_INTERPRET=1``, an
unsupported dtype or op).
"""

from pnnh_kernels.triton.availability import (
    SUPPORTED_DTYPES,
    interpreter_enabled,
    triton_installed,
    unavailable_reason,
)

if triton_installed():
    from pnnh_kernels.triton import backend as _backend  # noqa: F401  (registers the backend)

__all__ = ["SUPPORTED_DTYPES", "interpreter_enabled", "triton_installed", "unavailable_reason"]
