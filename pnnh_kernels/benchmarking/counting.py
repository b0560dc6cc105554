"""FLOPs and minimal memory traffic of the benchmarked ops, counted from their shapes, and the
roofline floor they imply.

Conventions (stated so that numbers are comparable, not because they are the only ones):

- A multiply-add is 2 FLOPs. Elementwise work (bias, BatchNorm, ReLU, the residual add) is not
  counted: it is bandwidth, not compute.
- "forward+backward" is 3x the forward FLOPs (dX and dW each cost one forward). The fused PNNH
  backward also recomputes the code; that recomputation is the implementation's choice, not the
  op's cost, so it is not counted.
- Minimal bytes: every tensor the op must read or write, once: the forward reads x and the
  parameters and writes y; the backward reads dy, x and y (the ReLU's mask) and the parameters,
  writes dx and the parameter gradients. Intermediates (the conv output, the code) cost nothing in
  this floor: an ideal fused kernel keeps them on chip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

MODES = ("forward", "forward+backward")


@dataclass(frozen=True)
class LayerShape:
    batch: int
    channels: int
    size: int  # square feature map, the layer keeps channels and size (stride 1, 3x3, "same")

    def __str__(self) -> str:
        return f"{self.batch}x{self.channels}x{self.size}x{self.size}"


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


def conv_layer_cost(
    shape: LayerShape, element_bytes: int, mode: str, code_channels: int = 0, kernel: int = 3
) -> Cost:
    """One 3x3 C -> C layer (+ BN + ReLU, + coder of ``code_channels`` when > 0)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    pixels = shape.batch * shape.size * shape.size
    c = shape.channels
    macs = pixels * c * c * kernel * kernel + pixels * 2 * c * code_channels
    parameters = c * c * kernel * kernel + c * code_channels + code_channels + 2 * c
    activation = pixels * c * element_bytes
    forward = Cost(2.0 * macs, 2.0 * activation + parameters * element_bytes)
    if mode == "forward":
        return forward
    backward = Cost(4.0 * macs, 4.0 * activation + 2.0 * parameters * element_bytes)
    return forward + backward


def roofline_seconds(cost: Cost, peak_flops: float, peak_bytes_per_second: float) -> float:
    """The time below which no implementation can go: compute-bound or bandwidth-bound."""
    return max(cost.flops / peak_flops, cost.bytes / peak_bytes_per_second)


def achieved(cost: Cost, seconds: float, peak_flops: float, peak_bytes_per_second: float) -> dict:
    """What goes into a benchmark's extra_info. ``peak_flops``: the peak of the step's own dtype.

    A fraction of a peak cannot exceed 1: a result above it is a measurement error (a wrong peak,
    a cost model that counts too much, a timer that missed work), recorded as
    ``roofline_error`` with ``roofline_fraction`` None, never printed as a fraction."""
    floor = roofline_seconds(cost, peak_flops, peak_bytes_per_second)
    fraction: Optional[float] = floor / seconds
    error = None
    if floor / seconds > 1.0:
        error = (
            f"{fraction:.2f}x the roofline: the step ran faster than this run's measured peaks "
            "allow, so the peak, the cost model or the timing is wrong"
        )
        fraction = None
    return {
        "flops": cost.flops,
        "bytes": cost.bytes,
        "tflops_per_s": cost.flops / seconds / 1e12,
        "gb_per_s": cost.bytes / seconds / 1e9,
        "roofline_floor_s": floor,
        "roofline_fraction": fraction,
        "roofline_error": error,
    }
