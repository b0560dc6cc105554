"""``pnnh train`` (docs/training.md has a recipe per paper setting).

Every option's argparse default is SUPPRESS: the namespace holds only the options given on the
command line. A new run takes the others from :class:`TrainConfig`; a resume from its checkpoint,
where a given option that contradicts the checkpoint's value is refused (see
:func:`pnnh_kernels.training.trainer.check_resume_settings`). The defaults shown in ``--help`` are
TrainConfig's.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from pnnh_kernels.backends import KNOWN_BACKENDS, BackendUnavailableError
from pnnh_kernels.models import VARIANTS
from pnnh_kernels.training.data import DATASETS
from pnnh_kernels.training.optim import SCHEDULES
from pnnh_kernels.training.trainer import (
    MODELS,
    OVERRIDE_FLAG,
    PRECISIONS,
    TrainConfig,
    Trainer,
    check_before_start,
    finished_message,
    resume_settings,
)
from pnnh_kernels.validation import check_positive_int

DEFAULTS = TrainConfig()
SETTINGS = tuple(field.name for field in dataclasses.fields(TrainConfig))


def _option(parser: argparse.ArgumentParser, flag: str, help: str, default: Any = None,
            **kwargs: Any) -> None:  # fmt: skip
    """An option with no argparse default (absent from the namespace unless given) whose help ends
    with the default it gets: ``default`` if given (a text), else TrainConfig's value."""
    if default is None:
        value = getattr(DEFAULTS, flag[2:].replace("-", "_"), None)
        default = ("on" if value else "off") if isinstance(value, bool) else str(value)
    kwargs.setdefault("dest", flag[2:].replace("-", "_"))
    # argparse formats help with %: a literal % in a text would be read as a format.
    parser.add_argument(flag, help=f"{help} (default: {default})", default=argparse.SUPPRESS,
                        **kwargs)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = _option
    add(parser, "--model", "the network: ResNet-18/34/50 (3x3 stem for images under 96 pixels, "
        "ImageNet's 7x7 stem and max-pool from 96) or ViT-Tiny/Small (4-pixel patches under 96 "
        "pixels, 16 from 96); docs/pnnh.md", choices=list(MODELS))  # fmt: skip
    add(parser, "--variant", "pnnh: the plain net plus a coder per layer (the paper's); plain: no "
        "shortcuts, no coders; residual: the standard net with its shortcuts",
        choices=list(VARIANTS))  # fmt: skip
    add(parser, "--data", "cifar10/cifar100: the official python batches in --data-dir (or its "
        "cifar-10-batches-py/ or cifar-100-python/); folder: --data-dir/train/<class>/*.png and "
        "--data-dir/val/<class>/*; fashion-mnist: its four IDX files in --data-dir or where Debian's "
        "dataset-fashion-mnist installs them; synthetic: generated, learnable, for smoke runs",
        choices=list(DATASETS))  # fmt: skip
    add(parser, "--data-dir", "the folder holding the data set of --data; required for cifar10, "
        "cifar100 and folder, unused by synthetic", default="none", metavar="DIR")  # fmt: skip
    add(parser, "--out", "the run's folder: checkpoint (last.pt), metrics.jsonl/.csv, "
        "summary.json, accuracy.png; with --resume, the checkpoint's folder unless given",
        metavar="DIR")  # fmt: skip
    add(parser, "--epochs", "epochs of the whole run", type=int, metavar="N")
    add(parser, "--batch-size", "images per step, global: divided over all processes", type=int,
        metavar="N")  # fmt: skip
    add(parser, "--lr", "peak learning rate for the global batch", type=float,
        default="0.1 per 128 images of the global batch, e.g. 0.1 at 128, 0.025 at 32")  # fmt: skip
    add(parser, "--momentum", "SGD momentum", type=float)
    add(parser, "--nesterov", "Nesterov momentum", action=argparse.BooleanOptionalAction)
    add(parser, "--weight-decay", "on weights with 2+ dimensions only, never on biases or norm "
        "parameters", type=float)  # fmt: skip
    add(parser, "--label-smoothing", "of the cross-entropy loss, in [0, 1)", type=float)
    add(parser, "--schedule", "learning-rate schedule, stepped per step: cosine (warm-up, then "
        "half a cosine to 0) or onecycle (up to the peak at 30%% of the run, then down to 1e-4 of "
        "it)", choices=list(SCHEDULES))  # fmt: skip
    add(parser, "--warmup-epochs", "linear warm-up from 1%% of --lr", type=float, metavar="E")
    add(parser, "--precision", "autocast dtype (fp16 adds a gradient scaler); parameters stay "
        "fp32. auto: bf16 on a GPU, fp32 on the CPU", choices=list(PRECISIONS))  # fmt: skip
    add(parser, "--channels-last", "channels-last memory format for the model and its inputs",
        action=argparse.BooleanOptionalAction)  # fmt: skip
    add(parser, "--compile", "torch.compile the model", action=argparse.BooleanOptionalAction)
    add(parser, "--cuda-graphs", "torch.compile the model with mode='reduce-overhead': its "
        "forward and backward replay as CUDA graphs (GPU only; supersedes --compile)",
        action=argparse.BooleanOptionalAction)  # fmt: skip
    add(parser, "--coder-trainable", "train the coders (else each keeps its fixed "
        "rectified-isometry initialisation, the setting that trains at depth, docs/analysis.md)",
        action="store_true")  # fmt: skip
    add(parser, "--coder-loss-weight", "weight of the coders' autoencoder loss on fresh "
        "rectified-normal samples (0: off; needs --coder-trainable)", type=float)  # fmt: skip
    add(parser, "--coder-loss-samples", "samples per coder per step for --coder-loss-weight",
        type=int, metavar="N")  # fmt: skip
    add(parser, "--backend", "kernel backend of every PNNH layer (auto: the one measured fastest "
        "on the device, see pnnh info; triton and cuda when named); checked before the run starts",
        choices=list(KNOWN_BACKENDS))  # fmt: skip
    add(parser, "--device", "auto: a GPU when there is one (under torchrun, the process's own)",
        choices=("auto", "cpu", "cuda"))  # fmt: skip
    add(parser, "--seed", "of the initial weights, the data order and the augmentation", type=int)
    add(parser, "--workers", "image-decoding processes for --data folder", type=int, metavar="N")
    add(parser, "--threads", "torch CPU threads of each process (torch.set_num_threads); not part "
        "of the run's settings", type=int, metavar="N",
        default="torch's own: the CPU cores, or OMP_NUM_THREADS, which torchrun sets to 1")  # fmt: skip
    add(parser, "--image-size", "training and test image size in pixels", type=int, metavar="PX",
        default="32 for cifar10, cifar100 and synthetic, 224 for folder")  # fmt: skip
    add(parser, "--synthetic-train-size", "training images of --data synthetic", type=int,
        metavar="N")  # fmt: skip
    add(parser, "--synthetic-test-size", "test images of --data synthetic", type=int, metavar="N")
    add(parser, "--resume", "a last.pt to continue, exactly where it stopped, with its run's "
        "settings: give no other option, or only --out, --workers, --threads, --stop-after, "
        "--device, --backend, --compile, --cuda-graphs (an option that contradicts the checkpoint "
        f"is refused unless {OVERRIDE_FLAG})", default="none", metavar="CHECKPOINT")  # fmt: skip
    add(parser, OVERRIDE_FLAG, "with --resume: apply the options given that differ from the "
        "checkpoint's settings (e.g. more --epochs) from the next epoch on, instead of refusing "
        "them; the model, variant, data set, coder training and stem cannot change",
        action="store_true")  # fmt: skip
    add(parser, "--overwrite", "start a new run in an --out folder that holds one, deleting its "
        "last.pt, metrics, summary and plot first (without it such a folder is refused)",
        action="store_true")  # fmt: skip
    add(parser, "--stop-after", "checkpoint and exit after this many epochs of this invocation (for "
        "time-limited job slots); it prints the --resume command that continues",
        type=int, metavar="N", default="none")  # fmt: skip


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig settings given on the command line (absent ones are not in ``args``)."""
    return {name: getattr(args, name) for name in SETTINGS if hasattr(args, name)}


def check(args: argparse.Namespace) -> None:
    """Everything about the arguments that can be checked before the data is read and the model
    built (pnnh_kernels.commands reports an error here in one line, exit status 2). Leaves the
    run's configuration in ``args.config`` and, for a resume, the epochs its checkpoint has done in
    ``args.epochs_done`` and its metrics in ``args.resumed_history``."""
    threads = getattr(args, "threads", None)
    if threads is not None:
        check_positive_int("--threads", threads)
    given = given_settings(args)
    if given.get("data_dir") is not None:
        # Saved absolute: a resume from another working directory reads the same data.
        given["data_dir"] = str(Path(given["data_dir"]).expanduser().resolve())
    args.epochs_done = None
    args.resumed_history = []
    if given.get("resume"):
        config, state = resume_settings(given["resume"], given)
        args.epochs_done = int(state["epoch"])
        args.resumed_history = list(state["history"])
    else:
        config = TrainConfig(**given)
    try:
        check_before_start(config)
    except (ValueError, BackendUnavailableError) as error:
        # A resume runs on the checkpoint's --device and --backend unless told otherwise: say so
        # when one of them, which the user did not type, cannot run here.
        inherited = [
            name
            for name in ("device", "backend")
            if args.epochs_done is not None and name not in given and str(error).startswith(f"--{name} ")
        ]
        if not inherited:
            raise
        name = inherited[0]
        raise type(error)(
            f"{error}; --{name} {getattr(config, name)} is the checkpoint's setting: give --{name} "
            "to resume with another"
        ) from error
    args.config = config


def config_from(args: argparse.Namespace) -> TrainConfig:
    """The run's configuration from the parsed command line (after :func:`check`)."""
    if not hasattr(args, "config"):
        check(args)
    return args.config


def run(args: argparse.Namespace) -> None:
    config = config_from(args)
    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    if args.epochs_done is not None and args.epochs_done >= config.epochs:
        print(finished_message(config.resume, args.epochs_done, config.epochs, args.resumed_history))
        return
    Trainer(config).fit()
