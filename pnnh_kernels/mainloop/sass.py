"""A compiled kernel's SASS read for its mainloop: the instructions one iteration issues, by class.

``cuobjdump --dump-sass`` (the one inside the triton wheel reads every sm_80/sm_90 cubin, nvcc's
included) lists each kernel's instructions with their addresses. A loop is the span from a
backward branch's target to the branch; the *mainloop* is the innermost loop that issues the most
tensor-core work per iteration (HGMMA: wgmma, sm_90; HMMA: mma.sync). What one iteration issues,
per warp, is what the static model (pnnh_kernels.mainloop.model) turns into time.

Counts are static: a predicated instruction counts as issued (it is, with its predicate off), and a
forward branch inside the loop (a rarely taken path) counts every instruction of both sides. That
over-counts loops with large conditional blocks; the Triton and CUDA mainloops here have none.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# Instruction classes, by opcode (the text before the first dot). Uniform-datapath opcodes (U*) are
# integer work on the scheduler's issue slots as well.
CLASSES = ("tensor", "global", "shared", "integer", "float", "barrier", "control")
_TENSOR = {"HGMMA", "HMMA", "IMMA", "DMMA", "QGMMA", "IGMMA", "BGMMA"}
_GLOBAL = {
    "LDG", "STG", "LDGSTS", "LDGDEPBAR", "UTMALDG", "UTMASTG", "UTMAPF", "UBLKCP", "RED", "ATOMG",
    "LD", "ST", "LDL", "STL", "CCTL", "UBLKRED",
}  # fmt: skip
_SHARED = {"LDS", "LDSM", "STS", "STSM", "ATOMS", "LDSU", "REDS"}
_FLOAT = {
    "FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "FCHK", "MUFU", "F2F", "F2FP", "HADD2",
    "HFMA2", "HMUL2", "HMNMX2", "HSETP2", "FRND", "DFMA", "DADD", "DMUL", "FSWZADD",
}  # fmt: skip
_BARRIER = {
    "BAR", "DEPBAR", "WARPGROUP", "MEMBAR", "FENCE", "WARPSYNC", "SYNCS", "ERRBAR", "ARRIVES",
    "UCGABAR_ARV", "UCGABAR_WAIT", "BSSY", "BSYNC", "NANOSLEEP", "ELECT", "WARPGROUPSET",
}  # fmt: skip
_CONTROL = {"BRA", "EXIT", "RET", "CALL", "JMP", "BRX", "NOP", "YIELD", "BPT", "KILL"}

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]\s+)?([A-Z0-9_]+(?:\.[A-Za-z0-9_]+)*)([^;]*);")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)", re.MULTILINE)
_GMMA_SHAPE = re.compile(r"[HQIB]GMMA\.(\d+)x(\d+)x(\d+)")  # wgmma: 16-bit/tf32, fp8, int8, binary
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "16832": (16, 8, 32), "884": (8, 8, 4)}


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with its modifiers, e.g. "HGMMA.64x128x16.F32.BF16"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]

    @property
    def kind(self) -> str:
        return classify(self.opcode)

    @property
    def branch_target(self) -> Optional[int]:
        if self.base != "BRA":
            return None
        match = re.search(r"0x([0-9a-f]+)", self.operands)
        return int(match.group(1), 16) if match else None


def classify(opcode: str) -> str:
    """One of :data:`CLASSES` for an opcode (``"integer"`` for whatever is not named: the address
    arithmetic, moves, predicates and conversions that make up the rest of a mainloop)."""
    base = opcode.split(".", 1)[0]
    for kind, names in (
        ("tensor", _TENSOR), ("global", _GLOBAL), ("shared", _SHARED), ("float", _FLOAT),
        ("barrier", _BARRIER), ("control", _CONTROL),
    ):  # fmt: skip
        if base in names:
            return kind
    return "integer"


def mma_flops_per_warp(opcode: str) -> int:
    """Operations one warp's issue of a tensor-core instruction contributes: an HGMMA.MxNxK (or
    QGMMA, IGMMA: fp8, int8) is one warpgroup's (four warps') M x N x K product, an HMMA.MNK one
    warp's."""
    match = _GMMA_SHAPE.match(opcode)
    if match:
        m, n, k = map(int, match.groups())
        return 2 * m * n * k // 4
    parts = opcode.split(".")
    if parts[0] in ("HMMA", "IMMA") and len(parts) > 1 and parts[1] in _HMMA_SHAPES:
        m, n, k = _HMMA_SHAPES[parts[1]]
        return 2 * m * n * k
    return 0


_LOADS = {"LDG", "LDGSTS"}
_WIDTHS = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def load_width(opcode: str) -> int:
    """Bytes per lane of a global load (32 bits unless a modifier says otherwise)."""
    for modifier in reversed(opcode.split(".")[1:]):
        if modifier in _WIDTHS:
            return _WIDTHS[modifier]
    return 4


