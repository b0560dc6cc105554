"""Build the CPU emulation of the CUDA kernels: the csrc/ sources compiled by the host C++ compiler
with -DPNNH_EMULATE (csrc/cuda_emulation.h maps threads, shared memory, __syncthreads, cp.async and
mma.sync onto host threads), as the module ``_C_emu`` with the same interface as ``_C``.

It lets a machine without a GPU run the kernels' own code against the float64 reference (see
tests/test_cuda_emulated.py). What it cannot show: races and missing waits (its copies are
synchronous), and anything about speed.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

from pnnh_kernels.cuda.build import source_dir

KERNEL_SOURCES = ("pnnh_forward.cu", "pnnh_backward.cu", "pnnh_batch_norm.cu")


def cuda_home() -> Path:
    return Path(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda")


def missing_tools() -> list[str]:
    missing = []
    if shutil.which("g++") is None:
        missing.append("g++")
    if not (cuda_home() / "include" / "cuda_fp16.h").is_file():
        missing.append(f"the CUDA headers ({cuda_home() / 'include'}; set CUDA_HOME)")
    if not (cuda_home() / "lib64" / "libcudart_static.a").is_file():
        missing.append(f"libcudart_static.a in {cuda_home() / 'lib64'}")
    try:
        import pybind11  # noqa: F401
    except ImportError:
        missing.append("pybind11")
    return missing


def build_emulator(out: Path) -> Path:
    """Compile ``_C_emu`` into ``out`` and return its path."""
    import pybind11

    missing = missing_tools()
    if missing:
        raise RuntimeError(f"cannot build the CUDA emulation: missing {', '.join(missing)}")
    source = source_dir()
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"_C_emu{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    command = [
        "g++", "-O2", "-std=c++20", "-fno-strict-aliasing", "-shared", "-fPIC", "-pthread",
        "-DPNNH_EMULATE", "-DPNNH_MODULE_NAME=_C_emu", '-DPNNH_CUDA_ARCHITECTURES="emulated"',
        "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
        "-x", "c++", *(str(source / "csrc" / name) for name in KERNEL_SOURCES),
        str(source / "python" / "bindings.cpp"),
        f"-I{source / 'csrc'}", f"-I{cuda_home() / 'include'}", f"-I{pybind11.get_include()}",
        f"-I{sysconfig.get_paths()['include']}",
        f"-L{cuda_home() / 'lib64'}", "-lcudart_static", "-ldl", "-lrt",
        "-o", str(target),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"building the CUDA emulation failed:\n{completed.stderr[-6000:]}")
    return target


def build_key() -> str:
    """A digest of what a build reads: the kernel sources, the bindings, this file (it holds the
    compiler flags), the Python version, pybind11, the compiler and the CUDA headers' folder."""
    import pybind11

    source = source_dir()
    digest = hashlib.sha256()
    inputs = [*sorted((source / "csrc").iterdir()), source / "python" / "bindings.cpp", Path(__file__)]
    for path in inputs:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for fact in (sys.version, pybind11.__version__, shutil.which("g++") or "", str(cuda_home())):
        digest.update(fact.encode())
    return digest.hexdigest()[:16]


def cached_emulator(cache: Path) -> Path:
    """The path of ``_C_emu`` built from the current sources, built into ``cache`` only when no
    build with the same :func:`build_key` is there (a build takes about 35 s on 2 cores). Builds
    of older sources in ``cache`` are removed."""
    key = build_key()
    folder = cache / key
    target = folder / f"_C_emu{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="building-") as staging:
        built = build_emulator(Path(staging))
        folder.mkdir(exist_ok=True)
        # A rename, so that an interrupted build never leaves a half-written module under the key.
        os.replace(built, target)
    for other in cache.iterdir():
        if other.is_dir() and other.name != key and not other.name.startswith("building-"):
            shutil.rmtree(other, ignore_errors=True)
    return target


def load_emulator(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader("_C_emu", str(path))
    spec = importlib.util.spec_from_file_location("_C_emu", path, loader=loader)
    if spec is None:
        raise ImportError(f"cannot load the CUDA emulation from {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules.setdefault("_C_emu", module)
    return module
