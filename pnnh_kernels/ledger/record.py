"""Recording the device launches of a step: each fused kernel's declared traffic, and every PyTorch
op that would launch a kernel on a GPU.

Two ways to run a step under :func:`recording`:

- on **meta tensors** at the real shape (the ledger): PyTorch ops compute only shapes, and the
  fused launchers declare each launch through :func:`pnnh_kernels.observer.launch` without running
  it, so a step of a 256 x 128 x 16 x 16 layer is counted on a CPU in well under a second;
- on **real tensors** (``instrument=True``; the drift test, small shapes, Triton's interpreter or
  the CUDA emulation): the same declarations, and every launch really runs, with the tensors it
  was handed (captured by a hook below the launcher) and the tensors it changed kept for checking.

The byte rule, the same for every launch: each tensor a launch reads is counted once in ``read``,
each tensor it writes once in ``written`` (a view counts the elements it spans). Reads that a cache
would serve (a convolution's neighbouring taps, weight tiles re-read by every program) are
declared apart in ``cached_read``, an estimate from the launch's tiling, never folded into the
other two. So ``read + written`` is the traffic of a launch that fetches every input once from
DRAM and writes every output once, which is what Nsight Compute measures when it flushes the
caches before each kernel (bench/ncu_step.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from pnnh_kernels import observer
from pnnh_kernels.ledger.cards import MODELLED_CARD
from pnnh_kernels.observer import Declared, is_placeholder, modelling, placeholder, tensor_bytes

__all__ = ["Declared", "Launch", "Recorder", "placeholder", "recording", "tensor_bytes"]

KINDS = ("triton", "cuda", "torch")
# Profiler ranges around what a recording runs but does not count (a kernel launch's host side, a
# check's own work), so that a test can tell them apart in torch.profiler's events.
UNRECORDED_RANGE = "pnnh_ledger_unrecorded"
RECORDED_RANGE = "pnnh_ledger_recording"  # around the whole block of a recording


@dataclass(frozen=True)
class Launch:
    """One device launch and its traffic."""

    name: str
    kind: str  # "triton", "cuda" (our kernels) or "torch" (a kernel PyTorch launches)
    read: int  # bytes, each tensor read once
    written: int  # bytes, each tensor written once
    flops: int = 0
    cached_read: int = 0  # bytes re-read that a cache would serve (an estimate from the tiling)

    @property
    def bytes(self) -> int:
        return self.read + self.written


@dataclass
class InstrumentedLaunch:
    """What a real launch under ``recording(instrument=True)`` was declared to touch and did touch."""

    launch: Launch
    declared_reads: list[Tensor]
    declared_writes: list[Tensor]
    handed: list[Tensor] = field(default_factory=list)  # tensor arguments the kernel received
    handed_pointers: list[int] = field(default_factory=list)  # raw pointers (CUDA launches)
    changed: list[Tensor] = field(default_factory=list)  # declared tensors whose contents changed


class Recorder:
    """The observer (pnnh_kernels.observer) of one :func:`recording`."""

    def __init__(self, instrument: bool) -> None:
        self.modelled_multiprocessors = MODELLED_CARD.multiprocessors
        self.modelled_capability = MODELLED_CARD.capability
        self.instrument = instrument
        self.launches: list[Launch] = []
        self.instrumented: list[InstrumentedLaunch] = []
        self.current: Optional[InstrumentedLaunch] = None
        self.paused = False

    def paused_block(self) -> contextlib.AbstractContextManager[None]:
        return unrecorded()

    def observe_launch(self, name: str, kind: str, run: Callable[[], Any], declared: Declared) -> None:
        """Count one launch of one of our kernels and run it (unless its tensors are meta tensors:
        then it is only counted)."""
        read_list, write_list = _unique(declared.reads), _unique(declared.writes)
        launch = Launch(
            name,
            kind,
            sum(tensor_bytes(t) for t in read_list),
            sum(tensor_bytes(t) for t in write_list),
            int(declared.flops),
            int(declared.cached_read),
        )
        self.launches.append(launch)
        if any(modelling(t) for t in (*read_list, *write_list)):
            return
        if not self.instrument:
            with unrecorded():  # the CPU interpreter's host copies are not device launches
                run()
            return
        record = InstrumentedLaunch(launch, read_list, write_list)
        touched = _unique([*read_list, *write_list])
        with unrecorded():
            before = [t.detach().clone() for t in touched]
        self.current = record
        try:
            with unrecorded():  # the CPU interpreter's host copies are not device launches
                run()
        finally:
            self.current = None
        with unrecorded():
            record.changed = [
                t for t, old in zip(touched, before)
                if not torch.equal(t.isnan(), old.isnan())
                or not torch.equal(torch.nan_to_num(t), torch.nan_to_num(old))
            ]  # fmt: skip
        self.instrumented.append(record)


@contextlib.contextmanager
def unrecorded() -> Iterator[None]:
    """PyTorch ops in the block are not recorded: work that checks a step (poisoning outputs,
    the instrumentation's snapshots), not work the step does."""
    recorder = _recorder
    if recorder is None or recorder.paused:
        yield
        return
    recorder.paused = True
    try:
        with torch.profiler.record_function(UNRECORDED_RANGE):
            yield
    finally:
        recorder.paused = False


_recorder: Optional[Recorder] = None


def _unique(tensors: Sequence[Optional[Tensor]]) -> list[Tensor]:
    seen: list[Tensor] = []
    for tensor in tensors:
        if tensor is None or is_placeholder(tensor) or any(tensor is other for other in seen):
            continue
        seen.append(tensor)
    return seen


def active() -> Optional[Recorder]:
    return _recorder


def note_handed(arguments: Sequence[Any]) -> None:
    """Called by a hook below the launchers (tests): the arguments a kernel really received."""
    recorder = _recorder
    if recorder is None or recorder.current is None:
        return
    for argument in arguments:
        if isinstance(argument, Tensor) and not is_placeholder(argument):
            recorder.current.handed.append(argument)
        elif isinstance(argument, int) and not isinstance(argument, bool) and argument > 65536:
            recorder.current.handed_pointers.append(argument)


# PyTorch ops -------------------------------------------------------------------------------------

# Ops that launch no kernel: allocation, views and metadata.
_NO_KERNEL = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
    "lift_fresh", "lift", "set_", "resize_", "item", "_local_scalar_dense",
    "is_nonzero", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "result_type",
}  # fmt: skip
# Ops that overwrite an argument without reading it: (op name, index of that argument).
_WRITE_ONLY_ARGUMENT = {"fill_": 0, "zero_": 0, "copy_": 0, "normal_": 0, "uniform_": 0}


