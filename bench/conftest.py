"""Fixtures of the benchmark suite: device, the machine's peaks, telemetry, missing backends.

``pytest bench/ --benchmark-only`` runs the full shapes on a GPU and small ones on a CPU. Each
benchmark times with ``benchmark.pedantic``: a setup that rotates the inputs among buffers larger
than L2 (untimed), warm-up rounds that absorb compilation and autotuning, and a timed call that
ends with a device synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from pnnh_kernels.benchmarking import telemetry
from pnnh_kernels.benchmarking.peaks import Peaks, measure_peaks

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
ROUNDS = 20 if ON_GPU else 3
WARMUP_ROUNDS = 3 if ON_GPU else 1
L2_BYTES = 64 * 2**20  # larger than an H100's (50 MiB) or H200's L2

_missing: dict[str, str] = {}


def note_missing(name: str, reason: str) -> None:
    """Record an implementation this machine cannot benchmark, and skip the benchmark saying why."""
    _missing[name] = reason
    pytest.skip(f"{name} missing: {reason}")


def pytest_benchmark_update_json(config: Any, benchmarks: Any, output_json: dict) -> None:
    """The implementations this machine could not benchmark, with the reason, for the report."""
    output_json["missing_implementations"] = dict(sorted(_missing.items()))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _missing:
        terminalreporter.section("implementations missing on this machine")
        for name, reason in sorted(_missing.items()):
            terminalreporter.write_line(f"{name}: {reason}")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def peaks() -> Peaks:
    return measure_peaks(DEVICE)


def synchronize() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def rotating(make: Callable[[], torch.Tensor]) -> Callable[[], tuple[tuple, dict]]:
    """A pedantic ``setup`` that hands out one of enough buffers to exceed L2, in turn."""
    first = make()
    count = max(2, -(-2 * L2_BYTES // (first.numel() * first.element_size()))) if ON_GPU else 2
    buffers = [first] + [make() for _ in range(count - 1)]
    state = {"next": 0}

    def setup() -> tuple[tuple, dict]:
        x = buffers[state["next"] % len(buffers)]
        state["next"] += 1
        synchronize()
        return (x,), {}

    return setup


@pytest.fixture
def run_benchmark(benchmark: Any, peaks: Peaks) -> Iterator[Callable[..., float]]:
    """Time ``step`` with rotating inputs; record telemetry and the peaks; return the median (s)."""
    before = telemetry.snapshot() if ON_GPU else {"nvml": "absent: no GPU"}

    def run(step: Callable[[torch.Tensor], Any], setup: Callable[[], tuple[tuple, dict]]) -> float:
        def timed(x: torch.Tensor) -> None:
            step(x)
            synchronize()

        benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
        benchmark.extra_info["peaks"] = peaks.as_dict()
        benchmark.extra_info["device_name"] = torch.cuda.get_device_name(DEVICE) if ON_GPU else "cpu"
        benchmark.extra_info["torch"] = torch.__version__
        return benchmark.stats.stats.median

    yield run
    after = telemetry.snapshot() if ON_GPU else before
    telemetry.record(benchmark.extra_info, before, after)
