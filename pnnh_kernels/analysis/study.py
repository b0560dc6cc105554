"""Training studies on scikit-learn's digits: depth scaling, coder sharing, coder initialisation.

Every run uses the same recipe (training.digits.train_classifier: SGD with momentum, one-cycle
learning rate, fixed train/test split); only the studied factor changes. Results are reported as
measured, whichever way they fall.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from pnnh_kernels.analysis.probes import coder_gain
from pnnh_kernels.coder import CODER_INITS, DEFAULT_CODER_INIT, PNNHCoder
from pnnh_kernels.models import deep_cnn
from pnnh_kernels.models.deep_cnn import DeepCNN
from pnnh_kernels.models.parameters import count_parameters
from pnnh_kernels.training.digits import CoderObjective, DigitsSplit, train_classifier


@dataclass(frozen=True)
class StudyConfig:
    depths: tuple[int, ...]  # the depth study: plain, residual and PNNH (the default layer)
    seeds: tuple[int, ...]
    epochs: int
    sharing_depths: tuple[int, ...] = ()  # how a *trained* shared coder's gradient is handled
    init_depth: Optional[int] = None  # coder init, width and tying studies (None: none)
    width: int = 16
    batch_size: int = 64
    max_lr: float = 0.05
    ablation_depths: tuple[int, ...] = ()  # the coder ablation (ABLATION)
    check_width: Optional[int] = None  # the depth study's three variants again at this width ...
    check_depth: Optional[int] = None  # ... and this depth
    learned_depths: tuple[int, ...] = ()  # coders that learn (LEARNED), beside the default
    learned_settings: Optional[tuple[str, ...]] = None  # which LEARNED settings (None: all)
    # "digits", or "fashion-mnist": (train images, test images, pooling) of its study split
    dataset: str = "digits"
    fashion_split: tuple[int, int, int] = (2000, 2000, 2)
    # Parameter efficiency (issue #25): the three variants at each of these widths and depths
    param_widths: tuple[int, ...] = ()
    param_depths: tuple[int, ...] = ()


# Under 10 minutes on 2 CPU cores.
QUICK = StudyConfig(depths=(8, 16, 32, 64), seeds=(0,), epochs=6, sharing_depths=(64,), init_depth=64)
# The full study: depths to 128, three seeds, the demo's 12 epochs, the coder ablation at depths 16 to
# 128 and the three variants again at width 32, depth 64 (about 2.5 hours of one CPU core per job;
# `--jobs 2` on 2 cores: about 80 minutes).
FULL = StudyConfig(
    depths=(8, 16, 32, 64, 128),
    seeds=(0, 1, 2),
    epochs=12,
    ablation_depths=(16, 32, 64, 128),
    check_width=32,
    check_depth=64,
)
# The coder studies of the default layer (init, coder width, tying; trained-coder sharing), depth 64.
CODERS = StudyConfig(depths=(), seeds=(0, 1, 2), epochs=12, sharing_depths=(64,), init_depth=64)
# Coders that learn (issue #25): the depth study's three variants and the LEARNED settings at
# depths 16 to 128, 3 seeds, the full study's recipe.
LEARNED_CODERS = StudyConfig(
    depths=(16, 32, 64, 128), seeds=(0, 1, 2), epochs=12, learned_depths=(16, 32, 64, 128)
)
# Real images (issue #25): Fashion-MNIST at 14 x 14 (2,000 training and 2,000 test images), the
# three variants and the learned coder held at gain 1 beside the default, depths 16 and 64, 3 seeds:
# the subset a 2-core CPU trains in about half an hour with --jobs 2.
FASHION = StudyConfig(
    depths=(16, 64), seeds=(0, 1, 2), epochs=12, learned_depths=(16, 64),
    learned_settings=("(iii) orthonormal rows, task only",), dataset="fashion-mnist",
)  # fmt: skip
# Parameter efficiency (issue #25): accuracy against parameters, the three variants at widths 8 to
# 32 (9,650 to 149,162 trained parameters at depth 16; the three share an architecture, so the
# same count at each width) and depths 16 and 32, 3 seeds, the full study's recipe: about 35
# minutes with --jobs 2 on 2 cores.
PARAMS = StudyConfig(
    depths=(), seeds=(0, 1, 2), epochs=12, param_widths=(8, 12, 16, 24, 32), param_depths=(16, 32)
)
# End-to-end check for the test suite: seconds.
TINY = StudyConfig(
    depths=(2, 4),
    seeds=(0,),
    epochs=1,
    sharing_depths=(4,),
    init_depth=4,
    width=4,
    ablation_depths=(4,),
    check_width=6,
    check_depth=2,
    learned_depths=(4,),
    param_widths=(4, 8),  # at depth 2 width 4 the depth study's runs serve it
    param_depths=(2,),
)
# The peak-learning-rate sweep (preset "lr"): the three variants at depth 64, the full study's recipe
# otherwise; 0.05 repeats the full study's own runs (a reproducibility check).
LR_SWEEP = StudyConfig(depths=(64,), seeds=(0, 1), epochs=12, init_depth=64)
LR_VALUES = (0.01, 0.02, 0.05)

CODER_WIDTHS = {"C/8": 8, "C/4": 4, "C/2": 2, "C": 1}  # divisor of the layer width

# The coder ablation: the three changes that together make the default (2026-11-28) — the coder's
# closed-form isometric init, keeping it fixed, and the depth-scaled initial BatchNorm scale of the
# layers with a coder (models.coder_bank.default_coder_layer_norm_scale) — alone and combined; every
# other setting the default's (one coder shared by all layers, tied, C/2). The first setting is the
# default before 2026-11-28. Not run (for time): the pairs that leave out the isometric init or the
# fixing, and the scale 0 of zero-gamma residual nets (probed, docs/analysis.md).
DEFAULT_LABEL = "rectified_isometry, fixed, depth-scaled (default)"
ABLATION = {
    "rectified_normal, trained, scale 1": {
        "coder_init": "rectified_normal",
        "coder_trainable": True,
        "coder_layer_norm_scale": 1.0,
    },
    "rectified_isometry, trained, scale 1": {"coder_trainable": True, "coder_layer_norm_scale": 1.0},
    "rectified_normal, fixed, scale 1": {
        "coder_init": "rectified_normal",
        "coder_layer_norm_scale": 1.0,
    },
    "rectified_normal, trained, depth-scaled": {
        "coder_init": "rectified_normal",
        "coder_trainable": True,
    },
    "rectified_isometry, fixed, scale 1": {"coder_layer_norm_scale": 1.0},
    DEFAULT_LABEL: {},
}


# Coders that learn (issue #25): every setting starts from the default layer (the shared tied C/2
# coder at the closed-form rectified isometry, the depth-scaled BatchNorm scale) and trains the
# coder, without weight decay on it, by: (i) the task's gradient plus the paper's self-supervised
# reconstruction of fresh rectified-normal samples at weight w; (ii) the reconstruction alone;
# (iii) the task's gradient, the encoder kept with orthonormal rows by a parametrisation and no
# encoder bias, so the path W_E^T relu(W_E x) keeps a gain of at most 1 (the same stored parameters
# as the default coder; its zero bias is not trained).
LEARNED_DEFAULT = "fixed isometry (default, not learned)"
LEARNED: dict[str, dict[str, Any]] = {
    "(i) task + 0.1 x reconstruction": {"objective": {"weight": 0.1}},
    "(i) task + 1 x reconstruction": {"objective": {"weight": 1.0}},
    "(ii) reconstruction only": {"objective": {"weight": 1.0, "task_gradient": False}},
    "(iii) orthonormal rows, task only": {"objective": {"weight": 0.0}, "constraint": "orthonormal"},
}


@dataclass(frozen=True)
class Run:
    study: str
    label: dict[str, Any]  # what varies: depth, variant, sharing, init, coder width, tied
    depth: int
    seed: int
    model_kwargs: dict[str, Any]
    max_lr: Optional[float] = None  # None: the config's (in the label when set, hence in run_id)
    width: Optional[int] = None  # None: the config's (in the label when set, hence in run_id)
    coder_training: Optional[dict[str, Any]] = None  # a LEARNED setting: objective, constraint

    def cost(self, config: StudyConfig) -> int:
        """Relative training cost (layers x width^2), to start the longest runs first."""
        return self.depth * (self.width or config.width) ** 2


def run_id(run: Run, config: StudyConfig) -> str:
    """A file-name-safe id that changes whenever the run or the recipe it is trained with changes."""
    # Fields added to the recipe after runs were saved count only where set, so that those runs keep
    # their ids (and are reused, not trained again): learned_depths (2026-12-07), coder_training.
    added_later = {"learned_depths": (), "learned_settings": None, "dataset": "digits",
                   "fashion_split": (2000, 2000, 2), "param_widths": (), "param_depths": ()}  # fmt: skip
    recipe_config = {
        k: v for k, v in config.__dict__.items() if k not in added_later or v != added_later[k]
    }
    parts: list[Any] = [run.study, run.label, run.depth, run.seed, run.model_kwargs, recipe_config]
    if run.coder_training is not None:
        parts.append(run.coder_training)
    recipe = json.dumps(
        parts,
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    return f"{run.study}-d{run.depth}-s{run.seed}-{digest}"


def _first_coder(model: DeepCNN) -> Optional[PNNHCoder]:
    for module in model.modules():
        if isinstance(module, PNNHCoder):
            return module
    return None


def planned_runs(config: StudyConfig) -> Iterator[Run]:
    """All runs of the studies ``config`` asks for; runs shared between studies are listed once."""
    seen = set()

    def run(
        study: str, label: dict, depth: int, seed: int, width: Optional[int] = None, **kwargs: Any
    ) -> Optional[Run]:
        key = (depth, seed, width, tuple(sorted(kwargs.items())))
        if key in seen:
            return None
        seen.add(key)
        return Run(study, label, depth, seed, kwargs, width=width)

    candidates = []
    for depth in config.depths:
        for variant in ("plain", "residual", "pnnh"):
            for seed in config.seeds:
                candidates.append(run("depth", {"variant": variant}, depth, seed, variant=variant))
    for depth in config.ablation_depths:
        for setting, kwargs in ABLATION.items():
            for seed in config.seeds:
                candidates.append(
                    run("ablation", {"setting": setting}, depth, seed, variant="pnnh", **kwargs)
                )
    for depth in config.learned_depths:
        for setting, training in LEARNED.items():
            if config.learned_settings is not None and setting not in config.learned_settings:
                continue
            for seed in config.seeds:
                candidates.append(
                    Run("learned", {"setting": setting}, depth, seed,
                        {"variant": "pnnh", "coder_trainable": True}, coder_training=training)
                )  # fmt: skip
    if config.check_width is not None and config.check_depth is not None:
        for variant in ("plain", "residual", "pnnh"):
            for seed in config.seeds:
                label = {"variant": variant, "width": config.check_width}
                candidates.append(
                    run(
                        "width_check",
                        label,
                        config.check_depth,
                        seed,
                        config.check_width,
                        variant=variant,
                    )
                )
    for depth in config.sharing_depths:
        # Only a trained coder has a gradient to share: the three ways of handling it.
        for sharing, kwargs in (
            ("averaged", {}),
            ("summed", {"average_shared_gradient": False}),
            ("per_layer", {"coder_sharing": "per_layer"}),
        ):
            for seed in config.seeds:
                candidates.append(
                    run(
                        "sharing",
                        {"sharing": sharing},
                        depth,
                        seed,
                        variant="pnnh",
                        coder_trainable=True,
                        **kwargs,
                    )
                )
    depth = config.init_depth
    for seed in config.seeds if depth is not None else ():
        for init in CODER_INITS:
            kwargs = (
                {"variant": "pnnh"}
                if init == DEFAULT_CODER_INIT
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
    # Planned last: where the depth study or the width check already trains a variant at a depth
    # and width, that run serves the parameter study too (rows_for).
    for depth in config.param_depths:
        for width in config.param_widths:
            for variant in ("plain", "residual", "pnnh"):
                for seed in config.seeds:
                    own = None if width == config.width else width
                    label = {"variant": variant, "width": width}
                    candidates.append(run("params", label, depth, seed, own, variant=variant))
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
    width = run.width or config.width
    model = deep_cnn(run.depth, width, **run.model_kwargs)
    coder = _first_coder(model)
    training = run.coder_training or {}
    if training.get("constraint") == "orthonormal" and coder is not None:
        _keep_orthonormal_rows(coder)
    error_at_init = coder.reconstruction_error() if coder else None
    gain_at_init = coder_gain(coder) if coder else None
    objective = training.get("objective")
    result = train_classifier(
        model,
        data,
        epochs=config.epochs,
        batch_size=config.batch_size,
        max_lr=run.max_lr if run.max_lr is not None else config.max_lr,
        seed=run.seed,
        coder_objective=None if objective is None else CoderObjective(**objective),
    )
    return {
        "study": run.study,
        **run.label,
        "depth": run.depth,
        "width": width,
        "seed": run.seed,
        "model": run.model_kwargs,
        "train_loss": result.train_loss,
        "test_accuracy": result.test_accuracy,
        "diverged": result.diverged,
        "seconds": result.seconds,
        "coder_error_at_init": error_at_init,
        "coder_error_after": coder.reconstruction_error() if coder else None,
        "coder_gain_at_init": gain_at_init,
        "coder_gain_after": coder_gain(coder) if coder else None,
        # what the optimizer trains (a fixed coder is stored, not trained) and what a checkpoint
        # stores (a shared coder once), as parameter elements
        "trained_parameters": count_parameters(model, trainable_only=True),
        "stored_parameters": count_parameters(model),
    }


def _keep_orthonormal_rows(coder: PNNHCoder) -> None:
    """Setting (iii): W_E with orthonormal rows for the whole run (an orthogonal parametrisation,
    which starts at the rectified isometry itself: its rows are orthonormal) and no encoder bias,
    so that ||W_E^T relu(W_E x)|| <= ||relu(W_E x)|| <= ||W_E x|| <= ||x||: gain at most 1."""
    if not coder.tied:
        raise ValueError("the orthonormal-rows setting is for the tied coder")
    if coder.encoder_bias is not None:
        with torch.no_grad():
            coder.encoder_bias.zero_()
        coder.encoder_bias.requires_grad_(False)
    torch.nn.utils.parametrizations.orthogonal(coder, "encoder_weight")


def _is_default_pnnh(row: dict[str, Any], config: StudyConfig) -> bool:
    """A run of the default PNNH layer at the config's width (whichever study planned it)."""
    return row["model"] == {"variant": "pnnh"} and row.get("width", config.width) == config.width


