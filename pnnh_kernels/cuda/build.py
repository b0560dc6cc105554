"""``python -m pnnh_kernels.cuda.build``: build the CUDA extension with the project's CMakeLists.txt
into a cache folder, and report each kernel's resources from ``ptxas -v`` (registers, shared memory,
stack frame, spills) per architecture and dtype.

For installs made without nvcc (the extension is then absent) and for CI, which has nvcc but no
GPU: the build compiles every kernel for every architecture with warnings as errors, and the report
shows whether any kernel spills.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from pnnh_kernels.cuda.availability import _built_module, cache_dir

DEFAULT_ARCHITECTURES = "80;90a"
# The dtype is a kernel's first template argument: followed by E, or by L for a second (the mode).
_DTYPES = {"If": "fp32", "I6__half": "fp16", "I13__nv_bfloat16": "bf16"}
# The kernels of csrc/ (pnnh_kernels._C.kernel_names() says the same at run time).
KERNELS = (
    "pnnh_conv_forward_kernel",
    "pnnh_coder_backward_kernel",
    "pnnh_conv_dgrad_kernel",
    "pnnh_conv_wgrad_kernel",
    "bn_finalize_forward_kernel",
    "bn_running_update_kernel",
    "bn_backward_reduce_kernel",
    "bn_finalize_backward_kernel",
    "wgrad_reduce_kernel",
)


@dataclass(frozen=True)
class KernelResources:
    kernel: str
    dtype: str
    arch: str
    registers: int
    shared_bytes: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int


def source_dir() -> Path:
    """The folder holding CMakeLists.txt, csrc/ and python/: the repository when running from a
    checkout or an editable install, else the copy every install carries."""
    repository = Path(__file__).resolve().parents[2]
    if (repository / "CMakeLists.txt").is_file() and (repository / "csrc").is_dir():
        return repository
    packaged = Path(__file__).resolve().parent / "sources"
    if (packaged / "CMakeLists.txt").is_file():
        return packaged
    raise FileNotFoundError(
        f"no CUDA sources: looked for {repository / 'CMakeLists.txt'} and {packaged / 'CMakeLists.txt'}"
    )


def missing_tools() -> list[str]:
    """What the build needs and this machine lacks."""
    missing = [tool for tool in ("cmake", "nvcc") if shutil.which(tool) is None]
    try:
        import pybind11  # noqa: F401
    except ImportError:
        missing.append("pybind11 (pip install pybind11)")
    return missing


def parse_ptxas(log: str) -> list[KernelResources]:
    """Per-kernel resources from ``-Xptxas -v`` output (one entry per kernel, dtype, architecture)."""
    entries = []
    current: Optional[dict] = None
    for line in log.splitlines():
        compiling = re.search(r"Compiling entry function '(\w+)' for '(sm_\w+)'", line)
        if compiling:
            mangled, arch = compiling.groups()
            name = next((k for k in KERNELS if f"{k}I" in mangled), mangled)
            dtype = next(
                (
                    label
                    for tag, label in _DTYPES.items()
                    if f"{tag}E" in mangled or f"{tag}L" in mangled
                ),
                "?",
            )
            current = {"kernel": name, "dtype": dtype, "arch": arch}
            continue
        if current is None:
            continue
        frame = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        )
        if frame:
            current["stack_bytes"], current["spill_store_bytes"], current["spill_load_bytes"] = map(
                int, frame.groups()
            )
            continue
        # A kernel without shared memory reports no "bytes smem" at all.
        used = re.search(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", line)
        if used:
            current["registers"], current["shared_bytes"] = int(used.group(1)), int(used.group(2) or 0)
            entries.append(KernelResources(**{"stack_bytes": 0, "spill_store_bytes": 0,
                                              "spill_load_bytes": 0, **current}))  # fmt: skip
            current = None
    return sorted(entries, key=lambda e: (e.kernel, e.arch, e.dtype))


def markdown_report(resources: list[KernelResources], architectures: str, nvcc: str) -> str:
    lines = [
        "# CUDA kernel resources (ptxas -v)",
        "",
        f"Architectures `{architectures}`; {nvcc}. Static shared memory per CTA (the limit without",
        "opt-in is 48 KiB); 128 threads per CTA, so 255 registers would still allow 4 CTAs per SM.",
        "",
        "| kernel | arch | dtype | registers | shared bytes | stack bytes | spill stores "
        "| spill loads |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.kernel} | {r.arch} | {r.dtype} | {r.registers} | {r.shared_bytes} | {r.stack_bytes} "
        f"| {r.spill_store_bytes} | {r.spill_load_bytes} |"
        for r in resources
    ]
    spilled = [r for r in resources if r.spill_store_bytes or r.spill_load_bytes]
    lines += ["", f"Kernels that spill: {len(spilled)} of {len(resources)}."]
    return "\n".join(lines) + "\n"


@dataclass
class BuildResult:
    module: Path
    resources: list[KernelResources]
    log: str


def build(
    out: Optional[Path] = None,
    architectures: str = DEFAULT_ARCHITECTURES,
    warnings_as_errors: bool = True,
    jobs: Optional[int] = None,
) -> BuildResult:
    """Configure and build from scratch (so that ptxas reports every kernel) into ``out``."""
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"cannot build the CUDA extension: missing {', '.join(missing)}")
    import pybind11

    out = Path(out) if out is not None else cache_dir()
    work = out / "cmake-build"
    configure = [
        "cmake", "-S", str(source_dir()), "-B", str(work), "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_CUDA_ARCHITECTURES={architectures}",
        f"-DPNNH_WARNINGS_AS_ERRORS={'ON' if warnings_as_errors else 'OFF'}",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}",
        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out.resolve()}",
    ]  # fmt: skip
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    steps = [configure, ["cmake", "--build", str(work), "--clean-first"]]
    if jobs:
        steps[1] += ["--parallel", str(jobs)]
    log = []
    for command in steps:
        completed = subprocess.run(command, capture_output=True, text=True)
        log.append(completed.stdout + completed.stderr)
        if completed.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:3])} failed:\n{''.join(log)[-6000:]}")
    module = _built_module(out)
    if module is None:
        raise RuntimeError(f"the build succeeded but left no _C module in {out}")
    text = "".join(log)
    return BuildResult(module, parse_ptxas(text), text)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pnnh_kernels.cuda.build", description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help=f"default: {cache_dir()}")
    parser.add_argument("--arch", default=DEFAULT_ARCHITECTURES, help="CMAKE_CUDA_ARCHITECTURES")
    parser.add_argument("--report", type=Path, default=None, help="write the resource table here (.md)")
    parser.add_argument("--no-werror", action="store_true", help="do not treat warnings as errors")
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    result = build(args.out, args.arch, not args.no_werror, args.jobs)
    nvcc = (
        subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    )
    release = next((line for line in nvcc if "release" in line), "nvcc")
    report = markdown_report(result.resources, args.arch, release.strip())
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(report)
        args.report.with_suffix(".json").write_text(
            json.dumps([asdict(r) for r in result.resources], indent=1) + "\n"
        )
    print(report)
    print(f"built {result.module}")


if __name__ == "__main__":
    main()
