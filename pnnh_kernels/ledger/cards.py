"""The GPUs a ledger's roofline times are given for: datasheet peaks, in this one place.

Dense (no sparsity) tensor-core rates for 16-bit inputs and the HBM bandwidth, from NVIDIA's data
sheets (H100 SXM5 80 GB; A100 SXM4 80 GB; H200 SXM 141 GB). They are ceilings no kernel reaches:
measured ones on the one card this project has used (an H200: 777 TFLOP/s bf16 matmul and 4.08 TB/s
device copy, docs/perf/bench_report) are lower. A roofline time is therefore a floor, useful to
compare two dataflows, not a prediction of either's time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Card:
    name: str
    bytes_per_second: float  # HBM bandwidth
    flops_16bit: float  # dense bf16/fp16 tensor-core FLOP/s
    flops_32bit: float  # fp32 FLOP/s without tensor cores (fp32 convolutions may use TF32 instead)
    multiprocessors: int
    capability: tuple[int, int]  # the compute capability its kernels compile for

    def seconds(self, bytes_moved: float, flops: float, dtype_bits: int = 16) -> float:
        """The roofline time of one launch: the larger of its memory and its arithmetic time."""
        rate = self.flops_16bit if dtype_bits <= 16 else self.flops_32bit
        return max(bytes_moved / self.bytes_per_second, flops / rate)


CARDS = {
    "H100": Card("H100 SXM", 3.35e12, 989e12, 67e12, 132, (9, 0)),
    "A100": Card("A100 SXM 80GB", 2.039e12, 312e12, 19.5e12, 108, (8, 0)),
    "H200": Card("H200 SXM", 4.8e12, 989e12, 67e12, 132, (9, 0)),
}
DEFAULT_CARDS = ("H100", "A100")
# The card whose size the launchers assume when a ledger runs on meta tensors (where a launcher
# sizes a split reduction to the number of multiprocessors).
MODELLED_CARD = CARDS["H100"]
