"""The CUDA C++ backend (``backend="cuda"``): kernels in csrc/, the pybind11 module ``pnnh_kernels._C``.

The extension is built by ``pip install`` when nvcc is found, or later by
``python -m pnnh_kernels.cuda.build`` into a cache folder (``PNNH_CUDA_CACHE``, default
``~/.cache/pnnh_kernels/cuda``). :func:`unavailable_reason` says why the backend cannot run a call:
no extension, no GPU, a GPU older than sm_80, a CPU tensor, an unsupported dtype.

``backend="auto"`` does not pick this backend: it runs only where asked for by name until its GPU
tests have passed on a GPU and been recorded in docs/perf/ (see docs/kernels.md).
"""

from pnnh_kernels.cuda import backend as _backend  # noqa: F401  (registers the backend)
from pnnh_kernels.cuda.availability import (
    MINIMUM_CAPABILITY,
    SUPPORTED_DTYPES,
    cache_dir,
    extension,
    is_available,
    load_module_from,
    unavailable_reason,
    why_unavailable,
)

__all__ = [
    "MINIMUM_CAPABILITY",
    "SUPPORTED_DTYPES",
    "cache_dir",
    "extension",
    "is_available",
    "load_module_from",
    "unavailable_reason",
    "why_unavailable",
]
