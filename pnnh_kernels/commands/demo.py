"""``pnnh demo``: plain, residual and PNNH nets of one depth trained on real digits, side by side.

The paper's central claim is that deep plain nets stop learning because their ReLUs destroy the
input, that residual nets do not, and that a plain net with a coder (PNNH) does not either. This demo
trains the three variants of :func:`pnnh_kernels.models.deep_cnn` with the same recipe on
scikit-learn's digits and prints what it measured, whichever way it falls, followed by the parameter
counts of the ResNet models.
"""

from __future__ import annotations

import argparse
import time

import torch

from pnnh_kernels.models import VARIANTS, count_parameters, deep_cnn, parameter_breakdown
from pnnh_kernels.models.resnet import resnet18, resnet34, resnet50
from pnnh_kernels.training.digits import load_digits_split, train_classifier


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, default=64, help="3x3 layers in the body (default 64)")
    parser.add_argument("--width", type=int, default=16, help="channels per layer (default 16)")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05, help="one-cycle peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--skip-resnets", action="store_true", help="do not print the ResNet parameter table"
    )


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def depth_table(args: argparse.Namespace) -> str:
    data = load_digits_split()
    rows = []
    for variant in VARIANTS:
        torch.manual_seed(args.seed)
        model = deep_cnn(args.depth, args.width, variant)
        result = train_classifier(
            model,
            data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            max_lr=args.lr,
            seed=args.seed,
        )
        loss = "diverged (NaN)" if result.diverged else f"{result.train_loss:.3f}"
        rows.append(
            [
                variant,
                loss,
                f"{result.test_accuracy:.3f}",
                f"{count_parameters(model):,}",
                f"{result.seconds:.0f}",
            ]
        )
        print(
            f"  {variant:8s} train loss {loss}, test accuracy {result.test_accuracy:.3f}",
            flush=True,
        )
    return _markdown_table(["variant", "train loss", "test accuracy", "parameters", "seconds"], rows)


def resnet_table() -> str:
    rows = []
    for constructor in (resnet18, resnet34, resnet50):
        for variant in VARIANTS:
            # Parameter shapes do not need values: build on the meta device (no coder pretraining).
            with torch.device("meta"):
                model = constructor(variant=variant, num_classes=1000)
            parts = parameter_breakdown(model)
            rows.append(
                [
                    constructor.__name__,
                    variant,
                    f"{parts['total']:,}",
                    f"{parts['coder']:,}",
                ]
            )
    return _markdown_table(
        ["model (ImageNet, 1000 classes)", "variant", "parameters", "of which coders"], rows
    )


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(
        f"Training deep_cnn(depth={args.depth}, width={args.width}) on scikit-learn digits, "
        f"{args.epochs} epochs of SGD + one-cycle (peak lr {args.lr}), seed {args.seed}, "
        f"{torch.get_num_threads()} CPU threads",
        flush=True,
    )
    table = depth_table(args)
    print(f"\nDepth {args.depth}, same recipe for every variant:\n\n{table}\n")
    if not args.skip_resnets:
        print("ResNet parameter counts (shared coders counted once):\n")
        print(resnet_table() + "\n")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