def parse(text: str) -> dict[str, list[Instruction]]:
    """The instructions of every kernel in a ``cuobjdump --dump-sass`` listing, by kernel name."""
    functions: dict[str, list[Instruction]] = {}
    headers = list(_FUNCTION.finditer(text))
    for index, header in enumerate(headers):
        end = headers[index + 1].start() if index + 1 < len(headers) else len(text)
        body = text[header.end() : end]
        functions[header.group(1)] = [
            Instruction(int(m.group(1), 16), m.group(3), m.group(4).strip())
            for m in _LINE.finditer(body)
        ]
    return functions


@dataclass(frozen=True)
class Loop:
    start: int  # address of the first instruction (the backward branch's target)
    end: int  # address of the backward branch
    instructions: tuple[Instruction, ...]

    def counts(self) -> dict[str, int]:
        """Instructions of one iteration by class (every class present, zero where none)."""
        found = Counter(i.kind for i in self.instructions)
        return {kind: found.get(kind, 0) for kind in CLASSES}

    @property
    def mma_flops_per_warp(self) -> int:
        return sum(mma_flops_per_warp(i.opcode) for i in self.instructions)

    @property
    def global_load_bytes_per_warp(self) -> int:
        """Bytes one iteration's global loads (LDG into registers, LDGSTS into shared memory) ask
        of the L2 per warp: 32 lanes times each load's width (masked lanes counted)."""
        return sum(32 * load_width(i.opcode) for i in self.instructions if i.base in _LOADS)

    @property
    def tensor_opcodes(self) -> dict[str, int]:
        return dict(Counter(i.opcode for i in self.instructions if i.kind == "tensor"))

    def __len__(self) -> int:
        return len(self.instructions)


def loops(instructions: list[Instruction]) -> list[Loop]:
    """Every loop: the instructions from a backward branch's target to the branch itself."""
    found = []
    for index, instruction in enumerate(instructions):
        target = instruction.branch_target
        if target is None or target > instruction.address:
            continue
        body = tuple(i for i in instructions[: index + 1] if i.address >= target)
        found.append(Loop(target, instruction.address, body))
    return found


def mma_loops(instructions: list[Instruction]) -> list[Loop]:
    """The innermost loops that issue tensor-core work (a loop that contains another tensor-core
    loop is its outer loop)."""
    candidates = [loop for loop in loops(instructions) if loop.mma_flops_per_warp > 0]
    return [
        loop
        for loop in candidates
        if not any(
            other is not loop and loop.start <= other.start and other.end <= loop.end
            for other in candidates
        )
    ]


def mainloop(instructions: list[Instruction], flops_per_warp: Optional[int] = None) -> Optional[Loop]:
    """The mainloop: the innermost tensor-core loop whose iteration does ``flops_per_warp`` of MMA
    work per warp (one K step of the CTA's tile: what the caller knows from the tiles), the first
    such in program order; without it, the first with the most work per iteration. None: no such
    loop. Other MMA loops come after the convolution's in these kernels (the input gradient's coder
    loop, whose iteration can do the same work) or do other work per iteration (the fused forward's
    centre-tap code loop: twice an iteration of its convolution loop, once)."""
    found = mma_loops(instructions)
    if flops_per_warp is not None:
        matching = [loop for loop in found if loop.mma_flops_per_warp == flops_per_warp]
        return matching[0] if matching else None
    return max(found, key=lambda loop: loop.mma_flops_per_warp, default=None)


@dataclass(frozen=True)
class KernelListing:
    """What the model reads of one compiled kernel."""

    name: str
    instructions: int  # static count of the whole kernel
    mainloop: Optional[Loop]

    @property
    def outside_mainloop(self) -> int:
        """Instructions outside the mainloop, each counted once (prologue, epilogue, other loops)."""
        return self.instructions - (len(self.mainloop) if self.mainloop else 0)


def cuobjdump() -> Path:
    """The ``cuobjdump`` inside the triton wheel (it reads nvcc's sm_90a cubins too)."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def dump(cubin: bytes, *, resources: bool = False) -> str:
    """``cuobjdump --dump-sass`` (or ``--dump-resource-usage``) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        flag = "--dump-resource-usage" if resources else "--dump-sass"
        return subprocess.run(
            [str(cuobjdump()), flag, handle.name], capture_output=True, text=True, check=True
        ).stdout


def listings(cubin: bytes, flops_per_warp: Optional[int] = None) -> dict[str, KernelListing]:
    """Every kernel of a cubin, read for its mainloop (see :func:`mainloop`)."""
    return {
        name: KernelListing(name, len(body), mainloop(body, flops_per_warp))
        for name, body in parse(dump(cubin)).items()
    }


def resource_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """REG, STACK, SHARED, LOCAL of every kernel in ``cubin``, by kernel name."""
    text = dump(cubin, resources=True)
    usage: dict[str, dict[str, int]] = {}
    for block in re.split(r"\n\s*Function\s+", text)[1:]:
        name, _, rest = block.partition(":")
        usage[name.strip()] = {
            key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", rest)
        }
    return usage
