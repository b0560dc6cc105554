"""NVTX ranges around the PNNH ops, for Nsight Systems and Nsight Compute.

Off unless ``PNNH_NVTX=1`` (or :func:`enable_nvtx`): then every call of a PNNH op pushes a range
named after the op, the backend that runs it and the shapes, e.g.
``pnnh_conv2d[triton] 256x64x32x32 -> 64 k3 s1``. Off, a range costs one boolean test. Ranges are
for eager profiling; ``pnnh profile`` turns them on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

_nvtx_enabled = os.environ.get("PNNH_NVTX", "0") == "1"


def enable_nvtx(enabled: bool = True) -> None:
    global _nvtx_enabled
    _nvtx_enabled = enabled


def nvtx_enabled() -> bool:
    return _nvtx_enabled


@contextlib.contextmanager
def op_range(name: str) -> Iterator[None]:
    if not (_nvtx_enabled and torch.cuda.is_available()):
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
