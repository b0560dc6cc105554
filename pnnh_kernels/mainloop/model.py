"""A static time model of one kernel launch on Hopper, from its SASS mainloop (modelled, not measured).

Four throughputs bound a launch; the model combines them and adds a fixed cost:

- **issue**: every warp issues its mainloop ``iterations`` times plus everything else once; a
  scheduler (four per multiprocessor) issues at most one instruction a cycle, and fewer when it has
  too few warps to hide their dependencies: at ``min(1, warps per scheduler / cycles_per_issue)``,
  where ``cycles_per_issue`` is how often one warp alone can issue (a calibrated constant);
- **tensor**: the mainloop's MMA work at the multiprocessor's tensor-core rate (wgmma's dense rate
  for HGMMA; mma.sync, which on Hopper does not reach it, at a lower one);
- **L2**: the bytes the mainloop's global loads ask of the L2 (every CTA, every iteration: the tiles
  a cp.async or LDG brings in, re-reads included) at a calibrated L2-to-SM bandwidth. This is the
  term that bounds the 994ebd4 convolutions: 64 FLOP per byte loaded (128 x 128 x 64 tiles) needs
  ~15 TB/s at the tensor cores' rate, about three times what the L2 delivers;
- **memory**: the launch's DRAM bytes at the card's copy bandwidth;
- **latency** (off in the calibrated constants): a fixed number of cycles every mainloop iteration
  of a CTA takes whatever else it does, paid once per wave of resident CTAs. It is the other
  reading of the same measurements: the fitted Triton mainloops all load 64 FLOP per byte, so a
  cost per iteration and a cost per byte are proportional there and both fit (see
  pnnh_kernels.mainloop.calibration, ``LATENCY_READING``), while cuDNN's kernels of the same run
  move their tiles faster than the L2 term allows. Kernels are judged under both readings.

The terms overlap imperfectly: the model takes their p-norm, ``(sum t**p) ** (1/p)``, which lies
between their sum (p = 1, no overlap) and their maximum (p -> infinity, perfect overlap), with p
calibrated; plus ``fixed_seconds`` (launch, prologue, epilogue drain, tail), calibrated.

The busiest multiprocessor does ``ceil(CTAs / multiprocessors)`` CTAs; up to ``resident`` of them
(registers, shared memory, threads) share its schedulers and tensor cores at a time. Iterations per
CTA come from the launch's MMA work: ``work per CTA / MMA work of one iteration``.

Calibrated against Nsight Compute times of the 994ebd4 kernels on an H200
(pnnh_kernels.mainloop.calibration); the constants below are those fits, and the calibration prints
the error on every point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from pnnh_kernels.mainloop.sass import KernelListing


@dataclass(frozen=True)
class Hopper:
    """One sm_90 card as the model sees it."""

    name: str
    multiprocessors: int = 132
    clock_hz: float = 1.83e9  # the clock of the datasheet's 989 TFLOP/s (132 x 4096 x 1.83 GHz)
    schedulers: int = 4
    wgmma_flops_per_cycle: int = 4096  # dense bf16/fp16, per multiprocessor
    # mma.sync on Hopper: assumed half of wgmma's rate (the legacy path does not reach wgmma's).
    mma_sync_flops_per_cycle: int = 2048
    bytes_per_second: float = 4.3e12  # measured device-to-device copy (H200); an H100's ~3.0e12
    registers: int = 65536
    shared_bytes: int = 233_472  # per multiprocessor (228 KiB)
    shared_reserved_per_cta: int = 1024
    max_threads: int = 2048
    max_ctas: int = 32


CARDS = {"H200": Hopper("H200"), "H100": Hopper("H100", bytes_per_second=3.0e12)}


@dataclass(frozen=True)
class Constants:
    """The calibrated part of the model (see the module)."""

    cycles_per_issue: float = 3.0
    l2_bytes_per_second: float = 5.75e12
    overlap_norm: float = 3.0
    fixed_seconds: float = 4.0e-6
    latency_cycles: float = 0.0  # per mainloop iteration of a CTA, per wave (0: no such term)


CALIBRATED = Constants()
# The other reading of the same points (pnnh_kernels.mainloop.calibration refits it with --fit): no
# L2 limit at all, a fixed cost per mainloop iteration instead. It fits the 20 Triton mainloops
# within 19% (the L2 reading: 11%) and, unlike the L2 reading, does not contradict cuDNN's kernels.
LATENCY_READING = Constants(
    cycles_per_issue=1.0, l2_bytes_per_second=math.inf, overlap_norm=2.0, fixed_seconds=4.0e-6,
    latency_cycles=1350.0,
)  # fmt: skip


@dataclass(frozen=True)
class LaunchShape:
    """What the model needs of a launch besides its SASS."""

    ctas: int
    warps: int  # per CTA
    registers: int  # per thread
    shared_bytes: int  # per CTA, static + dynamic
    mainloop_flops: float  # the MMA work of all its mainloop iterations, over every CTA
    dram_bytes: float
    # Bytes the mainloop's loads ask of the L2, over every CTA; None: read from the SASS (LDG and
    # LDGSTS widths). TMA loads (UTMALDG) carry their box in a descriptor the SASS does not show,
    # so a mainloop with them needs this given.
    l2_bytes: Optional[float] = None


@dataclass(frozen=True)
class ModelledTime:
    seconds: float
    issue_seconds: float
    tensor_seconds: float
    l2_seconds: float
    memory_seconds: float
    fixed_seconds: float
    resident_ctas: int
    waves: int
    iterations: float  # mainloop iterations per CTA
    instructions_per_iteration: int  # per warp
    latency_seconds: float = 0.0

    @property
    def bound(self) -> str:
        terms = {
            "issue": self.issue_seconds, "tensor": self.tensor_seconds, "L2": self.l2_seconds,
            "memory": self.memory_seconds, "latency": self.latency_seconds,
        }  # fmt: skip
        return max(terms, key=terms.__getitem__)


def tensor_rate(card: Hopper, opcodes: dict[str, int]) -> float:
    """Operations per cycle per multiprocessor of a mainloop's tensor-core instructions: wgmma's
    dense 16-bit rate, half of it for TF32 inputs, twice it for fp8 and int8; mma.sync (HMMA)
    at the assumed legacy rate (halved again for TF32). The slowest kind present bounds."""
    rates = []
    for opcode in opcodes:
        base = card.mma_sync_flops_per_cycle if opcode.startswith(("HMMA", "IMMA")) else (
            card.wgmma_flops_per_cycle
        )  # fmt: skip
        if ".TF32" in opcode:
            base /= 2
        elif opcode.startswith(("QGMMA", "IGMMA")):
            base *= 2
        rates.append(base)
    return min(rates) if rates else card.wgmma_flops_per_cycle


def resident_ctas(card: Hopper, warps: int, registers: int, shared_bytes: int) -> int:
    """CTAs one multiprocessor holds at once (registers are allocated per warp in 256s)."""
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_registers = card.registers // (per_warp * warps) if per_warp else card.max_ctas
    by_shared = card.shared_bytes // (shared_bytes + card.shared_reserved_per_cta)
    by_threads = card.max_threads // (32 * warps)
    return max(1, min(by_registers, by_shared, by_threads, card.max_ctas))


@dataclass(frozen=True)
class Terms:
    """The part of a modelled time that the calibrated constants do not change."""

    unstalled_issue_seconds: float  # at one instruction per scheduler per cycle
    warps_per_scheduler: float
    tensor_seconds: float
    l2_bytes: float
    memory_seconds: float
    resident_ctas: int
    waves: int
    iterations: float
    instructions_per_iteration: int
    clock_hz: float  # the card's, for the latency term

    def with_constants(self, constants: Constants = CALIBRATED) -> ModelledTime:
        issue_rate = min(1.0, self.warps_per_scheduler / constants.cycles_per_issue)
        issue = self.unstalled_issue_seconds / issue_rate
        l2 = self.l2_bytes / constants.l2_bytes_per_second
        latency = self.waves * self.iterations * constants.latency_cycles / self.clock_hz
        p = constants.overlap_norm
        combined = (issue**p + self.tensor_seconds**p + l2**p + self.memory_seconds**p + latency**p) ** (
            1 / p
        )
        return ModelledTime(
            seconds=combined + constants.fixed_seconds,
            issue_seconds=issue,
            tensor_seconds=self.tensor_seconds,
            l2_seconds=l2,
            memory_seconds=self.memory_seconds,
            fixed_seconds=constants.fixed_seconds,
            resident_ctas=self.resident_ctas,
            waves=self.waves,
            iterations=self.iterations,
            instructions_per_iteration=self.instructions_per_iteration,
            latency_seconds=latency,
        )


def terms(listing: KernelListing, launch: LaunchShape, card: Hopper = CARDS["H200"]) -> Terms:
    loop = listing.mainloop
    if loop is None:
        raise ValueError(f"{listing.name}: no mainloop with tensor-core instructions to model")
    mma_per_iteration = loop.mma_flops_per_warp * launch.warps  # one CTA's
    iterations = launch.mainloop_flops / launch.ctas / mma_per_iteration
    rate = tensor_rate(card, loop.tensor_opcodes)
    resident = resident_ctas(card, launch.warps, launch.registers, launch.shared_bytes)
    per_sm = math.ceil(launch.ctas / card.multiprocessors)  # CTAs of the busiest multiprocessor
    concurrent = min(resident, per_sm)
    instructions = launch.warps * (iterations * len(loop) + listing.outside_mainloop)
    l2_bytes = launch.l2_bytes
    if l2_bytes is None:
        if any(i.base.startswith("UTMA") for i in loop.instructions):
            raise ValueError(f"{listing.name}: a TMA mainloop needs its L2 bytes given (l2_bytes)")
        l2_bytes = launch.ctas * iterations * loop.global_load_bytes_per_warp * launch.warps
    return Terms(
        unstalled_issue_seconds=per_sm * instructions / card.schedulers / card.clock_hz,
        warps_per_scheduler=concurrent * launch.warps / card.schedulers,
        tensor_seconds=per_sm * launch.mainloop_flops / launch.ctas / rate / card.clock_hz,
        l2_bytes=l2_bytes,
        memory_seconds=launch.dram_bytes / card.bytes_per_second,
        resident_ctas=resident,
        waves=math.ceil(per_sm / resident),
        iterations=iterations,
        instructions_per_iteration=len(loop),
        clock_hz=card.clock_hz,
    )


def modelled_time(
    listing: KernelListing,
    launch: LaunchShape,
    card: Hopper = CARDS["H200"],
    constants: Constants = CALIBRATED,
) -> ModelledTime:
    return terms(listing, launch, card).with_constants(constants)
