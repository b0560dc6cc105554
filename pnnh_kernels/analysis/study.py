"""Training studies on scikit-learn's digits: depth scaling, coder sharing, coder initialisation.

Every run uses the same recipe (training.digits.train_classifier: SGD with momentum, one-cycle
learning rate, fixed train/test split); only the studied factor changes. Results are reported as
measured, whichever way they fall.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch

from pnnh_kernels.coder import PNNHCoder
from pnnh_kernels.models import deep_cnn
from pnnh_kernels.models.deep_cnn import DeepCNN
from pnnh_kernels.training.digits import DigitsSplit, train_classifier


@dataclass(frozen=True)
class StudyConfig:
    depths: tuple[int, ...]
    seeds: tuple[int, ...]
    epochs: int
    sharing_depths: tuple[int, ...]
    init_depth: int
    width: int = 16
    batch_size: int = 64
    max_lr: float = 0.05


# Under 10 minutes on 2 CPU cores.
QUICK = StudyConfig(depths=(8, 16, 32, 64), seeds=(0,), epochs=6, sharing_depths=(64,), init_depth=64)
# The full study: depths to 128, two seeds, the demo's 12 epochs (estimated 1 to 1.5 hours on 2 CPU
# cores from the quick run's cost per layer and epoch; the prototype behind the studies used 20).
FULL = StudyConfig(
    depths=(8, 16, 32, 64, 128), seeds=(0, 1), epochs=12, sharing_depths=(64, 128), init_depth=128
)
# End-to-end check for the test suite: seconds.
TINY = StudyConfig(depths=(2, 4), seeds=(0,), epochs=1, sharing_depths=(4,), init_depth=4, width=4)
# The peak-learning-rate sweep (preset "lr"): the three variants at depth 64, the full study's recipe
# otherwise; 0.05 repeats the full study's own runs (a reproducibility check).
LR_SWEEP = StudyConfig(depths=(64,), seeds=(0, 1), epochs=12, sharing_depths=(), init_depth=64)
LR_VALUES = (0.01, 0.02, 0.05)

CODER_WIDTHS = {"C/8": 8, "C/4": 4, "C/2": 2, "C": 1}  # divisor of the layer width


@dataclass(frozen=True)
class Run:
    study: str
    label: dict[str, Any]  # what varies: depth, variant, sharing, init, coder width, tied
    depth: int
    seed: int
    model_kwargs: dict[str, Any]
    max_lr: Optional[float] = None  # None: the config's (in the label when set, hence in run_id)


def run_id(run: Run, config: StudyConfig) -> str:
    """A file-name-safe id that changes whenever the run or the recipe it is trained with changes."""
    recipe = json.dumps(
        [run.study, run.label, run.depth, run.seed, run.model_kwargs, config.__dict__],
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    return f"{run.study}-d{run.depth}-s{run.seed}-{digest}"


def coder_reconstruction_error(coder: PNNHCoder, samples: int = 4096, seed: int = 0) -> float:
    """Relative error ||target - coder(x)||^2 / ||target||^2 on fresh x ~ relu(N(0, 1))."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, coder.in_channels, generator=generator).relu()
    target = coder.reconstruction_target(x)
    with torch.no_grad():
        reconstruction = coder(x.to(coder.encoder_weight.dtype))
    return float((reconstruction - target).square().sum() / target.square().sum())


def _first_coder(model: DeepCNN) -> Optional[PNNHCoder]:
    for module in model.modules():
        if isinstance(module, PNNHCoder):
            return module
    return None