def _beside_default(
    rows: list[dict[str, Any]],
    config: StudyConfig,
    study: str,
    depths: tuple[int, ...],
    default_label: str,
    references: dict[str, str],
) -> list[dict[str, Any]]:
    """A study's own rows at ``depths``, the default PNNH layer's (planned by whichever study) as
    the setting ``default_label``, and the depth study's ``references`` variants under their names."""
    out = []
    for r in rows:
        if r["depth"] not in depths:
            continue
        if r["study"] == study:
            out.append(r)
        elif _is_default_pnnh(r, config):
            out.append(r | {"setting": default_label})
        elif r["study"] == "depth" and r["variant"] in references:
            out.append(r | {"setting": references[r["variant"]]})
    return out


def rows_for(rows: list[dict[str, Any]], study: str, config: StudyConfig) -> list[dict[str, Any]]:
    """The rows a study's table shows, including the runs it shares with other studies."""
    if study in ("depth", "lr", "width_check", "sharing"):
        return [r for r in rows if r["study"] == study]
    if study == "params":
        # its own runs, and the depth study's and the width check's at its depths and widths (the
        # same variants, trained by the same recipe)
        return [
            r | {"width": r.get("width", config.width)} for r in rows
            if r["study"] in ("params", "depth", "width_check") and r["depth"] in config.param_depths
            and r.get("width", config.width) in config.param_widths
        ]  # fmt: skip
    if study == "learned":
        return _beside_default(rows, config, study, config.learned_depths, LEARNED_DEFAULT, {})
    if study == "ablation":
        references = {"residual": "residual net", "plain": "plain net"}
        return _beside_default(rows, config, study, config.ablation_depths, DEFAULT_LABEL, references)
    at_init_depth = [r for r in rows if r["depth"] == config.init_depth and _is_default_pnnh(r, config)]
    defaults = {"init": "rectified_isometry", "coder_width": "C/2", "tied": True}
    if study in ("init", "coder_width", "tying"):
        key = "tied" if study == "tying" else study
        # The default's run, planned by another study (or by this one: then listed once).
        shared = [r | {key: defaults[key]} for r in at_init_depth if r["study"] != study]
        return shared + [r for r in rows if r["study"] == study]
    raise ValueError(f"study: unknown {study!r}")


def saved_run(path: Path) -> Optional[dict[str, Any]]:
    """A finished run's saved row, or None: when there is none, or (with a warning naming the file)
    when it cannot be read, e.g. cut short by a full disk: the run is trained again rather than the
    study failing. Used by ``pnnh analyze`` and the ViT study."""
    if not path.exists():
        return None
    try:
        row = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        warnings.warn(f"{path}: unreadable saved run ({error}); training it again", stacklevel=2)
        return None
    if not isinstance(row, dict):
        warnings.warn(f"{path}: not a saved run (a JSON object); training it again", stacklevel=2)
        return None
    return row
