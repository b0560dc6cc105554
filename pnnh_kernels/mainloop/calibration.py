"""The static model against the one hardware measurement of these kernels: Nsight Compute on an H200.

``docs/perf/ncu_2026-11-28/`` holds Nsight Compute's per-kernel times and DRAM bytes of one training
step (batch 256, bf16, training BatchNorm; caches flushed per kernel, clocks not locked) at the four
CIFAR stage shapes, measured with the kernels of commit 994ebd4. This module takes those kernels'
sources from git, compiles them for sm_90 here (Triton's with this machine's Triton, ``triton.compile``
as the ahead-of-time report does; the CUDA ones with nvcc), reads each mainloop's SASS
(pnnh_kernels.mainloop.sass) and prints the model's time beside the measured one at every point:

    python -m pnnh_kernels.mainloop.calibration [--fit]

Which compile each measured kernel is: its launch order in the step, its grid and its block size
(the autotuner's choice is read from them; where two candidates give the same grid and warps the
shape's default is taken, and the row says so). The constants (pnnh_kernels.mainloop.model) are fitted
on the Triton mainloops: the forward convolution, the input gradient and the three weight gradients
at the four shapes (20 points); ``--fit`` refits them and also prints each shape's points predicted
from a fit on the other three. Shown but outside the fit, with the reason in the row: the Triton
apply pass (BatchNorm + coder + ReLU over z, no convolution: its time is in work outside its small
encoder loop, which the model counts once), and every CUDA kernel (mma.sync mainloops whose loads
are synchronous LDG -> STS -> barrier chains; the model has no term for that exposed latency and
under-predicts them by 26-92%). Not shown: the coder backward kernels (two MMA loops of different
trip counts in one kernel) and the CUDA apply pass (the forward's kernel with run-time flags that
skip the convolution loop the SASS shows). Caveat: the H200 ran Triton 3.6's compiles, this model
reads Triton 3.9's.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gzip
import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pnnh_kernels.mainloop import sass
from pnnh_kernels.mainloop.model import (
    CALIBRATED,
    CARDS,
    LATENCY_READING,
    Constants,
    LaunchShape,
    ModelledTime,
    Terms,
    terms,
)

COMMIT = "994ebd407153d125c3c8467ff18736bb90bc6293"
REPOSITORY = Path(__file__).resolve().parents[2]
MEASUREMENTS = REPOSITORY / "docs" / "perf" / "ncu_2026-11-28"
CARD = "H200"
BATCH = 256
STAGES = ((64, 32), (128, 16), (256, 8), (512, 4))  # channels, image size
# The project's kernels of one training step at 994ebd4, in launch order (the rest are PyTorch's).
ROLES = (
    "forward statistics", "forward apply", "coder backward", "wgrad encoder", "wgrad decoder",
    "dgrad", "wgrad learner",
)  # fmt: skip
_NOT_SHOWN = {
    "triton": {"coder backward"},
    "cuda": {"coder backward", "forward apply"},
}


def outside_fit(point: Measured) -> str:
    """Why a shown point is outside the fit ("" where it is in it)."""
    if point.backend == "cuda":
        return "not fitted: mma.sync fed by 2-byte synchronous loads"
    if point.role == "forward apply":
        return "not fitted: no convolution; work outside its loop"
    return ""


@dataclass(frozen=True)
class Measured:
    backend: str
    role: str
    channels: int
    size: int
    grid: tuple[int, ...]
    threads: int
    seconds: float
    dram_bytes: float

    @property
    def ctas(self) -> int:
        return math.prod(self.grid)


_UNITS = {"gpu__time_duration.sum": {"ns": 1e-9, "us": 1e-6}, "dram__bytes_read.sum": {"byte": 1},
          "dram__bytes_write.sum": {"byte": 1}}  # fmt: skip


def _kernel_rows(path: Path) -> list[dict]:
    """Nsight Compute's CSV as one dict per launch, in launch order: name, grid, block and the
    metrics of :data:`_UNITS` in seconds and bytes."""
    with gzip.open(path, "rt") as handle:
        lines = [line for line in handle if line.startswith('"')]
    rows = list(csv.DictReader(io.StringIO("".join(lines))))
    kernels: dict[str, dict] = {}
    for row in rows:
        entry = kernels.setdefault(row["ID"], {"name": row["Kernel Name"], "grid": row["Grid Size"],
                                              "block": row["Block Size"]})  # fmt: skip
        name, unit = row["Metric Name"], row["Metric Unit"]
        if name in _UNITS:
            if unit not in _UNITS[name]:
                raise ValueError(f"{path}: {name} in {unit!r}, expected one of {list(_UNITS[name])}")
            entry[name] = float(row["Metric Value"].replace(",", "")) * _UNITS[name][unit]
    return list(kernels.values())


def _staged_kernels(path: Path) -> Iterator[tuple[int, dict]]:
    """(stage, launch) of each launch in ``path`` but the stage markers: one step per stage shape,
    each after a marker kernel (``spin_kernel``); stage -1 before the first marker."""
    stage = -1
    for entry in _kernel_rows(path):
        if "spin_kernel" in entry["name"]:
            stage += 1
        else:
            yield stage, entry


def measured(backend: str) -> list[Measured]:
    """The project's kernels in ``ncu_<backend>.csv.gz``, in launch order within each stage."""
    path = MEASUREMENTS / f"ncu_{backend}.csv.gz"
    points: list[Measured] = []
    orders: Counter[int] = Counter()
    for stage, entry in _staged_kernels(path):
        if "pnnh" not in entry["name"] and "_conv_" not in entry["name"]:
            continue
        order = orders[stage]
        if stage < 0 or order >= len(ROLES):
            raise ValueError(f"{path}: a project kernel outside the {len(ROLES)} of a marked step")
        channels, size = STAGES[stage]
        points.append(
            Measured(
                backend, ROLES[order], channels, size, _dimensions(entry["grid"]),
                math.prod(_dimensions(entry["block"])), entry["gpu__time_duration.sum"],
                entry["dram__bytes_read.sum"] + entry["dram__bytes_write.sum"],
            )
        )  # fmt: skip
        orders[stage] += 1
    if len(points) != len(ROLES) * len(STAGES):
        raise ValueError(f"{path}: expected {len(ROLES)} project kernels per stage, got {len(points)}")
    return points


