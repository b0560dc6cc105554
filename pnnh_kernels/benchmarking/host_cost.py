"""The host cost of a training step, measured on a CPU: every fused launch goes down its real Python
path and ends in a launcher that does nothing.

Under :func:`stub_launches` the Triton backend runs its launchers on CPU tensors with Triton's
active driver replaced by a stub (an sm_90 target whose compiled kernels are stand-ins that launch
nothing), so that everything Triton does in Python on a launch still runs: ``kernel[grid]``'s
binder, specialisation, cache key and grid on a first call, the launch plan's lookup and the call
into the compiled kernel's launcher on the next (pnnh_kernels.triton.compiled_launch). The CUDA
backend runs its launchers onto a stand-in for the extension whose entry points do nothing (a
Python call where the real one crosses pybind11: about a microsecond less per launch). The buffers
a step allocates are real CPU allocations, from a heap that keeps what is freed (glibc's mallopt:
no mmap/munmap per multi-megabyte buffer, as PyTorch's CUDA caching allocator keeps its blocks; the
setting stays for the rest of the process).

What this measures is the host's side of a step on a GPU machine less the driver's own launch
cost (a few µs a kernel) and with CPU ``torch.empty`` in place of the caching allocator. The
ResNet layer it is compared with runs its eager op sequence on CPU tensors of one pixel per image
(:func:`eager_proxy_shape`): PyTorch's dispatch, autograd and its CPU kernels' setup, with compute
small enough not to matter; a lower bound of its cost behind cuDNN, which adds its own heuristics.
On a GPU the benchmark times the enqueue behind a long-running kernel instead (bench/test_host_cost.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pnnh_kernels.cuda.launch import ENTRY_POINTS, DeclaredTiles

STUB_BACKENDS = ("triton", "cuda")


class _StubCompiled:
    """A compiled kernel's stand-in: the attributes a launch reads, a launcher that does nothing."""

    function = 0
    packed_metadata = None

    def run(self, *args: Any) -> None:
        return None

    def launch_metadata(self, *args: Any) -> None:
        return None


class _StubDriver:
    """Triton's active driver on a machine without a GPU: device 0, stream 0, an sm_90 target."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Any = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self) -> Any:
        return torch.cuda

    def get_benchmarker(self) -> Callable[..., list[float]]:
        # The autotuner's trials: every candidate "takes" the same time, so it keeps the first
        # (the shape's heuristic default, as on a GPU without trials).
        def benchmark(kernel_call: Callable[[], Any], quantiles: Any = None, **_: Any) -> list[float]:
            kernel_call()
            return [1.0, 1.0, 1.0]

        return benchmark


class _StubCudaExtension(DeclaredTiles):
    """The CUDA extension as the launchers call it: the headers' tile sizes (DeclaredTiles) and
    entry points that do nothing."""

    def _launch(self, *args: Any) -> None:
        return None


for _entry in ENTRY_POINTS:  # class attributes: tests/host_probe.py swaps them for spies
    setattr(_StubCudaExtension, _entry, _StubCudaExtension._launch)


def _triton_kernels() -> list[Any]:
    from pnnh_kernels.triton import batch_norm_kernels, kernels

    return [
        value
        for module in (kernels, batch_norm_kernels)
        for value in vars(module).values()
        if hasattr(value, "device_caches")
    ]


def _stub_compile(self: Any, key: Any, signature: Any, device: Any, *args: Any) -> _StubCompiled:
    compiled = _StubCompiled()
    self.device_caches[device][0][key] = compiled
    return compiled


def _forget_compiled() -> None:
    """Drop every compiled kernel, launch plan and autotuning result made under the stub."""
    from pnnh_kernels.triton import compiled_launch, pnnh_conv, pnnh_conv_config

    compiled_launch.clear()
    pnnh_conv.clear_sites()
    pnnh_conv_config.tuned_kernels.clear()
    for kernel in _triton_kernels():
        kernel.device_caches.clear()


@contextlib.contextmanager
def stub_launches() -> Iterator[None]:
    """Run the fused backends on CPU tensors down to launchers that do nothing (see the module).

    Refused where a GPU is present (a stand-in compiled kernel must never meet a real launch) and
    under ``TRITON_INTERPRET=1`` (the kernels are then interpreted, not compiled).
    """
    if torch.cuda.is_available():
        raise RuntimeError("stub_launches: a GPU is present; time its real launches instead")
    from pnnh_kernels.backends import backend_named, register_backend
    from pnnh_kernels.cuda import launch as cuda_launch
    from pnnh_kernels.triton import interpreter_enabled, triton_installed

    if triton_installed() and interpreter_enabled():
        raise RuntimeError("stub_launches: unset TRITON_INTERPRET (the kernels must be compiled ones)")
    real = {name: backend_named(name) for name in STUB_BACKENDS if _registered(name)}
    _keep_freed_memory()
    with contextlib.ExitStack() as stack:
        for _name, backend in real.items():
            register_backend(dataclasses.replace(backend, unavailable_reason=lambda *_: None))
            stack.callback(register_backend, backend)
        stack.enter_context(cuda_launch.emulated(_StubCudaExtension()))
        if "triton" in real:
            from triton.runtime import driver

            from pnnh_kernels.triton import pnnh_conv_config

            # Split weight gradients as on an H100 (132 multiprocessors): the same launches.
            stack.callback(setattr, pnnh_conv_config, "STUB_MULTIPROCESSORS", None)
            pnnh_conv_config.STUB_MULTIPROCESSORS = 132
            from triton.runtime.jit import JITFunction

            previous_driver, previous_compile = driver._active, JITFunction._do_compile
            driver.set_active(_StubDriver())
            JITFunction._do_compile = _stub_compile
            stack.callback(setattr, driver, "_active", previous_driver)
            stack.callback(setattr, JITFunction, "_do_compile", previous_compile)
            stack.callback(_forget_compiled)
            _forget_compiled()
        yield


def _keep_freed_memory() -> None:
    """glibc: serve large allocations from the heap and never trim it, so that a step's buffers
    cost what a caching allocator's do instead of a system call each. No-op elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)