def _tensors(values: Any) -> list[Tensor]:
    found: list[Tensor] = []

    def visit(value: Any) -> None:
        if isinstance(value, Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(values)
    return found


def _bytes(tensors: Sequence[Tensor]) -> int:
    return sum(tensor_bytes(t) for t in _unique(tensors))


def _op_launches(func: Any, args: tuple, kwargs: dict, out: Any) -> list[Launch]:
    """The kernels one PyTorch op launches on a CUDA GPU, modelled by op (eager PyTorch, cuDNN)."""
    name = func._schema.name.split("::")[-1]
    label = f"aten::{name}"
    inputs = _tensors((args, kwargs))
    outputs = _tensors(out)
    flops = 0
    if func in flop_registry or func._overloadpacket in flop_registry:
        formula = flop_registry.get(func) or flop_registry[func._overloadpacket]
        flops = int(formula(*args, **kwargs, out_val=out))  # torch's own FLOP formulas
    if name == "native_batch_norm" and args[5]:  # training: statistics, running stats, transform
        x, y = args[0], outputs[0]
        small = [t for t in inputs[1:] if t is not None]
        return [
            Launch(f"{label} (statistics)", "torch", tensor_bytes(x), _bytes(outputs[1:])),
            Launch(f"{label} (running statistics)", "torch", _bytes(small + outputs[1:]), _bytes(small)),
            Launch(f"{label} (transform)", "torch", _bytes([x, *small, *outputs[1:]]), tensor_bytes(y)),
        ]
    if name == "native_batch_norm_backward":  # reduce, then the elementwise pass
        grad, x = args[0], args[1]
        small = [t for t in inputs[2:] if t is not None]
        grad_input = outputs[0] if outputs else None
        return [
            Launch(f"{label} (reduce)", "torch", _bytes([grad, x, *small]), _bytes(outputs[1:])),
            Launch(f"{label} (elementwise)", "torch", _bytes([grad, x, *small]), _bytes([grad_input])),
        ]
    if name == "convolution_backward":  # one kernel per requested gradient
        grad, x, weight = args[0], args[1], args[2]
        mask = args[-1]
        per_flops = flops // max(1, sum(mask[:2]))
        parts = (
            ("input", [grad, weight], per_flops),
            ("weight", [grad, x], per_flops),
            ("bias", [grad], 0),
        )
        return [
            Launch(f"{label} ({part})", "torch", _bytes(reads), tensor_bytes(out[index]), part_flops)
            for index, (part, reads, part_flops) in enumerate(parts)
            if mask[index]
        ]
    written = _unique(outputs)
    skip_read = None
    if name in _WRITE_ONLY_ARGUMENT and inputs:
        skip_read = args[_WRITE_ONLY_ARGUMENT[name]]
    reads = [t for t in inputs if t is not skip_read]
    return [Launch(label, "torch", _bytes(reads), _bytes(written), flops)]


class _TorchOps(TorchDispatchMode):
    """Records each PyTorch op that would launch a kernel; runs our own custom ops' Python
    implementations (not their fake kernels) so that the launches inside them are seen too."""

    def __init__(self, recorder: Recorder, implementations: dict) -> None:
        super().__init__()
        self.recorder = recorder
        self.implementations = implementations

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        implementation = self.implementations.get(func)
        if implementation is not None:
            with self:
                return implementation(*args, **kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            # Below autograd (inside our custom ops) composite ops such as contiguous and reshape
            # arrive whole: decomposed here, so that the copy they may make is seen.
            with self:
                return func.decompose(*args, **kwargs)
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if self.recorder.paused or func.is_view or name in _NO_KERNEL:
            return out
        if name == "copy_" and args[0] is args[1]:
            return out
        self.recorder.launches.extend(_op_launches(func, args, kwargs, out))
        return out


# The Python bodies of our ops (pnnh_kernels.observer.register_implementation), which a recording
# runs instead of their fake kernels.
_implementations = observer.implementations


@contextlib.contextmanager
def recording(instrument: bool = False) -> Iterator[Recorder]:
    """Record every launch of the code in the block (see the module's docstring)."""
    global _recorder
    if _recorder is not None:
        raise RuntimeError("recording() does not nest")
    recorder = Recorder(instrument)
    _recorder = recorder
    observer.observer = recorder
    try:
        with torch.profiler.record_function(RECORDED_RANGE), _TorchOps(recorder, _implementations):
            yield recorder
    finally:
        _recorder = None
        observer.observer = None
