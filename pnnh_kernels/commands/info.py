"""``pnnh info``: the environment and, for every backend, whether it can run here and why not, and
what ``backend="auto"`` runs and why (as ``python -m xformers.info`` does for xformers).

Quick: nothing is compiled or launched; the CUDA extension is only looked up.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
from typing import Optional

import torch

from pnnh_kernels.version import version_string

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bfloat16",
        help="the dtype whose availability is asked for",
    )


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    return devices


def _device_line(device: torch.device) -> str:
    if device.type != "cuda":
        return f"{device}: {platform.processor() or platform.machine()}"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{device}: {torch.cuda.get_device_name(device)} (sm_{major}{minor})"


def _extension_line() -> str:
    from pnnh_kernels.cuda import availability

    module = availability.extension()
    if module is not None:
        return f"CUDA extension: loaded from {getattr(module, '__file__', '?')}"
    return (
        "CUDA extension: not built (it builds at install where nvcc and CMake are present; "
        "build it later with `python -m pnnh_kernels.cuda.build`)"
    )


def report(dtype: torch.dtype) -> str:
    """The lines ``pnnh info`` prints."""
    from pnnh_kernels.backends import (
        BACKEND_NAMES,
        INSTALL_HINTS,
        BackendUnavailableError,
        backend_reason,
        registered_backends,
        resolve_backend,
        why_unavailable,
    )

    lines = [
        version_string(),
        f"python {sys.version.split()[0]} ({platform.platform()})",
        f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, triton {_version('triton')}",
        _extension_line(),
        "",
        "devices:",
        *(f"  {_device_line(device)}" for device in _devices()),
        "",
        f"backends, for {dtype} conv2d:",
    ]
    registered = registered_backends()
    for device in _devices():
        lines.append(f"  on {device}:")
        for name in BACKEND_NAMES:
            reason: Optional[str] = (
                why_unavailable(name, device, dtype, "conv2d")
                if name in registered
                else f"not registered in this installation ({INSTALL_HINTS.get(name, 'reinstall')})"
            )
            lines.append(f"    {name:7s} {'available' if reason is None else 'unavailable: ' + reason}")
        try:
            resolve_backend("auto", device, dtype, "conv2d")
            lines.append(f"    {backend_reason('auto', device, dtype, 'conv2d')}")
        except BackendUnavailableError as error:
            lines.append(f"    auto: {error}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    print(report(DTYPES[args.dtype]))