def _registered(name: str) -> bool:
    from pnnh_kernels.backends import registered_backends

    return name in registered_backends()


def eager_proxy_shape(batch: int, channels: int, size: int) -> tuple[int, int, int]:
    """(batch, channels, size) of the eager baseline's CPU proxy: two images of one pixel and eight
    channels, the same op sequence as at the real shape with negligible compute."""
    del batch, channels, size  # the host cost of an eager step does not depend on them on a GPU
    return 2, 8, 1


def host_time(step: Callable[[], Any], setup: Callable[[], Any] = lambda: None) -> float:
    """Thread CPU time of one call of ``step`` after an untimed ``setup`` (µs). Thread time, so that
    other threads (BLAS pools) and the other core's load do not count."""
    setup()
    start = time.thread_time_ns()
    step()
    return (time.thread_time_ns() - start) / 1e3


def python_calls(step: Callable[[], Any]) -> int:
    """Python function calls (and calls of builtins from Python) during one call of ``step``: a
    deterministic count of host work, for a budget test that does not time anything."""
    count = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        step()
    finally:
        sys.setprofile(previous)
    return count - 1  # sys.setprofile's own return is reported as a c_call


def format_results(results: dict[str, Any]) -> str:
    """A Markdown table of bench/test_host_cost.py's rows from pytest-benchmark's JSON: host time
    of each side (median, p20-p80 and minimum, µs), their ratios, and on a GPU the graph-replay
    device time and eager wall time of each side."""
    rows = [b for b in results.get("benchmarks", []) if "host_ratio" in b.get("extra_info", {})]
    if not rows:
        raise ValueError("no host-cost rows (bench/test_host_cost.py) in these results")
    first = rows[0]["extra_info"]
    lines = [
        f"Device: {first['device_name']}; torch {first['torch']}; {first['method']}.",
        "",
        "| step | PNNH host µs: median (p20-p80), min | baseline host µs: median (p20-p80), min | "
        "ratio of medians | ratio of minima | baseline |",
        "|---|---|---|---|---|---|",
    ]
    gpu = "pnnh_device_us_graph_replay" in first
    for row in rows:
        info = row["extra_info"]
        ratio = f"{info['host_ratio']:.2f}"
        if "host_ratio_whole_step" in info:
            ratio += (
                f" (whole step {info['host_ratio_whole_step']:.2f}: the head's "
                f"{info['head_host_us_median']:.0f} µs added to both sides)"
            )
        minima = info.get("host_ratio_min")
        lines.append(
            f"| {row['name'].removeprefix('test_')} | {info['pnnh_host_us_median']:.0f} "
            f"({info['pnnh_host_us_p20']:.0f}-{info['pnnh_host_us_p80']:.0f}), "
            f"{info.get('pnnh_host_us_min', float('nan')):.0f} | "
            f"{info['baseline_host_us_median']:.0f} ({info['baseline_host_us_p20']:.0f}-"
            f"{info['baseline_host_us_p80']:.0f}), {info.get('baseline_host_us_min', float('nan')):.0f}"
            f" | {ratio} | {'-' if minima is None else f'{minima:.2f}'} | {info['baseline']} |"
        )
    if gpu:
        lines += [
            "",
            "| step | PNNH device µs (graph replay) | baseline device µs | PNNH eager wall µs | "
            "baseline eager wall µs |",
            "|---|---|---|---|---|",
        ]
        for row in rows:
            info = row["extra_info"]
            lines.append(
                f"| {row['name'].removeprefix('test_')} | {info['pnnh_device_us_graph_replay']:.0f} | "
                f"{info['baseline_device_us_graph_replay']:.0f} | {info['pnnh_eager_wall_us']:.0f} | "
                f"{info['baseline_eager_wall_us']:.0f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description="Markdown table of bench/test_host_cost.py's JSON")
    parser.add_argument("results", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    path = parser.parse_args().results
    try:
        print(format_results(json.loads(path.read_text())), end="")
    except (OSError, ValueError) as error:
        parser.error(f"{path}: {error}")
