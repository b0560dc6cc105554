"""Where the CUDA backend's extension comes from and whether a call can run on it: the installed
``pnnh_kernels._C``, else one built into :func:`cache_dir` by ``python -m pnnh_kernels.cuda.build``;
:func:`unavailable_reason` says why not (no extension, no GPU, a GPU older than sm_80, a CPU tensor,
an unsupported dtype)."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MINIMUM_CAPABILITY = (8, 0)  # mma.sync m16n8k16 for bf16 and cp.async

_extension: Optional[ModuleType] = None
_load_error: Optional[str] = None


def cache_dir() -> Path:
    """Where ``python -m pnnh_kernels.cuda.build`` builds, one folder per Python version."""
    root = os.environ.get("PNNH_CUDA_CACHE") or Path.home() / ".cache" / "pnnh_kernels" / "cuda"
    return Path(root) / f"py{sys.version_info.major}{sys.version_info.minor}"


def _built_module(folder: Path) -> Optional[Path]:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = folder / f"_C{suffix}"
        if candidate.is_file():
            return candidate
    return None


def load_module_from(path: Path) -> ModuleType:
    """Import a built ``_C`` from ``path`` as ``pnnh_kernels._C``."""
    spec = importlib.util.spec_from_file_location("pnnh_kernels._C", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the CUDA extension from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["pnnh_kernels._C"] = module
    return module


def extension() -> Optional[ModuleType]:
    """The extension module: the installed one, else the one in :func:`cache_dir`; None if neither."""
    global _extension, _load_error
    if _extension is not None or _load_error is not None:
        return _extension
    try:
        _extension = importlib.import_module("pnnh_kernels._C")
    except ImportError as installed_error:
        built = _built_module(cache_dir())
        if built is None:
            _load_error = (
                f"the extension pnnh_kernels._C is not built ({installed_error}; nothing in "
                f"{cache_dir()}): build it with `python -m pnnh_kernels.cuda.build` on a machine "
                "with nvcc"
            )
        else:
            try:
                _extension = load_module_from(built)
            except ImportError as error:
                _load_error = f"the built extension {built} does not load: {error}"
    if _extension is not None and not hasattr(_extension, "tile_sizes"):
        # Built from older sources: the launchers would fail mid-backward on the missing function.
        _load_error = (
            f"the extension {getattr(_extension, '__file__', 'pnnh_kernels._C')} was built from "
            "older sources (it has no tile_sizes()): rebuild it with `python -m pnnh_kernels.cuda.build`"
        )
        _extension = None
    return _extension


def unavailable_reason(device: torch.device, dtype: torch.dtype, op: str) -> Optional[str]:
    if op not in ("conv2d", "linear"):
        return f"no CUDA kernel for {op}"
    if dtype not in SUPPORTED_DTYPES:
        return f"supported dtypes are float32, float16 and bfloat16, got {dtype}"
    if device.type == "meta":
        # Shape inference, as nn.Conv2d allows: the ops' fake implementations give the outputs
        # (under pnnh_kernels.ledger.recording() the launchers declare their launches instead).
        return None
    if device.type != "cuda":
        return f"the CUDA kernels run on CUDA tensors, not on {device.type}"
    if extension() is None:
        return _load_error
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    capability = torch.cuda.get_device_capability(device)
    if capability < MINIMUM_CAPABILITY:
        return (
            f"the kernels need compute capability 8.0 or newer (mma.sync bf16, cp.async); "
            f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}"
        )
    return None


def is_available() -> bool:
    """Whether the CUDA backend can run here (on the current CUDA device)."""
    return why_unavailable() is None


def why_unavailable() -> Optional[str]:
    """None when :func:`is_available`, else the reason."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    if device is None:
        if extension() is None:
            return _load_error
        return "torch.cuda.is_available() is False: no CUDA device"
    return unavailable_reason(device, torch.float32, "conv2d")
