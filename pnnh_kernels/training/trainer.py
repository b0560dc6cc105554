"""The training loop behind ``pnnh train``: one process or many (torchrun), resumable exactly."""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import shlex
import time
import warnings
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pnnh_kernels.backends import BackendUnavailableError, check_backend_name, resolve_backend
from pnnh_kernels.coder import distinct_coders, reconstruction_loss
from pnnh_kernels.models import count_parameters, resnet18, resnet34, resnet50
from pnnh_kernels.models.coder_bank import check_variant
from pnnh_kernels.models.vit import vit_small, vit_tiny
from pnnh_kernels.pnnh_conv import FusedPNNHConv
from pnnh_kernels.pnnh_linear import FusedPNNHLinear
from pnnh_kernels.training import checkpoint, distributed, metrics
from pnnh_kernels.training.data import (
    CIFAR_LAYOUTS,
    NATIVE_IMAGES,
    DataSpec,
    ImageData,
    cifar_root,
)
from pnnh_kernels.training.fashion_mnist import check_files
from pnnh_kernels.training.optim import WarmupSchedule, scheduler, sgd

MODELS = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
}
PRECISIONS = {"auto": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The default peak learning rate: 0.1 per 128 images of global batch (the CIFAR ResNet recipe's 0.1
# at 128, scaled linearly). A fixed 0.1 diverged at batch 32 (the README's smoke run: NaN in epoch 2,
# or a first-epoch test loss of 3e5), where 0.025 trains it to 100% test accuracy.
LR_PER_128_IMAGES = 0.1
# Resuming. A resume continues the checkpoint's run with the checkpoint's settings. Settings of one
# invocation are never taken from the checkpoint:
PER_INVOCATION = ("resume", "stop_after", "overwrite", "override_resume_settings")
# Settings of where and how the run executes, not of what it trains: a resume may change them freely
# (--out: where the files go; the others give the same arithmetic up to rounding).
EXECUTION_SETTINGS = (
    "out", "workers", "compile", "cuda_graphs", "device", "backend", "channels_last"
)  # fmt: skip
RESUMABLE_CHANGES = {*PER_INVOCATION, *EXECUTION_SETTINGS}
# Any other setting that differs from the checkpoint's is refused unless the run says
# override_resume_settings (--override-resume-settings); these not even then: they change the model's
# parameters or what its checkpoint holds (coder_trainable: the optimizer's parameters).
FIXED_ON_RESUME = ("model", "variant", "data", "coder_trainable")
OVERRIDE_FLAG = "--override-resume-settings"


@dataclass
class TrainConfig:
    model: str = "resnet18"
    variant: str = "pnnh"
    data: str = "cifar10"
    data_dir: Optional[str] = None
    out: str = "runs/train"
    epochs: int = 200
    batch_size: int = 128  # global: divided over the processes
    lr: Optional[float] = None  # peak, for the global batch; None: LR_PER_128_IMAGES scaled
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    precision: str = "auto"  # bf16 on a GPU, fp32 on the CPU (see resolve_precision)
    channels_last: bool = True
    compile: bool = False
    # torch.compile(mode="reduce-overhead"): the model's forward and backward replayed as CUDA
    # graphs (Inductor's), so the launch path's host cost is paid once at capture. GPU only.
    cuda_graphs: bool = False
    coder_trainable: bool = False  # train the coders (default: fixed rectified isometries)
    coder_loss_weight: float = 0.0
    coder_loss_samples: int = 256
    backend: str = "auto"
    device: str = "auto"
    seed: int = 0
    workers: int = 8
    image_size: Optional[int] = None  # default: 32 for CIFAR and synthetic, 224 for folders
    synthetic_train_size: int = 512
    synthetic_test_size: int = 256
    resume: Optional[str] = None
    stop_after: Optional[int] = None  # epochs of this invocation, then checkpoint and exit
    overwrite: bool = False  # start a new run in an --out folder that holds one (deleting its files)
    # resume with settings that differ from the checkpoint's (else refused); see FIXED_ON_RESUME
    override_resume_settings: bool = False

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"--model: expected one of {tuple(MODELS)}, got {self.model!r}")
        check_variant(self.variant)
        check_backend_name(self.backend)
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision: expected one of {tuple(PRECISIONS)}, got {self.precision!r}")
        for name in (
            "epochs",
            "batch_size",
            "coder_loss_samples",
            "synthetic_train_size",
            "synthetic_test_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')}: expected a positive int, got {getattr(self, name)}"
                )
        if self.overwrite and self.resume:
            raise ValueError(
                "--overwrite: starts a new run over the one in --out, --resume continues one: give "
                "one of them"
            )
        if self.override_resume_settings and not self.resume:
            raise ValueError(f"{OVERRIDE_FLAG}: applies to a --resume only, and no --resume is given")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(
                f"--image-size: expected an int >= 8 (the networks downsample 8x), got {self.image_size}"
            )
        if self.workers < 0:
            raise ValueError(f"--workers: expected an int >= 0, got {self.workers}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"--stop-after: expected a positive int, got {self.stop_after}")
        if self.lr is not None and not self.lr >= 0:
            raise ValueError(f"--lr: expected >= 0, got {self.lr}")
        for name in ("weight_decay", "coder_loss_weight", "warmup_epochs", "momentum"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')}: expected >= 0, got {getattr(self, name)}")
        if self.coder_loss_weight > 0 and not self.coder_trainable:
            raise ValueError(
                f"--coder-loss-weight: {self.coder_loss_weight} trains the coders' autoencoder loss, "
                "but the coders are fixed by default; add --coder-trainable"
            )
        if self.cuda_graphs and self.device == "cpu":
            raise ValueError("--cuda-graphs: CUDA graphs need a GPU, got --device cpu")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(
                f"--label-smoothing: expected a value in [0, 1), got {self.label_smoothing}"
            )

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return LR_PER_128_IMAGES * self.batch_size / 128

    @property
    def resolved_image_size(self) -> int:
        if self.image_size is not None:
            return self.image_size
        if self.data in NATIVE_IMAGES:
            return NATIVE_IMAGES[self.data][0]
        return 224 if self.data == "folder" else 32

    @property
    def in_channels(self) -> int:
        """The data's image channels: 1 for Fashion-MNIST (grayscale), 3 otherwise."""
        return NATIVE_IMAGES.get(self.data, (0, 3))[1]

    @property
    def stem(self) -> str:
        """CIFAR-sized inputs get the 3x3 stem without max-pooling, as in the paper's CIFAR nets."""
        return "imagenet" if self.resolved_image_size >= 96 else "cifar"


def vit_patch_size(image_size: int) -> int:
    """4-pixel patches for small images (CIFAR's 32: 64 tokens), 16 for ImageNet-sized ones (224:
    196 tokens, ViT's own choice); the largest such size that divides the image."""
    for patch in (16, 8, 4, 2, 1) if image_size >= 96 else (4, 2, 1):
        if image_size % patch == 0:
            return patch
    return 1


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    if config.model.startswith("vit"):
        size = config.resolved_image_size
        model = MODELS[config.model](
            config.variant,
            image_size=size,
            patch_size=vit_patch_size(size),
            num_classes=num_classes,
            coder_trainable=config.coder_trainable,
            in_channels=config.in_channels,
        )
    else:
        model = MODELS[config.model](
            config.variant,
            stem=config.stem,
            num_classes=num_classes,
            coder_trainable=config.coder_trainable,
            in_channels=config.in_channels,
        )
    backend = check_backend_name(config.backend)
    for module in model.modules():
        if isinstance(module, (FusedPNNHConv, FusedPNNHLinear)):
            module.backend = backend
    return model


def resolve_precision(precision: str, device: torch.device, warn: bool = True) -> str:
    """``auto``: bf16 autocast on a GPU, fp32 on the CPU, where autocast to 16 bits is emulated and
    slower than fp32 on most processors; an explicit 16-bit choice on the CPU runs, with a warning."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision in ("bf16", "fp16") and device.type == "cpu" and warn:
        warnings.warn(
            f"--precision {precision} on the CPU: autocast to 16 bits is emulated there and usually "
            "much slower than fp32 (fp16 was 25x slower on a 2-core CI machine); --precision auto "
            "picks fp32 on the CPU",
            stacklevel=3,
        )
    return precision


def existing_run_files(out: Path) -> list[Path]:
    """The files of a previous run in ``out`` (checkpoint.RUN_FILES that exist)."""
    return [out / name for name in checkpoint.RUN_FILES if (out / name).exists()]


def check_out_folder(config: TrainConfig) -> None:
    """A new run never replaces another silently: --out holding a run needs --resume of that run's
    own checkpoint (continue it) or --overwrite (replace it)."""
    if config.overwrite:
        return
    out = Path(config.out)
    found = existing_run_files(out)
    if config.resume:
        if found and Path(config.resume).resolve().parent != out.resolve():
            raise FileExistsError(
                f"--out: {config.out} holds another run ({', '.join(p.name for p in found)}); "
                f"resuming {config.resume} there would replace it: give the checkpoint's own folder "
                f"(--out {Path(config.resume).parent}) or an empty one"
            )
        return
    if found:
        raise FileExistsError(
            f"--out: {config.out} already holds a run ({', '.join(p.name for p in found)}); "
            f"continue it with --resume {Path(config.out) / 'last.pt'}, replace it with --overwrite, "
            "or choose another --out"
        )


def flag(name: str) -> str:
    """The command-line flag of a TrainConfig field."""
    return "--" + name.replace("_", "-")


def _check_device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch.cuda.is_available() is False on this machine")
    return distributed.choose_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))


def _check_data(config: TrainConfig, world_size: int) -> None:
    """What can be known of the data without reading it: a --data-dir that is missing or does not
    hold the data set, a synthetic set smaller than a batch."""
    if config.data == "synthetic":
        if (config.synthetic_train_size // world_size) // (config.batch_size // world_size) == 0:
            raise ValueError(
                f"--batch-size: {config.batch_size} is larger than the {config.synthetic_train_size} "
                "training images (--synthetic-train-size)"
            )
        return
    if config.data == "fashion-mnist":
        check_files(Path(config.data_dir) if config.data_dir else None)  # names what is missing
        if config.resolved_image_size != 28:
            raise ValueError(
                f"--image-size: Fashion-MNIST's images are 28 x 28 (not resized), got "
                f"{config.resolved_image_size}"
            )
        return
    if config.data_dir is None:
        raise ValueError(f"--data-dir: required for --data {config.data}")
    root = Path(config.data_dir)
    if config.data in CIFAR_LAYOUTS:
        cifar_root(root, config.data)  # raises FileNotFoundError naming what it looked for
        return
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"--data-dir: expected the image folder {root / split}, which does not exist "
                "(--data folder reads DIR/train/<class>/* and DIR/val/<class>/*)"
            )


# The backend ops ("conv2d", "linear") that each model's PNNH layers call: every conv + BatchNorm of
# a ResNet is a FusedPNNHConv; a ViT has no fused layer (its coders run as PNNHCoder's linear maps,
# models/vit.py), so --backend does not reach it. Kept by hand (building a model, even on the meta
# device, costs a second at start-up); tests/test_training_failures.py checks it against the models.
LAYER_OPS = {
    "resnet18": ("conv2d",),
    "resnet34": ("conv2d",),
    "resnet50": ("conv2d",),
    "vit_tiny": (),
    "vit_small": (),
}


def check_backend_available(config: TrainConfig) -> None:
    """Raise BackendUnavailableError, with the backend's reason, when --backend cannot run this
    run's PNNH layers on its device and precision: before any data is read or file written, not in
    the first training step."""
    device = _check_device(config)
    autocast_dtype = PRECISIONS[resolve_precision(config.precision, device, warn=False)]
    dtypes = [torch.float32] + ([autocast_dtype] if autocast_dtype is not None else [])
    for op in LAYER_OPS.get(config.model, ("conv2d", "linear")):
        for dtype in dtypes:
            try:
                resolve_backend(config.backend, device, dtype, op)
            except BackendUnavailableError as error:
                raise BackendUnavailableError(
                    f"--backend {config.backend}: {error} (--backend auto picks one that runs here)"
                ) from error


def check_before_start(config: TrainConfig) -> None:
    """Every check of a run's settings that needs no data read and no model built, so that a run
    that cannot start fails at once and creates nothing: the values themselves, the batch over the
    processes, the --out folder, the --data-dir, the device and the --backend."""
    config.validate()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if config.batch_size % world_size:
        raise ValueError(
            f"--batch-size: the global batch {config.batch_size} must divide evenly over "
            f"{world_size} processes"
        )
    check_out_folder(config)
    _check_data(config, world_size)
    check_backend_available(config)


# -- resuming ----------------------------------------------------------------------------------

# Boolean settings with a --no- flag (the others are store_true flags: off means absent).
_NEGATABLE = ("nesterov", "channels_last", "compile", "cuda_graphs")


def config_from_checkpoint(values: dict[str, Any]) -> TrainConfig:
    """The TrainConfig saved in a checkpoint (settings it lacks: their defaults; settings this
    version no longer has: dropped)."""
    names = {field.name for field in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{key: value for key, value in values.items() if key in names})


def _comparable(config: TrainConfig, name: str) -> Any:
    """What a setting means for the run: the resolved learning rate and image size, the path."""
    if name == "lr":
        return config.resolved_lr
    if name == "image_size":
        return config.resolved_image_size
    if name == "data_dir" and config.data_dir is not None:
        return Path(config.data_dir).expanduser().resolve()
    return getattr(config, name)


def _shown(config: TrainConfig, name: str) -> str:
    """A setting as the command line gives it: "--epochs 4", "--no-nesterov"."""
    value = getattr(config, name)
    if name == "lr" and value is None:
        return f"--lr {config.resolved_lr:g} (the default at --batch-size {config.batch_size})"
    if name == "image_size" and value is None:
        return f"--image-size {config.resolved_image_size}"
    if isinstance(value, bool):
        if value:
            return flag(name)
        return f"--no-{name.replace('_', '-')}" if name in _NEGATABLE else f"no {flag(name)}"
    if value is None:
        return f"no {flag(name)}"
    return f"{flag(name)} {value}"


def check_resume_settings(
    saved: TrainConfig, config: TrainConfig, names: Iterable[str], path: Any, epoch: int
) -> list[str]:
    """The settings among ``names`` in which ``config``, a resume after ``epoch`` epochs of the
    checkpoint at ``path``, differs from the checkpoint's run ``saved`` (execution settings such as
    --out, --workers or --backend never count). Raises ValueError naming each, both values and the
    way out, unless ``config.override_resume_settings``; for the model, variant, data set, coder
    training or stem, always."""
    names = set(names)
    conflicts = [
        field.name
        for field in dataclasses.fields(TrainConfig)
        if field.name in names
        and field.name not in RESUMABLE_CHANGES
        and getattr(saved, field.name) != getattr(config, field.name)
        and _comparable(saved, field.name) != _comparable(config, field.name)
    ]
    fixed = [name for name in conflicts if name in FIXED_ON_RESUME]
    if "image_size" in conflicts and (saved.stem != config.stem or config.model.startswith("vit")):
        fixed.append("image_size")  # another stem, or another number of ViT tokens

    def contradiction(which: list[str]) -> str:
        verb = "contradicts" if len(which) == 1 else "contradict"
        return (
            f"{', '.join(_shown(config, name) for name in which)} {verb} the checkpoint {path}, a "
            f"run with {', '.join(_shown(saved, name) for name in which)}"
        )

    def flags(which: list[str]) -> str:
        return ", ".join(_shown(config, n) if isinstance(getattr(config, n), bool) else flag(n)
                         for n in which)  # fmt: skip

    if fixed:
        raise ValueError(
            f"{contradiction(fixed)}; a resume cannot change the model, variant, data set, coder "
            f"training or stem, not even with {OVERRIDE_FLAG}: drop {flags(fixed)} to continue that "
            "run, or start a new run in another --out"
        )
    if conflicts and not config.override_resume_settings:
        them = "it" if len(conflicts) == 1 else "them"
        raise ValueError(
            f"{contradiction(conflicts)}; a resume continues with its run's own settings: drop "
            f"{flags(conflicts)}, or add {OVERRIDE_FLAG} to apply {them} from epoch {epoch + 1}"
        )
    return conflicts


def resume_settings(path: str, given: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """The configuration of a resume of the checkpoint at ``path``: the checkpoint's settings with the
    ``given`` ones (those on the command line) on top; ``out`` is the checkpoint's folder unless
    given. A given setting that contradicts the checkpoint's raises ValueError (see
    check_resume_settings). Returns the configuration and the checkpoint, its tensors mapped from
    the file, not read."""
    state = checkpoint.read_checkpoint(Path(path), mmap=True)
    saved = config_from_checkpoint(state["config"])
    values = dataclasses.asdict(saved)
    defaults = TrainConfig()
    values.update({name: getattr(defaults, name) for name in PER_INVOCATION})
    values["out"] = str(Path(path).parent)
    values.update(given)
    values["resume"] = str(path)
    config = TrainConfig(**values)
    check_resume_settings(saved, config, given, path, int(state["epoch"]))
    return config, state


def finished_message(path: Any, epochs_done: int, epochs: int, history: list[dict[str, Any]]) -> str:
    """What a resume of a run that has trained all its epochs says instead of training."""
    accuracy = ""
    if history and "test_accuracy" in history[-1]:
        accuracy = f", final test accuracy {history[-1]['test_accuracy']:.4f}"
    return (
        f"pnnh train: {path} holds a finished run ({epochs_done} epochs done, --epochs {epochs}"
        f"{accuracy}): nothing to train. To train it longer, add --epochs N {OVERRIDE_FLAG} "
        f"(N > {epochs_done})"
    )


def resume_command(checkpoint_path: Path, world_size: int) -> str:
    """The command that continues a run stopped early (a resume takes the checkpoint's settings)."""
    command = f"train --resume {shlex.quote(str(checkpoint_path))}"
    if world_size > 1:
        return f"the same torchrun launch of: -m pnnh_kernels {command}"
    return f"pnnh {command}"


def _divergence(
    epoch: int, what: str, value: float, history: list[dict[str, Any]], where: str = ""
) -> str:
    """The message of a FloatingPointError for a non-finite ``what`` in ``epoch`` (1-based)."""
    last = "no finite loss was recorded before it"
    for row in reversed(history):
        for key in ("test_loss", "train_loss"):
            if math.isfinite(row.get(key, math.nan)):
                name = key.replace("_", " ")
                last = f"the last finite loss: {name} {row[key]:.4g} in epoch {row['epoch']}"
                break
        else:
            continue
        break
    kept = (
        "The checkpoint of the last finished epoch is kept"
        if epoch > 1
        else "Nothing was saved (no epoch finished)"
    )
    return (
        f"training diverged in epoch {epoch}: the {what} is {value}{where}; {last}. {kept}; lower "
        "--lr or raise --warmup-epochs"
    )


def _first_nonfinite_step(losses: list[Tensor]) -> str:
    """Where in an epoch the loss first stopped being finite (this process's steps), for messages."""
    if not losses:
        return ""
    values = torch.stack(losses).double().cpu()
    bad = (~torch.isfinite(values)).nonzero()
    if not len(bad):
        return " (this process's losses stayed finite)"
    step = int(bad[0])
    before = f", the loss before it {float(values[step - 1]):.4g}" if step > 0 else ""
    return f" (first at step {step + 1} of {len(values)}{before})"


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports the process's peak resident set in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _progress(total: int, description: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=description, unit="step", leave=False, dynamic_ncols=True)


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        check_before_start(config)  # on every process, before any starts work
        self.config = config
        # A resume's settings must be the checkpoint's, unless config.override_resume_settings:
        # checked before the data is read (pnnh train fills in the checkpoint's settings itself).
        resumed: Optional[dict[str, Any]] = None
        self.resume_changes: list[str] = []
        if config.resume:
            resumed = checkpoint.read_checkpoint(Path(config.resume))
            self.resume_changes = check_resume_settings(
                config_from_checkpoint(resumed["config"]),
                config,
                [field.name for field in dataclasses.fields(TrainConfig)],
                config.resume,
                int(resumed["epoch"]),
            )
        self.processes = distributed.start(config.device)
        world = self.processes.world_size
        if config.batch_size % world:
            raise ValueError(
                f"--batch-size: the global batch {config.batch_size} must divide evenly over "
                f"{world} processes"
            )
        self.device = self.processes.device
        self.out = Path(config.out)
        self.data = ImageData(
            DataSpec(
                config.data,
                Path(config.data_dir) if config.data_dir else None,
                config.resolved_image_size,
                config.batch_size // world,
                config.workers,
                config.seed,
                config.synthetic_train_size,
                config.synthetic_test_size,
            ),
            self.processes.rank,
            world,
            self.device,
        )
        # The same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
        torch.manual_seed(config.seed)
        self.model = build_model(config, self.data.num_classes).to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.coders = distinct_coders(self.model)
        self.optimizer = sgd(
            self.model, config.resolved_lr, config.momentum, config.nesterov, config.weight_decay
        )
        total_steps = config.epochs * self.data.steps_per_epoch
        self.schedule = WarmupSchedule(
            config.schedule,
            total_steps,
            min(total_steps, round(config.warmup_epochs * self.data.steps_per_epoch)),
        )
        self.scheduler = scheduler(self.optimizer, self.schedule)
        precision = resolve_precision(config.precision, self.device, warn=self.processes.is_main)
        self.precision = precision
        self.autocast_dtype = PRECISIONS[precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.start_epoch = 0
        self.history: list[dict[str, Any]] = []
        torch.manual_seed(config.seed * 65_537 + self.processes.rank + 1)
        if resumed is not None:
            self._resume(Path(config.resume), resumed)
            del resumed  # its tensors are the model's and the optimizer's now
        wrapped: nn.Module = self.model
        if self.processes.distributed:
            wrapped = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if config.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"--cuda-graphs: CUDA graphs need a GPU, the run is on {self.device}")
        if config.cuda_graphs:
            self.step_model = torch.compile(wrapped, mode="reduce-overhead")
        else:
            self.step_model = torch.compile(wrapped) if config.compile else wrapped

    # -- checkpoints ---------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        return {
            "model": self.config.model,
            "variant": self.config.variant,
            "num_classes": self.data.num_classes,
            "stem": self.config.stem,
            "data": self.config.data,
        }

    def _scheduler_state(self) -> dict[str, Any]:
        state = self.scheduler.state_dict()
        # The schedule is rebuilt from the command line; only the step count is state.
        state["lr_lambdas"] = [None] * len(state["lr_lambdas"])
        return state

    def _gather_rng_states(self) -> list[dict[str, Any]]:
        mine = checkpoint.rng_state(self.device)
        if not self.processes.distributed:
            return [mine]
        every: list[Any] = [None] * self.processes.world_size
        torch.distributed.all_gather_object(every, mine)
        return every

    def save(self, epoch: int) -> None:
        rng_states = self._gather_rng_states()  # a collective: every rank takes part
        if not self.processes.is_main:
            return
        state = {
            "format_version": checkpoint.FORMAT_VERSION,
            "identity": self.identity(),
            "config": dataclasses.asdict(self.config),
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self._scheduler_state(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_states,
            "world_size": self.processes.world_size,
            "history": self.history,
        }
        checkpoint.save_atomically(state, self.out / "last.pt")

    def _checkpoint_bytes(self) -> int:
        """About the size of one checkpoint: the model's state and the optimizer's momentum."""
        state = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        params = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        return state + params + (1 << 20)

    def _resume(self, path: Path, state: dict[str, Any]) -> None:
        checkpoint.check_identity(state, self.identity(), path)
        changed = self.resume_changes  # empty unless config.override_resume_settings
        if changed and self.processes.is_main:
            warnings.warn(
                f"{OVERRIDE_FLAG}: these settings differ from the checkpoint's run and apply from "
                f"epoch {state['epoch'] + 1}: {', '.join(flag(name) for name in changed)}",
                stacklevel=2,
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when the run was not fp16 (a disabled scaler's state)
            self.scaler.load_state_dict(state["scaler"])
        if state["world_size"] == self.processes.world_size:
            checkpoint.restore_rng_state(state["rng"][self.processes.rank], self.device)
        elif self.processes.is_main:
            warnings.warn(
                f"--resume: the checkpoint was written by {state['world_size']} processes, this run has "
                f"{self.processes.world_size}; random streams restart, so the run will not match an "
                "uninterrupted one bit for bit",
                stacklevel=2,
            )
        self.start_epoch = state["epoch"]
        self.history = list(state["history"])
        if changed:
            self._apply_overridden_settings()

    def _apply_overridden_settings(self) -> None:
        """After an overriding resume: the optimizer's hyperparameters and the schedule's position
        from this run's settings, not the checkpoint's (which the optimizer's and scheduler's state
        restored): the peak --lr, --momentum, --nesterov, --weight-decay, and the step of the
        (rebuilt) schedule at which epoch start_epoch + 1 begins with this run's --batch-size."""
        config = self.config
        peak = config.resolved_lr
        groups = self.optimizer.param_groups
        for group, decay in zip(groups, (config.weight_decay, 0.0)):
            group.update(
                momentum=config.momentum,
                nesterov=config.nesterov,
                weight_decay=decay,
                initial_lr=peak,
            )
        step = self.start_epoch * self.data.steps_per_epoch
        self.scheduler.base_lrs = [peak] * len(groups)
        self.scheduler.last_epoch = step
        rates = [peak * self.schedule(step) for _ in groups]
        for group, rate in zip(groups, rates):
            group["lr"] = rate
        self.scheduler._last_lr = rates  # what get_last_lr() reports

    # -- epochs ----------------------------------------------------------------------------------

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        config = self.config
        self.step_model.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, correct, count, coder
        bar = _progress(
            self.data.steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}", self.processes.is_main
        )
        self._synchronize()
        start = time.perf_counter()
        losses: list[Tensor] = []  # one scalar per step, read only if the epoch diverges
        for step, (images, labels) in enumerate(self.data.train_batches(epoch)):
            inputs = self.data.normalise(images, config.channels_last)
            with self._autocast():
                logits = self.step_model(inputs)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
            total = loss
            if config.coder_loss_weight > 0 and self.coders:
                coder_loss = reconstruction_loss(self.coders, config.coder_loss_samples, self.device)
                total = loss + config.coder_loss_weight * coder_loss
                sums[3] += coder_loss.detach() * len(labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            sums[0] += loss.detach() * len(labels)
            losses.append(loss.detach())
            sums[1] += (logits.detach().argmax(1) == labels).sum()
            sums[2] += len(labels)
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(
                        loss=f"{float(loss.detach()):.3f}",
                        img_s=f"{float(sums[2]) * self.processes.world_size / max(elapsed, 1e-9):.0f}",
                    )
        self._synchronize()
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        loss_sum, correct, count, coder_sum = distributed.sum_over_ranks(sums.tolist(), self.processes)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(
                _divergence(
                    epoch + 1,
                    "training loss",
                    loss_sum / count,
                    self.history,
                    _first_nonfinite_step(losses),
                )
            )
        return {
            "train_loss": loss_sum / count,
            "train_accuracy": correct / count,
            "coder_loss": coder_sum / count if config.coder_loss_weight > 0 and self.coders else None,
            "images_per_second": count / distributed.max_over_ranks(seconds, self.processes),
            "learning_rate": self.optimizer.param_groups[0]["lr"],
            "peak_memory_mib": distributed.max_over_ranks(_peak_memory_mib(self.device), self.processes),
            "epoch_seconds": seconds,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.step_model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for images, labels in self.data.test_batches():
            inputs = self.data.normalise(images, self.config.channels_last)
            with self._autocast():
                logits = self.step_model(inputs)
            sums[0] += F.cross_entropy(logits.float(), labels, reduction="sum")
            sums[1] += (logits.argmax(1) == labels).sum()
            sums[2] += len(labels)
        loss_sum, correct, count = distributed.sum_over_ranks(sums.tolist(), self.processes)
        return {"test_loss": loss_sum / count, "test_accuracy": correct / count}

    def fit(self) -> dict[str, Any]:
        config = self.config
        if self.start_epoch >= config.epochs:
            # A resume of a finished run: nothing to train, and its files stay as they are.
            if self.processes.is_main:
                print(finished_message(config.resume, self.start_epoch, config.epochs, self.history))
            distributed.stop(self.processes)
            return self.summary(0.0, True)
        if self.processes.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if config.overwrite:
                for path in existing_run_files(self.out):
                    path.unlink()
            checkpoint.check_space(self.out, self._checkpoint_bytes())
            print(
                f"pnnh train: {config.model} {config.variant} on {config.data} "
                f"({self.data.train_size} training images, {self.data.num_classes} classes), "
                f"{count_parameters(self.model, trainable_only=True):,} trained parameters "
                f"({count_parameters(self.model):,} stored), {self.processes.world_size} process(es) "
                f"on {self.device.type}, epochs {self.start_epoch + 1}-{config.epochs}"
            )
        started = time.perf_counter()
        last = config.epochs
        if config.stop_after is not None:
            last = min(last, self.start_epoch + config.stop_after)
        for epoch in range(self.start_epoch, last):
            row: dict[str, Any] = {"epoch": epoch + 1, **self.train_epoch(epoch), **self.evaluate()}
            if not math.isfinite(row["test_loss"]):
                # Before the save: the checkpoint and metrics of the last finite epoch stay.
                raise FloatingPointError(
                    _divergence(epoch + 1, "test loss", row["test_loss"], [*self.history, row])
                )
            self.history.append(row)
            self.save(epoch + 1)
            if self.processes.is_main:
                metrics.write_logs(self.history, self.out)
                print(
                    f"epoch {epoch + 1}: train loss {row['train_loss']:.4f}"
                    f" acc {row['train_accuracy']:.4f} | test loss {row['test_loss']:.4f}"
                    f" acc {row['test_accuracy']:.4f}"
                    f" | {row['images_per_second']:.0f} img/s, lr {row['learning_rate']:.4g}"
                )
        agree = distributed.ranks_agree(self.model, self.processes)
        if not agree:
            raise RuntimeError(
                "the processes ended with different weights: DDP did not synchronise them"
            )
        summary = self.summary(time.perf_counter() - started, agree)
        if self.processes.is_main:
            metrics.write_summary(summary, self.out)
            if self.history:
                metrics.plot_accuracy(
                    self.history, self.out, f"{config.model} {config.variant} on {config.data}"
                )
            if last < config.epochs:
                print(
                    f"pnnh train: stopped after epoch {last} of {config.epochs} (--stop-after "
                    f"{config.stop_after}); continue with: "
                    f"{resume_command(self.out / 'last.pt', self.processes.world_size)}"
                )
        distributed.stop(self.processes)
        return summary

    def summary(self, seconds: float, ranks_agree: bool) -> dict[str, Any]:
        accuracies = [row["test_accuracy"] for row in self.history]
        backends = sorted(
            {
                m.backend_in_use
                for m in self.model.modules()
                if isinstance(m, (FusedPNNHConv, FusedPNNHLinear))
            }
        )
        return {
            **self.identity(),
            "parameters": count_parameters(self.model),
            "trained_parameters": count_parameters(self.model, trainable_only=True),
            "epochs_completed": len(self.history),
            "epochs_planned": self.config.epochs,
            "final_test_accuracy": accuracies[-1] if accuracies else None,
            "best_test_accuracy": max(accuracies) if accuracies else None,
            "seconds_this_invocation": seconds,
            "world_size": self.processes.world_size,
            "device": str(self.device),
            "precision": self.precision,
            # The optimizer's own peak: a resumed run's is its checkpoint's (restored with the
            # optimizer and scheduler state), or the --lr of an --override-resume-settings.
            "peak_lr": self.optimizer.param_groups[0].get("initial_lr", self.config.resolved_lr),
            "backends_in_use": backends,
            "ranks_agree": ranks_agree,
            "weights_fingerprint": [
                float(v) for v in distributed.weights_fingerprint(self.model).sum(0)
            ],
            "config": dataclasses.asdict(self.config),
        }
