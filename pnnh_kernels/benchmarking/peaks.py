"""The machine's peaks, measured once per benchmark run rather than read from a datasheet."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Peaks:
    device: str
    # FLOP/s of a large matmul per dtype name ("float32", "bfloat16"): a result is measured against
    # the peak of its own dtype (a bf16 step against an fp32 peak gave "fractions" of 2-3.5).
    matmul_flops: dict[str, float]
    copy_bytes_per_second: float  # read + write bytes/s of a large device-to-device copy
    notes: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def flops_for(self, dtype: torch.dtype) -> float:
        name = str(dtype).removeprefix("torch.")
        if name not in self.matmul_flops:
            raise KeyError(
                f"dtype: no matmul peak measured for {name} (have {sorted(self.matmul_flops)})"
            )
        return self.matmul_flops[name]


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
    """Matmul peaks in float32 and bfloat16 (8192^3 on a GPU; 1024^3 on a CPU, where bf16 is
    emulated and slow) and a large copy (1 GiB on a GPU, 64 MiB on a CPU). The float32 peak on a GPU
    allows TF32, as the fp32 benchmarks' convolutions do (PyTorch's cuDNN default)."""
    if device.type == "cuda":
        size, copy_elements = 8192, 2**28
        synchronize = torch.cuda.synchronize
    else:
        size, copy_elements = 1024, 2**24

        def synchronize() -> None:
            return None

    flops: dict[str, float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
        try:
            seconds = _best_seconds(lambda a=a, b=b: torch.mm(a, b), repeats, synchronize)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        flops[str(dtype).removeprefix("torch.")] = 2.0 * size**3 / seconds
    source = torch.empty(copy_elements, device=device, dtype=torch.float32)
    target = torch.empty_like(source)
    copy = _best_seconds(lambda: target.copy_(source), repeats, synchronize)
    tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    return Peaks(
        device=str(device),
        matmul_flops=flops,
        copy_bytes_per_second=2.0 * source.numel() * source.element_size() / copy,
        notes="float32 with TF32 allowed" if tf32 else "",
    )
