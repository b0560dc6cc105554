"""Layer-level benchmarks: FusedPNNHConv per backend against the ResNet layer and block it replaces.

Groups: one per (shape, dtype, mode), so ``--benchmark-group-by=group`` compares the
implementations of one configuration side by side. Every result's extra_info holds the op's FLOPs
and minimal bytes, the achieved TFLOP/s and GB/s and the fraction of the roofline floor, against
peaks measured on this machine in this run.
"""

from __future__ import annotations

import pytest
import torch

from bench.conftest import DEVICE, ON_GPU, note_missing, rotating
from bench.implementations import PNNH_BACKENDS, backend_of, build, unavailable
from pnnh_kernels.benchmarking.counting import LayerShape, achieved, conv_layer_cost
from pnnh_kernels.ledger import step_ledger

if ON_GPU:
    SHAPES = [
        # ResNet-18/34 stages, CIFAR (batch 256) and ImageNet (batch 64)
        LayerShape(256, 64, 32),
        LayerShape(256, 128, 16),
        LayerShape(256, 256, 8),
        LayerShape(256, 512, 4),
        LayerShape(64, 64, 56),
        LayerShape(64, 128, 28),
        LayerShape(64, 256, 14),
        LayerShape(64, 512, 7),
    ]
else:
    # The CIFAR stage shapes at batch 4: the same per-image work, minutes instead of hours.
    SHAPES = [
        LayerShape(4, 64, 32),
        LayerShape(4, 128, 16),
        LayerShape(4, 256, 8),
        LayerShape(4, 512, 4),
    ]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYERS = ["resnet-layer", *(f"pnnh-{backend}" for backend in PNNH_BACKENDS)]
BLOCKS = ["resnet-block", *(f"pnnh-block-{backend}" for backend in PNNH_BACKENDS)]


# (mode, BatchNorm): inference, a training step with BatchNorm in eval mode (folded into the fused
# kernels), and a training step with training BatchNorm (batch statistics: the setting of issue #13).
STEPS = [("forward", "eval"), ("forward+backward", "eval"), ("forward+backward", "train")]


def ledger_info(name: str, shape: LayerShape, dtype: torch.dtype, mode: str, norm: str) -> dict:
    """The traffic ledger's count of the same step (pnnh_kernels.ledger, meta tensors): launches and
    bytes beside the measured time. None for torch.compile, whose launches the ledger cannot see."""
    backend = backend_of(name)
    if backend == "torch-compile":
        return {"ledger_launches": None, "ledger_bytes": None}
    kind = "block" if "block" in name else "layer"
    step = f"pnnh-{kind}" if backend is not None else f"resnet-{kind}"
    ledger = step_ledger(
        step, shape.batch, shape.channels, shape.size, backend=backend or "torch", dtype=dtype,
        training_norm=norm == "train", backward=mode != "forward",
    )  # fmt: skip
    return {
        "ledger_launches": len(ledger.launches),
        "ledger_bytes": ledger.bytes,
        "ledger_read": ledger.read,
        "ledger_written": ledger.written,
        "ledger_flops": ledger.flops,
    }


def _bench(
    run_benchmark,
    benchmark,
    name: str,
    shape: LayerShape,
    dtype_name: str,
    mode: str,
    layers: int,
    norm: str = "eval",
):
    dtype = DTYPES[dtype_name]
    backend = backend_of(name)
    if backend is not None:
        reason = unavailable(backend, DEVICE, dtype)
        if reason:
            note_missing(name, reason)
    module = build(name, shape.channels, DEVICE, dtype).train(norm == "train")
    grad = torch.randn(shape.batch, shape.channels, shape.size, shape.size, device=DEVICE, dtype=dtype)
    grad = grad.to(memory_format=torch.channels_last)

    def make() -> torch.Tensor:
        x = torch.randn(shape.batch, shape.channels, shape.size, shape.size, device=DEVICE, dtype=dtype)
        return x.relu().to(memory_format=torch.channels_last)

    if mode == "forward":

        def step(x: torch.Tensor) -> None:
            with torch.no_grad():
                module(x)
    else:

        def step(x: torch.Tensor) -> None:
            module(x.detach().requires_grad_(True)).backward(grad)

    benchmark.group = f"{shape} {dtype_name} {mode}" + (" train-BN" if norm == "train" else "")
    seconds = run_benchmark(step, rotating(make))
    code_channels = shape.channels // 2 if backend is not None else 0
    one_layer = conv_layer_cost(shape, dtype.itemsize, mode, code_channels)
    cost = one_layer
    for _ in range(layers - 1):
        cost = cost + one_layer
    peaks = benchmark.extra_info["peaks"]
    own_peak = peaks["compute_flops"][str(dtype).removeprefix("torch.")]  # the step's own dtype
    benchmark.extra_info.update(
        {
            "kind": "layer" if layers == 1 else "block",
            "implementation": name,
            "shape": str(shape),
            "dtype": dtype_name,
            "mode": mode,
            "norm": norm,
            **achieved(cost, seconds, own_peak, peaks["copy_bytes_per_second"]),
            **ledger_info(name, shape, dtype, mode, norm),
        }
    )


STEP_IDS = [f"{mode}-{norm}BN" for mode, norm in STEPS]


@pytest.mark.parametrize(("mode", "norm"), STEPS, ids=STEP_IDS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", LAYERS)
def test_layer(run_benchmark, benchmark, name, shape, dtype_name, mode, norm):
    _bench(run_benchmark, benchmark, name, shape, dtype_name, mode, layers=1, norm=norm)


@pytest.mark.parametrize(("mode", "norm"), STEPS, ids=STEP_IDS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", BLOCKS)
def test_block(run_benchmark, benchmark, name, shape, dtype_name, mode, norm):
    _bench(run_benchmark, benchmark, name, shape, dtype_name, mode, layers=2, norm=norm)