def _dimensions(triple: str) -> tuple[int, ...]:
    return tuple(int(part) for part in triple.strip("()").split(","))


def mainloop_flops(role: str, channels: int, size: int, grid: tuple[int, ...]) -> float:
    """The MMA work of the measured kernel's mainloop (the 3x3 convolutions' and the 1x1 coder
    GEMMs'; a coder of half the width, stride 1): what its iterations multiply."""
    pixels = BATCH * size * size
    code = channels // 2
    if role in ("forward statistics", "dgrad", "wgrad learner"):
        return 2.0 * pixels * channels * 9 * channels
    if role in ("wgrad encoder", "wgrad decoder"):
        return 2.0 * pixels * channels * code
    if role == "forward apply":  # the encoder, recomputed by every output-channel tile (grid[1])
        return 2.0 * pixels * code * channels * grid[1]
    raise ValueError(f"no mainloop work for {role!r}")


# Source at the measured commit ------------------------------------------------------------------


def source_tree(destination: Path, commit: str = COMMIT) -> Path:
    """``pnnh_kernels/`` and ``csrc/`` of ``commit``, extracted from this repository's git history."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPOSITORY), "archive", "--format=tar", commit, "pnnh_kernels", "csrc"],
            capture_output=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as error:
        raise RuntimeError(
            f"calibration: cannot read commit {commit[:7]} from the git history of {REPOSITORY} "
            f"(a clone with its history is needed): {error}"
        ) from error
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(destination, filter="data")
    return destination


# Run in a process of its own with the old tree first on the path: it imports the old package.
_TRITON_DRIVER = r"""
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "ScikitBuild" not in type(f).__name__]
sys.path.insert(0, sys.argv[1])
import torch
from pnnh_kernels.triton import report
requests, out = json.loads(sys.argv[2]), sys.argv[3]
results = []
for index, (shape, name, warps, grid, extents, tiles, step) in enumerate(requests):
    found = []
    for launch in report.launches(report.LayerShape(*shape), torch.bfloat16):
        if launch.name != name or launch.num_warps != warps:
            continue
        constexprs = dict(launch.constexprs)
        dims = [-(-extent // constexprs[tile]) for extent, tile in zip(extents, tiles)]
        if dims == grid[: len(dims)]:
            found.append(launch)
    if not found:
        results.append(None)
        continue
    compiled = report.compile_launch(found[0], torch.bfloat16, "sm_90")
    path = f"{out}/{index}.cubin"
    open(path, "wb").write(compiled.asm["cubin"])
    constexprs = dict(found[0].constexprs)
    per_warp = None
    if step:
        per_warp = 2 * constexprs[step[0]] * constexprs[step[1]] * constexprs[step[2]] // warps
    results.append({"cubin": path, "shared": int(compiled.metadata.shared),
                    "ambiguous": len(found) > 1, "flops_per_warp": per_warp})
print(json.dumps(results))
"""

# Per role: the variant's name at 994ebd4; the grid's first dimensions as (extent, tile) pairs, the
# extents named by the measured point (pixels, channels, code); the tiles of one mainloop step.
_TRITON_VARIANTS = {
    "forward statistics": ("_pnnh_conv_fwd_kernel[bn stats]", ("pixels", "channels"),
                           ("BLOCK_M", "BLOCK_N"), ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
    "forward apply": ("_pnnh_conv_fwd_kernel[bn apply, relu]", ("pixels", "channels"),
                      ("BLOCK_M", "BLOCK_N"), None),  # its loop is the encoder's
    "wgrad encoder": ("_conv_wgrad_kernel[encoder]", ("channels", "code"),
                      ("BLOCK_X", "BLOCK_G"), ("BLOCK_X", "BLOCK_G", "BLOCK_M")),
    "wgrad decoder": ("_conv_wgrad_kernel[decoder, relu]", ("code", "channels"),
                      ("BLOCK_X", "BLOCK_G"), ("BLOCK_X", "BLOCK_G", "BLOCK_M")),
    # dz formed by PyTorch at 994ebd4: no scale, no ReLU mask in the kernel
    "dgrad": ("_pnnh_conv_dgrad_kernel[train-BN]", ("pixels", "channels"),
              ("BLOCK_M", "BLOCK_N"), ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
    "wgrad learner": ("_conv_wgrad_kernel[learner]", ("channels", "channels"),
                      ("BLOCK_X", "BLOCK_G"), ("BLOCK_X", "BLOCK_G", "BLOCK_M")),
}  # fmt: skip


@dataclass(frozen=True)
class Compiled:
    listing: sass.KernelListing
    registers: int
    shared_bytes: int
    note: str = ""


def compile_triton(tree: Path, points: list[Measured]) -> dict[Measured, Compiled]:
    """The 994ebd4 Triton launch of each point: the variant of its role whose warps and grid
    match the measured ones (the autotuner's choice), compiled for sm_90 in a process of its own."""
    requests, wanted = [], []
    for point in points:
        if point.role not in _TRITON_VARIANTS:
            continue
        name, extents, tiles, step = _TRITON_VARIANTS[point.role]
        sizes = {"pixels": BATCH * point.size * point.size, "channels": point.channels,
                 "code": point.channels // 2}  # fmt: skip
        shape = (BATCH, point.channels, point.channels, point.size, point.size)
        requests.append((shape, name, point.threads // 32, list(point.grid),
                         [sizes[e] for e in extents], tiles, step))  # fmt: skip
        wanted.append(point)
    with tempfile.TemporaryDirectory() as out:
        environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        run = subprocess.run(
            [sys.executable, "-c", _TRITON_DRIVER, str(tree), json.dumps(requests), out],
            capture_output=True, text=True, env=environment,
        )  # fmt: skip
        if run.returncode != 0:
            failure = run.stderr[-3000:]
            raise RuntimeError(f"compiling the {COMMIT[:7]} Triton kernels failed:\n{failure}")
        results = json.loads(run.stdout.strip().splitlines()[-1])
        compiled: dict[Measured, Compiled] = {}
        for point, result in zip(wanted, results):
            if result is None:
                raise ValueError(f"no {COMMIT[:7]} launch matches the measured {point}")
            cubin = Path(result["cubin"]).read_bytes()
            ((name, listing),) = sass.listings(cubin, result["flops_per_warp"]).items()
            if listing.mainloop is None:
                raise ValueError(f"{point}: no mainloop of the expected step in {name}")
            usage = sass.resource_usage(cubin)[name]
            note = "autotuner's choice ambiguous: default taken" if result["ambiguous"] else ""
            compiled[point] = Compiled(listing, usage["REG"], result["shared"], note)
    return compiled


_CUDA_KERNELS = {
    "forward statistics": "pnnh_conv_forward_kernel",
    "dgrad": "pnnh_conv_dgrad_kernel",
    "wgrad encoder": "pnnh_conv_wgrad_kernel",
    "wgrad decoder": "pnnh_conv_wgrad_kernel",
    "wgrad learner": "pnnh_conv_wgrad_kernel",
}


def compile_cuda(tree: Path, points: list[Measured]) -> dict[Measured, Compiled]:
    """The bf16 instantiations of the CUDA kernels, compiled with nvcc as the extension's build
    compiles them for sm_90a (CMakeLists.txt's flags)."""
    listings: dict[str, sass.KernelListing] = {}
    usage: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as out:
        for source in ("pnnh_forward.cu", "pnnh_backward.cu"):
            cubin = Path(out) / (source + ".cubin")
            subprocess.run(
                ["nvcc", "-cubin", "-arch=sm_90a", "-O3", "-std=c++17", "--expt-relaxed-constexpr",
                 f"-I{tree / 'csrc'}", str(tree / "csrc" / source), "-o", str(cubin)],
                capture_output=True, check=True,
            )  # fmt: skip
            binary = cubin.read_bytes()
            listings.update(sass.listings(binary))
            usage.update(sass.resource_usage(binary))
    compiled: dict[Measured, Compiled] = {}
    for point in points:
        kernel = _CUDA_KERNELS.get(point.role)
        if kernel is None:
            continue
        (name,) = [n for n in listings if kernel in n and "13__nv_bfloat16" in n]
        # static shared memory only: the CUDA kernels allocate none dynamically
        compiled[point] = Compiled(listings[name], usage[name]["REG"], usage[name]["SHARED"])
    return compiled


# The comparison ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Point:
    measured: Measured
    compiled: Compiled

    def launch(self) -> LaunchShape:
        m = self.measured
        return LaunchShape(
            m.ctas, m.threads // 32, self.compiled.registers, self.compiled.shared_bytes,
            mainloop_flops(m.role, m.channels, m.size, m.grid), m.dram_bytes,
        )  # fmt: skip

    @functools.cached_property
    def model_terms(self) -> Terms:
        return terms(self.compiled.listing, self.launch(), CARDS[CARD])

    def modelled(self, constants: Constants = CALIBRATED) -> ModelledTime:
        return self.model_terms.with_constants(constants)

    def error(self, constants: Constants = CALIBRATED) -> float:
        """Modelled over measured, less one."""
        return self.modelled(constants).seconds / self.measured.seconds - 1


def points(backends: Iterable[str] = ("triton", "cuda")) -> list[Point]:
    found: list[Point] = []
    with tempfile.TemporaryDirectory() as directory:
        tree = source_tree(Path(directory))
        for backend in backends:
            wanted = [p for p in measured(backend) if p.role not in _NOT_SHOWN[backend]]
            compile_ = compile_triton if backend == "triton" else compile_cuda
            compiled = compile_(tree, wanted)
            found += [Point(p, compiled[p]) for p in wanted if p in compiled]
    return found


def fitted(found: list[Point]) -> list[Point]:
    return [p for p in found if not outside_fit(p.measured)]


def fit(found: list[Point]) -> Constants:
    """The constants with the smallest worst-case relative error over the fitted points of
    ``found`` (a grid search: 4 x 19 x 17 x 10 candidates)."""
    return _grid_fit(fitted(found), l2_choices=[4.0e12 + 0.25e12 * i for i in range(17)],
                     latency_choices=[0.0])  # fmt: skip


def fit_latency_reading(found: list[Point]) -> Constants:
    """model.LATENCY_READING refitted: the L2 term off, the latency term fitted (grid search)."""
    return _grid_fit(fitted(found), l2_choices=[math.inf],
                     latency_choices=[50.0 * i for i in range(1, 41)])  # fmt: skip


def _grid_fit(chosen: list[Point], l2_choices: list[float], latency_choices: list[float]) -> Constants:
    best: Optional[tuple[float, Constants]] = None
    for norm in (1.0, 2.0, 3.0, 4.0):
        for cycles in [0.5 * i for i in range(2, 21)]:
            for l2 in l2_choices:
                for fixed in [0.5e-6 * i for i in range(10)]:
                    for latency in latency_choices:
                        constants = Constants(cycles, l2, norm, fixed, latency)
                        worst = max(abs(p.error(constants)) for p in chosen)
                        if best is None or worst < best[0]:
                            best = (worst, constants)
    if best is None:
        raise ValueError("no fitted points to calibrate on")
    return best[1]


def held_out_errors(found: list[Point]) -> dict[Point, float]:
    """Each shape's fitted points predicted by constants fitted on the other three shapes."""
    errors: dict[Point, float] = {}
    chosen = fitted(found)
    for channels, _ in STAGES:
        train = [p for p in chosen if p.measured.channels != channels]
        constants = fit(train)
        for point in chosen:
            if point.measured.channels == channels:
                errors[point] = point.error(constants)
    return errors


def format_table(
    found: list[Point], constants: Constants = CALIBRATED, held_out: Optional[dict] = None
) -> str:
    lines = [
        "| backend | kernel | shape | measured (µs) | modelled (µs) | error | held-out error "
        "| bound | issue / tensor / L2 / DRAM (µs, modelled) | SASS per iteration (tensor) "
        "| iterations | CTAs resident | note |",
        "|" + "---|" * 13,
    ]
    for point in found:
        m, t = point.measured, point.modelled(constants)
        loop = point.compiled.listing.mainloop
        assert loop is not None
        held = "" if held_out is None or point not in held_out else f"{held_out[point]:+.0%}"
        note = "; ".join(n for n in (outside_fit(m), point.compiled.note) if n)
        lines.append(
            f"| {m.backend} | {m.role} | {m.channels}x{m.size}x{m.size} | {m.seconds * 1e6:.1f} "
            f"| {t.seconds * 1e6:.1f} | {point.error(constants):+.0%} | {held} | {t.bound} "
            f"| {t.issue_seconds * 1e6:.1f} / {t.tensor_seconds * 1e6:.1f} / "
            f"{t.l2_seconds * 1e6:.1f} / {t.memory_seconds * 1e6:.1f} "
            f"| {len(loop)} ({loop.counts()['tensor']}) | {t.iterations:.0f} | {t.resident_ctas} "
            f"| {note} |"
        )
    return "\n".join(lines)


# cuDNN's kernels against the model's L2 term ---------------------------------------------------
# The fitted L2 bandwidth is only as good as the points that fix it, and every fitted Triton
# mainloop loads 128 x 128 x 64 tiles: 64 FLOP per byte, so L2 bytes, iterations and MMA work are
# proportional in all of them and any cost paid once per iteration (a load's exposed latency, a
# pipeline drain) fits as "L2". cuDNN's kernels of the same convolutions, measured in the same run,
# are a check the fit never saw: the model cannot give a kernel less than its L2 term, so a cuDNN
# kernel measured faster than the L2 term of its own tiles contradicts the constant as a bandwidth.

_CUDNN_KERNEL = re.compile(
    r"sm90_xmma_(fprop|dgrad|wgrad)_\w*?tilesize(\d+)x(\d+)x(\d+)_\w*?execute_(\w+?)_kernel"
)


@dataclass(frozen=True)
class CudnnKernel:
    """One of cuDNN's convolution mainloop kernels in ``ncu_cudnn.csv.gz`` (its split-K reduction
    kernels are left out: they have no mainloop)."""

    role: str  # fprop, dgrad or wgrad
    channels: int
    size: int
    tile: tuple[int, int, int]  # M x N x K of its name
    grid: tuple[int, ...]
    seconds: float

    @property
    def gemm(self) -> tuple[int, int, int]:
        """(M, N, K) of the implicit GEMM, 3x3 stride 1: pixels x channels x taps * channels for
        fprop and dgrad; output channels x taps * input channels x pixels for wgrad."""
        pixels, taps = BATCH * self.size * self.size, 9 * self.channels
        if self.role == "wgrad":
            return self.channels, taps, pixels
        return pixels, self.channels, taps

    @property
    def flops(self) -> float:
        return 2.0 * math.prod(self.gemm)

    @property
    def tile_l2_bytes(self) -> float:
        """bf16 bytes of every output tile's A and B panels, each tile loading its own (what the
        model's L2 term counts for a Triton mainloop): no reuse inside a multiprocessor."""
        m, n, k = self.gemm
        tile_m, tile_n, _ = self.tile
        return math.ceil(m / tile_m) * math.ceil(n / tile_n) * (tile_m + tile_n) * k * 2.0

    def l2_floor_seconds(self, constants: Constants = CALIBRATED) -> float:
        """The least time the model gives any kernel that loads these tiles: its L2 term plus the
        fixed cost (the p-norm is at least its largest term)."""
        return self.tile_l2_bytes / constants.l2_bytes_per_second + constants.fixed_seconds


def cudnn_kernels() -> list[CudnnKernel]:
    path = MEASUREMENTS / "ncu_cudnn.csv.gz"
    found: list[CudnnKernel] = []
    for stage, entry in _staged_kernels(path):
        match = _CUDNN_KERNEL.search(entry["name"])
        if match is None or match.group(5) == "split_k":
            continue
        if stage < 0:
            raise ValueError(f"{path}: a cuDNN kernel before the first stage marker")
        channels, size = STAGES[stage]
        tile = (int(match.group(2)), int(match.group(3)), int(match.group(4)))
        found.append(CudnnKernel(match.group(1), channels, size, tile, _dimensions(entry["grid"]),
                                 entry["gpu__time_duration.sum"]))  # fmt: skip
    if sorted({(k.channels, k.role) for k in found}) != sorted(
        (c, r) for c, _ in STAGES for r in ("fprop", "dgrad", "wgrad")
    ):
        raise ValueError(f"{path}: expected cuDNN's fprop, dgrad and wgrad at every stage")
    return found


def cudnn_layer_seconds() -> dict[int, float]:
    """The cuDNN ResNet layer's training step on the H200, by stage (channels): the sum of every
    kernel Nsight Compute timed between two stage markers (its 19-20 kernels, caches flushed)."""
    path = MEASUREMENTS / "ncu_cudnn.csv.gz"
    sums: dict[int, float] = {}
    for stage, entry in _staged_kernels(path):
        if stage >= 0:
            channels = STAGES[stage][0]
            sums[channels] = sums.get(channels, 0.0) + entry["gpu__time_duration.sum"]
    if sorted(sums) != sorted(c for c, _ in STAGES):
        raise ValueError(f"{path}: expected one marked step per stage")
    return sums


def format_cudnn_table(kernels: list[CudnnKernel], constants: Constants = CALIBRATED) -> str:
    lines = [
        "| kernel | shape | tile | measured (µs) | TFLOP/s | tile loads (MB) | L2 rate they imply "
        "(TB/s) | model's floor (µs, modelled) | floor / measured |",
        "|" + "---|" * 9,
    ]
    for k in kernels:
        floor = k.l2_floor_seconds(constants)
        lines.append(
            f"| cuDNN {k.role} | {k.channels}x{k.size}x{k.size} | {'x'.join(map(str, k.tile))} "
            f"| {k.seconds * 1e6:.1f} | {k.flops / k.seconds / 1e12:.0f} "
            f"| {k.tile_l2_bytes / 1e6:.0f} | {k.tile_l2_bytes / k.seconds / 1e12:.2f} "
            f"| {floor * 1e6:.1f} | {floor / k.seconds:.2f} |"
        )
    return "\n".join(lines)


def cudnn_verdict(kernels: list[CudnnKernel], constants: Constants = CALIBRATED) -> str:
    beaten = [k for k in kernels if k.seconds < k.l2_floor_seconds(constants)]
    fastest = max(k.tile_l2_bytes / k.seconds for k in kernels)
    return (
        f"cuDNN beats the model's floor for its own tiles in {len(beaten)} of {len(kernels)} "
        f"kernels; its tile loads imply up to {fastest / 1e12:.1f} TB/s from the L2 against the "
        f"fitted {constants.l2_bytes_per_second / 1e12:.2f} TB/s. "
        + (
            "The fitted constant is not a bandwidth limit: it also carries per-iteration costs of "
            "the Triton mainloops that the 64 FLOP/B fit points cannot separate from their bytes."
            if beaten
            else "The fitted constant is consistent with cuDNN's kernels."
        )
    )


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pnnh_kernels.mainloop.calibration",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--fit", action="store_true", help="refit the constants on these points")
    parser.add_argument("--backend", choices=["triton", "cuda"], action="append")
    args = parser.parse_args(argv)
    found = points(args.backend or ("triton", "cuda"))
    constants = fit(found) if args.fit else CALIBRATED
    held_out = held_out_errors(found) if args.fit else None
    print(f"Modelled against measured (Nsight Compute, {CARD}), kernels of {COMMIT[:7]}; "
          f"constants: {constants}\n")  # fmt: skip
    print(format_table(found, constants, held_out))
    errors = [abs(p.error(constants)) for p in fitted(found)]
    if errors:
        print(f"\nfitted points: {len(errors)}; |error| median {sorted(errors)[len(errors) // 2]:.0%}, "
              f"max {max(errors):.0%}; within 20%: {sum(e <= 0.2 for e in errors)}")  # fmt: skip
    if held_out:
        print(f"held out by shape: max |error| {max(abs(e) for e in held_out.values()):.0%}")
    latency = fit_latency_reading(found) if args.fit else LATENCY_READING
    errors = [abs(p.error(latency)) for p in fitted(found)]
    print(f"\nThe latency reading (no L2 limit; {latency.latency_cycles:.0f} cycles per mainloop "
          f"iteration per wave): {latency}\nfitted points: |error| median "
          f"{sorted(errors)[len(errors) // 2]:.0%}, max {max(errors):.0%}; within 20%: "
          f"{sum(e <= 0.2 for e in errors)}")  # fmt: skip
    kernels = cudnn_kernels()
    print("\ncuDNN's mainloops of the same run against the model's L2 term of their own tiles "
          "(the model's floor: L2 term + fixed cost)\n")  # fmt: skip
    print(format_cudnn_table(kernels, constants))
    print("\n" + cudnn_verdict(kernels, constants))


if __name__ == "__main__":
    main()
