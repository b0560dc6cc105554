"""``pnnh demo``: plain, residual and PNNH nets of one depth trained on real digits, side by side.

The paper's central claim is that deep plain nets stop learning because their ReLUs destroy the
input, that residual nets do not, and that a plain net with a coder (PNNH) does not either. This demo
trains the three variants of :func:`pnnh_kernels.models.deep_cnn` with the same recipe on
scikit-learn's digits and prints what it measured, whichever way it falls, followed by the parameter
counts of the ResNet models.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

from pnnh_kernels.markdown import markdown_table
from pnnh_kernels.models import VARIANTS, count_parameters, deep_cnn, parameter_breakdown
from pnnh_kernels.models.resnet import resnet18, resnet34, resnet50
from pnnh_kernels.training.digits import (
    TrainResult,
    load_digits_split,
    require_scikit_learn,
    train_classifier,
)
from pnnh_kernels.validation import check_positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, default=64, help="3x3 layers in the body")
    parser.add_argument("--width", type=int, default=16, help="channels per layer")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05, help="one-cycle peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads per training run (default 1: the numbers then do not depend on the "
        "machine's core count)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="variants trained at once, each in its own process (default: min(3, CPU cores)); "
        "does not change the numbers",
    )
    parser.add_argument(
        "--skip-resnets", action="store_true", help="do not print the ResNet parameter table"
    )


def train_variant(variant: str, args: argparse.Namespace) -> TrainResult:
    """One variant, start to end, under ``args.threads`` threads (run in a worker process)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = deep_cnn(args.depth, args.width, variant)
    return train_classifier(
        model,
        load_digits_split(),
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_lr=args.lr,
        seed=args.seed,
    )


def _trained(args: argparse.Namespace) -> Iterator[tuple[str, TrainResult]]:
    jobs = args.jobs or min(len(VARIANTS), os.cpu_count() or 1)
    if jobs <= 1:
        for variant in VARIANTS:
            yield variant, train_variant(variant, args)
        return
    # spawn: each worker starts with a fresh torch, set to args.threads threads.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = {pool.submit(train_variant, variant, args): variant for variant in VARIANTS}
        for future in as_completed(futures):
            yield futures[future], future.result()


def depth_table(args: argparse.Namespace) -> str:
    results = {}
    for variant, result in _trained(args):
        results[variant] = result
        loss = "diverged (NaN)" if result.diverged else f"{result.train_loss:.3f}"
        print(
            f"  {variant:8s} train loss {loss}, test accuracy {result.test_accuracy:.3f}",
            flush=True,
        )
    rows = []
    for variant in VARIANTS:
        result = results[variant]
        with torch.device("meta"):
            model = deep_cnn(args.depth, args.width, variant)
        rows.append(
            [
                variant,
                "diverged (NaN)" if result.diverged else f"{result.train_loss:.3f}",
                f"{result.test_accuracy:.3f}",
                f"{count_parameters(model, trainable_only=True):,}",
                f"{result.seconds:.0f}",
            ]
        )
    return markdown_table(
        ["variant", "train loss", "test accuracy", "trained parameters", "seconds"], rows
    )


def resnet_table() -> str:
    rows = []
    for constructor in (resnet18, resnet34, resnet50):
        for variant in VARIANTS:
            # Parameter shapes do not need values: build on the meta device.
            with torch.device("meta"):
                model = constructor(variant=variant, num_classes=1000)
            parts = parameter_breakdown(model)
            rows.append(
                [
                    constructor.__name__,
                    variant,
                    f"{parts['total']:,}",
                    f"{parts['coder']:,}",
                    f"{parts['trainable']:,}",
                ]
            )
    return markdown_table(
        ["model (ImageNet, 1000 classes)", "variant", "parameters", "of which coders", "trained"],
        rows,
    )


def check(args: argparse.Namespace) -> None:
    """The arguments, and scikit-learn (the digits), before any variant starts training: without it
    the demo used to fail inside a worker process, in a process-pool traceback."""
    for name in ("threads", "depth", "width", "epochs", "batch_size"):
        check_positive_int(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.jobs is not None:
        check_positive_int("--jobs", args.jobs)
    require_scikit_learn("the demo")


def run(args: argparse.Namespace) -> None:
    check(args)  # again, for a caller that did not go through pnnh_kernels.commands.main
    start = time.perf_counter()
    print(
        f"Training deep_cnn(depth={args.depth}, width={args.width}) on scikit-learn digits, "
        f"{args.epochs} epochs of SGD + one-cycle (peak lr {args.lr}), seed {args.seed}, "
        f"{args.threads} CPU thread(s) per variant",
        flush=True,
    )
    print(
        f"The numbers are bit-reproducible with torch {torch.__version__} on a CPU with "
        f"{torch.backends.cpu.get_cpu_capability()} kernels and {args.threads} thread(s) per run; "
        "another torch build or instruction set rounds differently, which changes the last digits "
        "(and can change more for a net that trains chaotically, like the deep plain net).",
        flush=True,
    )
    table = depth_table(args)
    print(f"\nDepth {args.depth}, same recipe for every variant:\n\n{table}\n")
    if not args.skip_resnets:
        print("ResNet parameter counts (shared coders counted once):\n")
        print(resnet_table() + "\n")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
