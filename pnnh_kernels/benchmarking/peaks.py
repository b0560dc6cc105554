"""The machine's peaks, measured once per benchmark run rather than read from a datasheet."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Peaks:
    device: str
    # FLOP/s per dtype name ("float32", "bfloat16"): the faster of a large matmul and a large 3x3
    # convolution in that dtype. A result is measured against the peak of its own dtype (a bf16
    # step against an fp32 peak gave "fractions" of 2-3.5), and against the faster op: on a CPU
    # without native bf16 a bf16 matmul ran at 0.9 GFLOP/s where oneDNN's bf16 convolution ran at
    # 19 (2026-11-28, this project's 2-core machine), so a matmul-only "peak" was no peak.
    compute_flops: dict[str, float]
    copy_bytes_per_second: float  # read + write bytes/s of a large device-to-device copy
    notes: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def flops_for(self, dtype: torch.dtype) -> float:
        name = str(dtype).removeprefix("torch.")
        if name not in self.compute_flops:
            have = sorted(self.compute_flops)
            raise KeyError(f"dtype: no compute peak measured for {name} (have {have})")
        return self.compute_flops[name]


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
    """Compute peaks in float32 and bfloat16, each the faster of a matmul (8192^3 on a GPU, 1024^3 on
    a CPU) and a 3x3 convolution (channels_last; 256 channels, batch 64 at 56x56 on a GPU, batch 4
    at 32x32 on a CPU), and a large copy (1 GiB on a GPU, 64 MiB on a CPU). The float32 peaks on a
    GPU allow TF32, as the fp32 benchmarks' convolutions do (PyTorch's cuDNN default)."""
    if device.type == "cuda":
        size, copy_elements, conv_shape = 8192, 2**28, (64, 256, 56)
        synchronize = torch.cuda.synchronize
    else:
        size, copy_elements, conv_shape = 1024, 2**24, (4, 256, 32)

        def synchronize() -> None:
            return None

    flops: dict[str, float] = {}
    batch, channels, side = conv_shape
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        x = torch.randn(batch, channels, side, side, device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype)
        w = w.contiguous(memory_format=torch.channels_last)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
        try:
            matmul = 2.0 * size**3 / _best_seconds(lambda a=a, b=b: torch.mm(a, b), repeats, synchronize)
            conv_flops = 2.0 * batch * side * side * channels * channels * 9
            conv = conv_flops / _best_seconds(
                lambda x=x, w=w: F.conv2d(x, w, padding=1), repeats, synchronize
            )
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        flops[str(dtype).removeprefix("torch.")] = max(matmul, conv)
    source = torch.empty(copy_elements, device=device, dtype=torch.float32)
    target = torch.empty_like(source)
    copy = _best_seconds(lambda: target.copy_(source), repeats, synchronize)
    tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    return Peaks(
        device=str(device),
        compute_flops=flops,
        copy_bytes_per_second=2.0 * source.numel() * source.element_size() / copy,
        notes="the faster of a matmul and a 3x3 convolution"
        + ("; float32 with TF32 allowed" if tf32 else ""),
    )
