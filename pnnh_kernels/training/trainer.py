"""The training loop behind ``pnnh train``: one process or many (torchrun), resumable exactly."""

from __future__ import annotations

import dataclasses
import math
import resource
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pnnh_kernels.backends import check_backend_name
from pnnh_kernels.coder import PNNHCoder
from pnnh_kernels.models import count_parameters, resnet18, resnet34, resnet50
from pnnh_kernels.models.coder_bank import check_variant
from pnnh_kernels.models.vit import vit_small, vit_tiny
from pnnh_kernels.pnnh_conv import FusedPNNHConv
from pnnh_kernels.pnnh_linear import FusedPNNHLinear
from pnnh_kernels.training import checkpoint, distributed, metrics
from pnnh_kernels.training.data import DataSpec, ImageData
from pnnh_kernels.training.optim import WarmupSchedule, scheduler, sgd

MODELS = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
}
PRECISIONS = {"auto": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Settings that may change between a run and its resumption without changing what is trained.
# The default peak learning rate: 0.1 per 128 images of global batch (the CIFAR ResNet recipe's 0.1
# at 128, scaled linearly). A fixed 0.1 diverged at batch 32 (the README's smoke run: NaN in epoch 2,
# or a first-epoch test loss of 3e5), where 0.025 trains it to 100% test accuracy.
LR_PER_128_IMAGES = 0.1
RESUMABLE_CHANGES = {"resume", "stop_after", "out", "workers", "compile", "cuda_graphs", "overwrite"}


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

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"--model: expected one of {tuple(MODELS)}, got {self.model!r}")
        check_variant(self.variant)
        check_backend_name(self.backend)
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision: expected one of {tuple(PRECISIONS)}, got {self.precision!r}")
        for name in ("epochs", "batch_size", "coder_loss_samples"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')}: expected a positive int, got {getattr(self, name)}"
                )
        if self.overwrite and self.resume:
            raise ValueError(
                "--overwrite: starts a new run over the one in --out, --resume continues one: give "
                "one of them"
            )
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(
                f"--image-size: expected an int >= 8 (the networks downsample 8x), got {self.image_size}"
            )
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
        return 224 if self.data == "folder" else 32

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
        )
    else:
        model = MODELS[config.model](
            config.variant,
            stem=config.stem,
            num_classes=num_classes,
            coder_trainable=config.coder_trainable,
        )
    backend = check_backend_name(config.backend)
    for module in model.modules():
        if isinstance(module, (FusedPNNHConv, FusedPNNHLinear)):
            module.backend = backend
    return model


def distinct_coders(model: nn.Module) -> list[PNNHCoder]:
    found: dict[int, PNNHCoder] = {}
    for module in model.modules():
        if isinstance(module, PNNHCoder):
            found.setdefault(id(module), module)
    return list(found.values())


def coder_reconstruction_loss(coders: list[PNNHCoder], samples: int, device: torch.device) -> Tensor:
    """Mean over the coders of the autoencoder loss on fresh rectified-normal inputs: the task the
    coders were initialised on, kept as an auxiliary loss so the internal path stays an autoencoder."""
    losses = []
    for coder in coders:
        features = torch.randn(samples, coder.in_channels, device=device).relu()
        losses.append(F.mse_loss(coder(features), coder.reconstruction_target(features)))
    return torch.stack(losses).mean()


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
        config.validate()
        check_out_folder(config)  # on every process, before any starts work
        self.config = config
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
        if config.resume:
            self._resume(Path(config.resume))
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

    def _resume(self, path: Path) -> None:
        state = checkpoint.load_for_resume(path, self.identity())
        changed = {
            key
            for key, value in state["config"].items()
            if key not in RESUMABLE_CHANGES and getattr(self.config, key, value) != value
        }
        if "lr" in changed:
            # Compare what the runs train with: a checkpoint from before the batch-scaled default
            # (lr 0.1 at batch 128) resolves to the same peak as lr=None does now.
            before = TrainConfig(**{**dataclasses.asdict(self.config), "lr": state["config"]["lr"],
                                    "batch_size": state["config"]["batch_size"]})  # fmt: skip
            if before.resolved_lr == self.config.resolved_lr:
                changed.discard("lr")
        if changed and self.processes.is_main:
            warnings.warn(
                f"--resume: these settings differ from the checkpoint's run and apply from epoch "
                f"{state['epoch'] + 1}: {sorted(changed)}",
                stacklevel=2,
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
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
                coder_loss = coder_reconstruction_loss(
                    self.coders, config.coder_loss_samples, self.device
                )
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
        if self.processes.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if config.overwrite:
                for path in existing_run_files(self.out):
                    path.unlink()
            checkpoint.check_space(self.out, self._checkpoint_bytes())
            print(
                f"pnnh train: {config.model} {config.variant} on {config.data} "
                f"({self.data.train_size} training images, {self.data.num_classes} classes), "
                f"{count_parameters(self.model):,} parameters, {self.processes.world_size} process(es) "
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
            "epochs_completed": len(self.history),
            "epochs_planned": self.config.epochs,
            "final_test_accuracy": accuracies[-1] if accuracies else None,
            "best_test_accuracy": max(accuracies) if accuracies else None,
            "seconds_this_invocation": seconds,
            "world_size": self.processes.world_size,
            "device": str(self.device),
            "precision": self.precision,
            # The optimizer's own peak: a resumed run keeps its checkpoint's (restored with the
            # optimizer and scheduler state), whatever this invocation's --lr says.
            "peak_lr": self.optimizer.param_groups[0].get("initial_lr", self.config.resolved_lr),
            "backends_in_use": backends,
            "ranks_agree": ranks_agree,
            "weights_fingerprint": [
                float(v) for v in distributed.weights_fingerprint(self.model).sum(0)
            ],
            "config": dataclasses.asdict(self.config),
        }
