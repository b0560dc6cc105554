"""Whether the Triton backend can run a call: Triton installed, a CUDA tensor or the CPU
interpreter (``TRITON_INTERPRET=1``), a supported dtype and op (:func:`unavailable_reason`)."""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Looked up once at import: torch.compile (Dynamo, torch 2.11) refuses to trace importlib's find_spec,
# and the answer cannot change within a process.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


# Read once, as Triton reads it when the kernels are defined (at import): a later change of the
# variable would not switch the kernels between interpreted and compiled. The launchers consult it
# on every call, where an environment lookup cost ~3 µs each (17 a training step).
_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRETER


def unavailable_reason(device: torch.device, dtype: torch.dtype, op: str) -> Optional[str]:
    if not triton_installed():
        return "triton is not installed (pip install 'pnnh-kernels[triton]')"
    if op not in ("conv2d", "linear"):
        return f"no Triton kernel for {op}"
    if dtype not in SUPPORTED_DTYPES:
        return f"supported dtypes are float32, float16 and bfloat16, got {dtype}"
    if device.type == "meta":
        # Shape inference, as nn.Conv2d allows: the ops' fake implementations give the outputs
        # (under pnnh_kernels.ledger.recording() the launchers declare their launches instead).
        return None
    if device.type == "cpu":
        if not interpreter_enabled():
            return "CPU tensors run Triton kernels only in its interpreter: set TRITON_INTERPRET=1"
    elif device.type != "cuda":
        return f"Triton kernels run on CUDA devices (or the CPU interpreter), not on {device.type}"
    return None