def planned_runs(config: StudyConfig) -> Iterator[Run]:
    """All runs of the three studies; runs shared between studies are listed once."""
    seen = set()

    def run(study: str, label: dict, depth: int, seed: int, **kwargs: Any) -> Optional[Run]:
        key = (depth, seed, tuple(sorted(kwargs.items())))
        if key in seen:
            return None
        seen.add(key)
        return Run(study, label, depth, seed, kwargs)

    candidates = []
    for depth in config.depths:
        for variant in ("plain", "residual", "pnnh"):
            for seed in config.seeds:
                candidates.append(run("depth", {"variant": variant}, depth, seed, variant=variant))
    for depth in config.sharing_depths:
        for sharing, kwargs in (
            ("averaged", {}),
            ("summed", {"average_shared_gradient": False}),
            ("per_layer", {"coder_sharing": "per_layer"}),
        ):
            for seed in config.seeds:
                candidates.append(
                    run("sharing", {"sharing": sharing}, depth, seed, variant="pnnh", **kwargs)
                )
    depth = config.init_depth
    for seed in config.seeds:
        for init in ("rectified_normal", "identity", "he"):
            kwargs = (
                {"variant": "pnnh"}
                if init == "rectified_normal"
                else {"variant": "pnnh", "coder_init": init}
            )
            candidates.append(run("init", {"init": init}, depth, seed, **kwargs))
        for name, divisor in CODER_WIDTHS.items():
            channels = max(1, config.width // divisor)
            kwargs = {"variant": "pnnh"}
            if channels != config.width // 2:
                kwargs["coder_channels"] = channels
            candidates.append(run("coder_width", {"coder_width": name}, depth, seed, **kwargs))
        candidates.append(run("tying", {"tied": False}, depth, seed, variant="pnnh", coder_tied=False))
    return (c for c in candidates if c is not None)


def planned_lr_runs(config: StudyConfig, lrs: tuple[float, ...] = LR_VALUES) -> Iterator[Run]:
    """The learning-rate sweep: every variant at each depth of ``config`` and each peak rate."""
    for depth in config.depths:
        for lr in lrs:
            for variant in ("plain", "residual", "pnnh"):
                for seed in config.seeds:
                    label = {"variant": variant, "lr": lr}
                    yield Run("lr", label, depth, seed, {"variant": variant}, max_lr=lr)


def execute_run(run: Run, config: StudyConfig, data: DigitsSplit) -> dict[str, Any]:
    """Train one run and return its row."""
    torch.manual_seed(run.seed)
    model = deep_cnn(run.depth, config.width, **run.model_kwargs)
    coder = _first_coder(model)
    error_at_init = coder_reconstruction_error(coder) if coder else None
    result = train_classifier(
        model,
        data,
        epochs=config.epochs,
        batch_size=config.batch_size,
        max_lr=run.max_lr if run.max_lr is not None else config.max_lr,
        seed=run.seed,
    )
    return {
        "study": run.study,
        **run.label,
        "depth": run.depth,
        "seed": run.seed,
        "model": run.model_kwargs,
        "train_loss": result.train_loss,
        "test_accuracy": result.test_accuracy,
        "diverged": result.diverged,
        "seconds": result.seconds,
        "coder_error_at_init": error_at_init,
        "coder_error_after": coder_reconstruction_error(coder) if coder else None,
    }


def rows_for(rows: list[dict[str, Any]], study: str, config: StudyConfig) -> list[dict[str, Any]]:
    """The rows a study's table shows, including the runs it shares with other studies."""
    if study == "depth":
        return [r for r in rows if "variant" in r and r["study"] != "lr"]
    if study == "lr":
        return [r for r in rows if r["study"] == "lr"]
    if study == "sharing":
        shared = [
            r | {"sharing": "averaged"}
            for r in rows
            if r.get("variant") == "pnnh"
            and r["depth"] in config.sharing_depths
            and r["study"] == "depth"
        ]
        return shared + [r for r in rows if r["study"] == "sharing"]
    at_init_depth = [r for r in rows if r["depth"] == config.init_depth]
    default_pnnh = [
        r for r in at_init_depth if r.get("variant") == "pnnh" and r["study"] in ("depth", "sharing")
    ]
    if study == "init":
        return [r | {"init": "rectified_normal"} for r in default_pnnh if r["study"] == "depth"] + [
            r for r in rows if r["study"] == "init"
        ]
    if study == "coder_width":
        return [r | {"coder_width": "C/2"} for r in default_pnnh if r["study"] == "depth"] + [
            r for r in rows if r["study"] == "coder_width"
        ]
    if study == "tying":
        return [r | {"tied": True} for r in default_pnnh if r["study"] == "depth"] + [
            r for r in rows if r["study"] == "tying"
        ]
    raise ValueError(f"study: unknown {study!r}")
