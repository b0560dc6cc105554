"""GPU timing table of FusedPNNHConv against the cuDNN ResNet layer it replaces (run by device_check.sh).

Per ResNet-18 CIFAR stage shape (batch 256, bf16, channels_last), the median of CUDA-event timings
of the forward and the forward + backward of:

- ``triton``: FusedPNNHConv(C, C, norm="batch", coder C/2), Triton backend;
- ``cuda``: the same layer on the CUDA C++ backend, when its extension is built (a failure there is
  recorded in the table and does not stop the other rows);
- ``torch``: the same layer on the eager torch backend;
- ``cudnn``: relu(bn(conv3x3(x)) + x), the ResNet layer in PyTorch (cuDNN).

Rows with BatchNorm in eval mode (folded into the kernel) and in training mode ("train-BN": batch
statistics, running-statistics update), and the ViT-S MLP rows (FusedPNNHLinear against
nn.Linear + GELU + residual add). Inputs rotate among buffers larger than L2; warm-up runs
(compilation, autotuning) are not timed.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from torch import nn

from bench.implementations import ResNetLayer
from pnnh_kernels import FusedPNNHConv, FusedPNNHLinear
from pnnh_kernels import cuda as cuda_backend

SHAPES = [(64, 32), (128, 16), (256, 8), (512, 4)]  # (channels, spatial size), batch 256


def time_ms(step: Callable[[torch.Tensor], None], inputs: list[torch.Tensor], repeats: int) -> float:
    for x in inputs:  # warm-up: compilation and autotuning happen here
        step(x)
    torch.cuda.synchronize()
    times = []
    for index in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        x = inputs[index % len(inputs)]
        start.record()
        step(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(
    shape: str,
    name: str,
    layer: nn.Module,
    inputs: list[torch.Tensor],
    grads: torch.Tensor,
    repeats: int,
) -> dict:
    def forward(x: torch.Tensor) -> None:
        with torch.no_grad():
            layer(x)

    def training(x: torch.Tensor) -> None:
        layer(x.detach().requires_grad_(True)).backward(grads)

    try:
        row = {
            "shape": shape,
            "layer": name,
            "forward_ms": time_ms(forward, inputs, repeats),
            "forward_backward_ms": time_ms(training, inputs, repeats),
        }
    except Exception as error:  # one failing backend must not lose the others' timings
        row = {"shape": shape, "layer": name, "error": f"{type(error).__name__}: {error}"[:300]}
    print(row, flush=True)
    return row


class ResidualMLP(nn.Module):
    """A ViT MLP block's body: x + fc2(gelu(fc1(x)))."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


def vit_mlp_rows(device: torch.device, dtype: torch.dtype, repeats: int) -> list[dict]:
    """ViT-S MLP (197 tokens x batch 128, 384 -> 1536 -> 384): two FusedPNNHLinear layers (coders
    untied, the residual add replaced by the coders) against nn.Linear + GELU + residual add."""
    tokens, width, hidden = 197 * 128, 384, 1536
    inputs = [torch.randn(tokens, width, device=device, dtype=dtype) for _ in range(4)]
    grads = torch.randn(tokens, width, device=device, dtype=dtype)
    rows = []
    for backend in (*fused_backends(), "torch"):
        torch.manual_seed(0)
        pnnh = nn.Sequential(
            FusedPNNHLinear(width, hidden, backend=backend),
            FusedPNNHLinear(hidden, width, activation=None, backend=backend),
        ).to(device, dtype)
        rows.append(measure("ViT-S MLP", f"pnnh-{backend}", pnnh, inputs, grads, repeats))
    baseline = ResidualMLP(width, hidden).to(device, dtype)
    rows.append(measure("ViT-S MLP", "cudnn", baseline, inputs, grads, repeats))
    return rows


def fused_backends() -> tuple[str, ...]:
    if cuda_backend.is_available():
        return ("triton", "cuda")
    print(f"cuda backend skipped: {cuda_backend.why_unavailable()}")
    return ("triton",)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("docs/perf"))
    args = parser.parse_args()
    device = torch.device("cuda")
    dtype = torch.bfloat16
    l2_bytes = 64 * 2**20
    rows = []
    for channels, size in SHAPES:
        shape = (args.batch, channels, size, size)
        one = args.batch * channels * size * size * 2
        buffers = max(2, -(-2 * l2_bytes // one))
        inputs = [
            torch.randn(shape, device=device, dtype=dtype).relu().to(memory_format=torch.channels_last)
            for _ in range(buffers)
        ]
        grads = torch.randn(shape, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        torch.manual_seed(0)
        fused = FusedPNNHConv(channels, channels, norm="batch", backend="triton")
        fused = fused.to(device, dtype, memory_format=torch.channels_last).eval()
        eager = FusedPNNHConv(channels, channels, norm="batch", backend="torch")
        eager.load_state_dict(fused.state_dict())
        eager = eager.to(device, dtype, memory_format=torch.channels_last).eval()
        cudnn = ResNetLayer(channels).to(device, dtype, memory_format=torch.channels_last).eval()
        layers = [("triton", fused), ("torch", eager), ("cudnn", cudnn)]
        if "cuda" in fused_backends():
            native = FusedPNNHConv(channels, channels, norm="batch", backend="cuda")
            native.load_state_dict(fused.state_dict())
            native = native.to(device, dtype, memory_format=torch.channels_last).eval()
            layers.insert(1, ("cuda", native))
        label = f"{channels}x{size}x{size}"
        for name, layer in layers:
            rows.append(measure(label, name, layer, inputs, grads, args.repeats))
        # Training-mode BatchNorm (batch statistics, running-statistics update) in every layer.
        for name, layer in layers:
            rows.append(measure(f"{label} train-BN", name, layer.train(), inputs, grads, args.repeats))
    rows += vit_mlp_rows(device, dtype, args.repeats)

    name = torch.cuda.get_device_name(device)
    driver = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else "n/a"
    today = datetime.date.today().isoformat()
    lines = [
        f"# FusedPNNHConv timings on {name}, {today}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}, CUDA driver {driver}; batch "
        f"{args.batch}, bf16, channels_last, BatchNorm in eval mode (training mode in the train-BN "
        f"rows), median of {args.repeats} "
        "CUDA-event timings after warm-up, inputs rotating among buffers larger than L2. "
        "Written by bench/device_check.sh.",
        "",
        "| shape | layer | forward (ms) | forward+backward (ms) | fwd+bwd vs PyTorch layer |",
        "|---|---|---|---|---|",
    ]
    reference = {
        row["shape"]: row for row in rows if row["layer"] == "cudnn"
    }  # "cudnn": PyTorch's layer
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['shape']} | {row['layer']} | failed: {row['error']} | | |")
            continue
        ratio = row["forward_backward_ms"] / reference[row["shape"]]["forward_backward_ms"]
        lines.append(
            f"| {row['shape']} | {row['layer']} | {row['forward_ms']:.3f} | "
            f"{row['forward_backward_ms']:.3f} | {ratio:.2f}x |"
        )
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    path = args.out / f"pnnh_conv_{slug}_{today}.md"
    path.write_text(table)
    print(f"\nwritten to {path}\n\n{table}")


if __name__ == "__main__":
    main()
