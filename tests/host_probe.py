"""Counts of one training step's host work, in a process of its own (run by tests/test_host_cost.py):
Python calls, project frames from FusedPNNHConv.forward to a launch, host synchronisations, and
tensors made outside PyTorch's allocator.

It needs the compiled kernels' launch path, so it runs without TRITON_INTERPRET (the test process
has it on), through pnnh_kernels.benchmarking.host_cost's stub launchers. Prints one JSON object.

    python tests/host_probe.py [--no-plans] [--observe] [--cumulative-batch-norm] [--broken-plans]

The flags make the step deliberately worse, so that tests/test_host_cost.py can prove its checks
fail: every Triton launch through ``kernel[grid]``; an observer installed that builds every
launch's declaration; BatchNorm with ``momentum=None``, whose factor 1 / num_batches_tracked is read
on the host each step (a synchronisation, as in nn.BatchNorm2d); launch plans that drop their last
constexpr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any

import torch

from pnnh_kernels import FusedPNNHConv, observer
from pnnh_kernels.benchmarking import host_cost
from pnnh_kernels.benchmarking.baselines import ResNetLayer
from pnnh_kernels.cuda.launch import ENTRY_POINTS
from pnnh_kernels.triton import compiled_launch

SHAPE = (8, 32, 8)  # batch, channels, size: the counts do not depend on the size
SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero")
_PROJECT = os.sep + "pnnh_kernels" + os.sep
_STUB = os.sep + "host_cost.py"


def _step(module: torch.nn.Module) -> Any:
    module = module.to(torch.bfloat16, memory_format=torch.channels_last).train()
    n, c, size = SHAPE
    x = torch.randn(n, c, size, size, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    grad = torch.randn_like(x)

    def step() -> None:
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(grad)

    return step


def _frames_at_launch(step: Any) -> int:
    """The most project frames on the stack where a launch reaches the stub's launcher: from
    FusedPNNHConv.forward (nothing above it is the project's), or from the autograd Function's
    backward, which the engine calls, down to the frame that launches."""
    deepest = 0

    def launched() -> None:
        nonlocal deepest
        frame, count = sys._getframe(2), 0
        while frame is not None:
            name = frame.f_code.co_filename
            count += _PROJECT in name and not name.endswith(_STUB)
            frame = frame.f_back
        deepest = max(deepest, count)

    stub_compiled, stub_cuda = host_cost._StubCompiled, host_cost._StubCudaExtension
    saved = stub_compiled.run, {name: getattr(stub_cuda, name) for name in _CUDA_ENTRIES}
    stub_compiled.run = lambda self, *args: launched()
    for name in _CUDA_ENTRIES:
        setattr(stub_cuda, name, lambda self, *args: launched())
    try:
        step()
    finally:
        stub_compiled.run = saved[0]
        for name, entry in saved[1].items():
            setattr(stub_cuda, name, entry)
    return deepest


_CUDA_ENTRIES = sorted(ENTRY_POINTS)


def _canonical(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.dtype)
    return value


def _launcher_calls(step: Any) -> list[tuple]:
    """What every launch of one step hands the compiled kernel's launcher (tensors by shape,
    strides and dtype; the launch metadata and hooks, positions 6-8, left out)."""
    calls: list[tuple] = []
    saved = host_cost._StubCompiled.run

    def run(self: Any, *args: Any) -> None:
        calls.append(tuple(_canonical(a) for i, a in enumerate(args) if i not in (6, 7, 8)))

    host_cost._StubCompiled.run = run
    try:
        step()
    finally:
        host_cost._StubCompiled.run = saved
    return calls


def _plans_match_triton(step: Any) -> bool:
    """Whether a step through the launch plans hands the launcher what Triton's own kernel[grid]
    path hands it: the plans are dropped (compiles and autotuning stay cached), one step goes
    through Triton's path and makes the plans, the next one through the plans."""
    compiled_launch.clear()
    through_triton = _launcher_calls(step)
    through_plans = _launcher_calls(step)
    return len(through_triton) > 0 and through_triton == through_plans


def _syncs(step: Any) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()
    return sorted({event.name for event in profile.events() if event.name in SYNC_OPS})


def _foreign_tensors(step: Any) -> list[str]:
    """Tensor constructors that bypass PyTorch's allocator, called during the step."""
    called: list[str] = []
    names = ("from_numpy", "frombuffer", "from_dlpack")
    saved = {name: getattr(torch, name) for name in names}

    def recording(name: str) -> Any:
        def constructor(*args: Any, **kwargs: Any) -> Any:
            called.append(name)
            return saved[name](*args, **kwargs)

        return constructor

    for name in names:
        setattr(torch, name, recording(name))
    try:
        step()
    finally:
        for name, constructor in saved.items():
            setattr(torch, name, constructor)
    return called


class _Declaring:
    """An observer that builds each launch's declaration and runs it (what the ledger's recording
    costs on top, less its bookkeeping)."""

    modelled_multiprocessors = 132
    modelled_capability = (9, 0)

    def observe_launch(self, name: str, kind: str, run: Any, declared: Any) -> None:
        run()

    def paused_block(self) -> Any:
        return contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-plans", action="store_true", help="every launch through kernel[grid]")
    parser.add_argument("--observe", action="store_true", help="an observer builds declarations")
    parser.add_argument("--cumulative-batch-norm", action="store_true", help="momentum=None")
    parser.add_argument("--broken-plans", action="store_true", help="plans drop a constexpr")
    arguments = parser.parse_args()
    compiled_launch.plans_enabled = not arguments.no_plans
    if arguments.broken_plans:
        make_plan = compiled_launch._plan

        def broken(*args: Any) -> Any:
            plan = make_plan(*args)
            plan.constants = plan.constants[:-1]
            return plan

        compiled_launch._plan = broken
    if arguments.observe:
        observer.observer = _Declaring()
    result: dict[str, Any] = {}
    channels = SHAPE[1]
    with host_cost.stub_launches():
        for backend in ("triton", "cuda"):
            layer = FusedPNNHConv(channels, channels, bias=False, norm="batch", backend=backend)
            if arguments.cumulative_batch_norm:
                layer.norm.momentum = None
            step = _step(layer)
            for _ in range(3):  # first calls compile, autotune and fill the launch plans
                step()
            result[backend] = {
                "python_calls": host_cost.python_calls(step),
                "frames_at_launch": _frames_at_launch(step),
                "syncs": _syncs(step),
                "foreign_tensors": _foreign_tensors(step),
            }
            if backend == "triton":
                result[backend]["plans_match_triton"] = _plans_match_triton(step)
        resnet = _step(ResNetLayer(channels))
        resnet()
        result["resnet-layer"] = {"python_calls": host_cost.python_calls(resnet)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
