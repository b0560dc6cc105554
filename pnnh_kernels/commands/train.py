"""``pnnh train`` (docs/training.md has a recipe per paper setting)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from pnnh_kernels.backends import KNOWN_BACKENDS
from pnnh_kernels.models import VARIANTS
from pnnh_kernels.training.data import DATASETS
from pnnh_kernels.training.optim import SCHEDULES
from pnnh_kernels.training.trainer import MODELS, PRECISIONS, TrainConfig, Trainer

DEFAULTS = TrainConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add: Any = parser.add_argument
    add("--model", choices=list(MODELS), default=DEFAULTS.model)
    add("--variant", choices=list(VARIANTS), default=DEFAULTS.variant)
    add(
        "--data",
        choices=list(DATASETS),
        default=DEFAULTS.data,
        help="cifar10/cifar100: the official python batches in --data-dir (or its "
        "cifar-10-batches-py/ or cifar-100-python/); folder: --data-dir/train/<class>/*.png and "
        "--data-dir/val/<class>/*; synthetic: generated, learnable, for smoke runs",
    )
    add("--data-dir", default=None)
    add(
        "--out",
        default=DEFAULTS.out,
        help="checkpoint (last.pt), metrics.jsonl/.csv, summary.json, accuracy.png",
    )
    add("--epochs", type=int, default=DEFAULTS.epochs)
    add("--batch-size", type=int, default=DEFAULTS.batch_size, help="global, over all processes")
    add(
        "--lr",
        type=float,
        default=DEFAULTS.lr,
        help="peak learning rate for the global batch (default: 0.1 per 128 images of it, e.g. "
        "0.1 at 128, 0.025 at 32)",
    )
    add("--momentum", type=float, default=DEFAULTS.momentum)
    add("--nesterov", action=argparse.BooleanOptionalAction, default=DEFAULTS.nesterov)
    add(
        "--weight-decay",
        type=float,
        default=DEFAULTS.weight_decay,
        help="on weights with 2+ dimensions only, never on biases or norm parameters",
    )
    add("--label-smoothing", type=float, default=DEFAULTS.label_smoothing)
    add("--schedule", choices=list(SCHEDULES), default=DEFAULTS.schedule)
    add("--warmup-epochs", type=float, default=DEFAULTS.warmup_epochs)
    add(
        "--precision",
        choices=list(PRECISIONS),
        default=DEFAULTS.precision,
        help="autocast dtype (fp16 adds a gradient scaler); parameters stay fp32. auto: bf16 on a "
        "GPU, fp32 on the CPU",
    )
    add("--channels-last", action=argparse.BooleanOptionalAction, default=DEFAULTS.channels_last)
    add("--compile", action="store_true", help="torch.compile the model")
    add(
        "--cuda-graphs",
        action="store_true",
        help="torch.compile the model with mode='reduce-overhead': its forward and backward replay "
        "as CUDA graphs (GPU only; supersedes --compile)",
    )
    add(
        "--coder-trainable",
        action="store_true",
        help="train the coders (default: each keeps its fixed rectified-isometry initialisation, "
        "the setting that trains at depth, docs/analysis.md)",
    )
    add(
        "--coder-loss-weight",
        type=float,
        default=DEFAULTS.coder_loss_weight,
        help="weight of the coders' autoencoder loss on fresh rectified-normal samples (0: off)",
    )
    add("--coder-loss-samples", type=int, default=DEFAULTS.coder_loss_samples)
    add(
        "--backend",
        choices=list(KNOWN_BACKENDS),
        default=DEFAULTS.backend,
        help="kernel backend of every PNNH layer (auto: triton on a GPU, torch on the CPU; cuda, "
        "the CUDA kernels, only when named)",
    )
    add("--device", choices=("auto", "cpu", "cuda"), default=DEFAULTS.device)
    add("--seed", type=int, default=DEFAULTS.seed)
    add("--workers", type=int, default=DEFAULTS.workers, help="decoding processes for --data folder")
    add("--image-size", type=int, default=None, help="default 32 (CIFAR, synthetic), 224 (folder)")
    add("--synthetic-train-size", type=int, default=DEFAULTS.synthetic_train_size)
    add("--synthetic-test-size", type=int, default=DEFAULTS.synthetic_test_size)
    add("--resume", default=None, help="a last.pt to continue from, exactly where it stopped")
    add(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out folder that holds one, deleting its last.pt, metrics, "
        "summary and plot first (without it such a folder is refused)",
    )
    add("--stop-after", type=int, default=None,
        help="checkpoint and exit after this many epochs of this invocation (for time-limited job "
        "slots; --resume continues)")  # fmt: skip


def config_from(args: argparse.Namespace) -> TrainConfig:
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainConfig)}
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> None:
    Trainer(config_from(args)).fit()
