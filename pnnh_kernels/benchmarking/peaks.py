"""The machine's peaks, measured once per benchmark run rather than read from a datasheet."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Peaks:
    device: str
    matmul_dtype: str
    matmul_flops: float  # FLOP/s of a large matmul
    copy_bytes_per_second: float  # read + write bytes/s of a large device-to-device copy

    def as_dict(self) -> dict:
        return asdict(self)


def _best_seconds(fn, repeats: int, synchronize) -> float:
    fn()
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def measure_peaks(device: torch.device, repeats: int = 5) -> Peaks:
    """bf16 matmul (8192^3) and a 1 GiB copy on a GPU; fp32 matmul (2048^3) and a 64 MiB copy on
    a CPU, where a bf16 matmul is not the fast path (so CPU roofline fractions of bf16 ops are
    against the fp32 peak)."""
    if device.type == "cuda":
        size, dtype, copy_elements = 8192, torch.bfloat16, 2**28
        synchronize = torch.cuda.synchronize
    else:
        size, dtype, copy_elements = 2048, torch.float32, 2**24

        def synchronize() -> None:
            return None

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    matmul = _best_seconds(lambda: torch.mm(a, b), repeats, synchronize)
    source = torch.empty(copy_elements, device=device, dtype=torch.float32)
    target = torch.empty_like(source)
    copy = _best_seconds(lambda: target.copy_(source), repeats, synchronize)
    return Peaks(
        device=str(device),
        matmul_dtype=str(dtype).removeprefix("torch."),
        matmul_flops=2.0 * size**3 / matmul,
        copy_bytes_per_second=2.0 * source.numel() * source.element_size() / copy,
    )
