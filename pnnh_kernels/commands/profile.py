"""``pnnh profile``: exactly one warmed-up step of a layer or a training step, for a profiler.

The step runs between ``cudaProfilerStart`` and ``cudaProfilerStop`` (``torch.cuda.profiler``), so
``nsys profile --capture-range=cudaProfilerApi`` and ``ncu --profile-from-start off`` record that
step and nothing of the set-up, compilation or autotuning before it. NVTX ranges name each PNNH op
(see docs/profiling.md). On a machine without a GPU it runs the same step without a profiler range,
which is useful only to check the command line.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from pnnh_kernels import FusedPNNHConv, profiling
from pnnh_kernels.backends import check_backend_name
from pnnh_kernels.models import resnet18, resnet34, resnet50
from pnnh_kernels.shapes import image_shape
from pnnh_kernels.validation import check_positive_int

MODELS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--layer",
        default="256x64x32x32",
        help="NxCxHxW input of one 3x3 C -> C FusedPNNHConv with BatchNorm",
    )
    target.add_argument("--model", choices=list(MODELS), help="profile a training step of this model")
    parser.add_argument("--variant", default="pnnh", choices=["pnnh", "plain", "residual"])
    parser.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"])
    parser.add_argument("--batch", type=int, default=256, help="batch of --model")
    parser.add_argument("--backend", default="auto", help="auto, torch, triton or cuda")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--mode", default="train", choices=["forward", "train"])
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the profiled one")


def parse_layer(text: str) -> tuple[int, int, int, int]:
    """``--layer NxCxHxW`` (the one shape syntax, pnnh_kernels.shapes), or a ValueError saying so."""
    return image_shape(text, "--layer")


def check(args: argparse.Namespace) -> None:
    """The arguments, before anything is built (pnnh_kernels.commands: one-line usage errors)."""
    if args.model is None:
        parse_layer(args.layer)
    check_positive_int("--batch", args.batch)
    if args.warmup < 0:
        raise ValueError(f"--warmup: expected a non-negative int, got {args.warmup}")
    check_backend_name(args.backend)


def _layer_step(args: argparse.Namespace, device: torch.device):
    batch, channels, height, width = parse_layer(args.layer)
    dtype = DTYPES[args.dtype]
    layer = FusedPNNHConv(channels, channels, bias=False, norm="batch", backend=args.backend)
    # Eval BatchNorm: the mode in which the fused backends run their own kernels.
    layer = layer.to(device, dtype, memory_format=torch.channels_last).eval()
    x = torch.randn(batch, channels, height, width, device=device, dtype=dtype).relu()
    x = x.to(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    shape = f"{batch}x{channels}x{height}x{width}"
    print(f"layer {shape} {args.dtype}, backend in use: {layer.backend_in_use}")

    def step() -> None:
        if args.mode == "forward":
            with torch.no_grad():
                layer(x)
        else:
            layer(x.detach().requires_grad_(True)).backward(grad)

    return step


def _model_step(args: argparse.Namespace, device: torch.device):
    classes, size = (10, 32) if args.stem == "cifar" else (1000, 224)
    model: nn.Module = MODELS[args.model](variant=args.variant, stem=args.stem, num_classes=classes)
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(args.batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (args.batch,), device=device)
    print(f"{args.model} ({args.variant}, {args.stem} stem) training step, batch {args.batch}")

    def step() -> None:
        with torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32"):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def run(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step = _model_step(args, device) if args.model else _layer_step(args, device)
    for _ in range(args.warmup):
        step()
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    profiling.enable_nvtx(on_gpu)
    start = time.perf_counter()
    with profiling.op_range("pnnh profile step"):
        step()
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    profiling.enable_nvtx(False)
    where = "between cudaProfilerStart/Stop" if on_gpu else "on the CPU, no profiler range"
    print(f"profiled step: {1e3 * (time.perf_counter() - start):.2f} ms ({where})")
