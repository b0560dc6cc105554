"""The ViT depth study on digits: residual, plain and PNNH Vision Transformers (models.vit) at
several depths and seeds, one recipe for all.

``python -m pnnh_kernels.analysis.vit_study --out docs/results/vit_digits --jobs 2`` trains every
run (resumable: a finished run's JSON is reused) and writes ``results.json`` and ``README.md`` (the
table, the recipe, the machine and the date). Results are reported as measured, whichever way
they fall.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from pnnh_kernels.analysis.study import saved_run

VARIANTS = ("residual", "plain", "pnnh")
# The settings a study can train (issue #26): the variant and its models.vit keywords ("depth" as a
# layer_scale: the CNN's depth-scaled BatchNorm rule, min(1, sqrt(16 / sublayers with a coder))).
SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "residual": ("residual", {}),
    "plain": ("plain", {}),
    "pnnh": ("pnnh", {}),  # the rectified coder W_D relu(W_E x + b_E), fixed (the default)
    "pnnh, signed": ("pnnh", {"coder_kind": "signed"}),
    "pnnh, signed, learned": ("pnnh", {"coder_kind": "signed", "coder_trainable": True}),
    "pnnh, signed, depth-scaled": ("pnnh", {"coder_kind": "signed", "layer_scale": "depth"}),
    "pnnh, signed, MLP sublayers only": ("pnnh", {"coder_kind": "signed", "coder_sublayers": "mlp"}),
    "control: identity coder (the residual connection, not PNNH)": ("pnnh", {"coder_kind": "identity"}),
}


@dataclass(frozen=True)
class ViTStudyConfig:
    depths: tuple[int, ...] = (6, 12, 24)
    seeds: tuple[int, ...] = (0, 1, 2)
    dim: int = 32
    heads: int = 4
    patch_size: int = 2  # 8x8 digits: 16 tokens
    epochs: int = 12
    batch_size: int = 64
    max_lr: float = 2e-3  # AdamW, one-cycle: the usual ViT optimiser (SGD at 0.05 left the
    weight_decay: float = 0.05  # residual ViT at 45% on digits in a trial; AdamW at 2e-3: 74%)
    settings: tuple[str, ...] = VARIANTS  # names in SETTINGS


FULL = ViTStudyConfig()  # the study of 2026-11-28 (docs/results/vit_digits)
# Coders for a signed stream (issue #26): 40 epochs, where the residual ViT is well trained (depth 6,
# seed 0: 0.978 against 0.738 at 12 epochs, 2026-12-08), every setting, depths 6 to 24.
CODERS = ViTStudyConfig(depths=(6, 12, 24), epochs=40, settings=tuple(SETTINGS))
TINY = ViTStudyConfig(depths=(1, 2), seeds=(0,), epochs=1, dim=8, heads=2)  # the test suite's
PRESETS = {"full": FULL, "coders": CODERS}


def model_kwargs(setting: str, depth: int) -> tuple[str, dict[str, Any]]:
    """(variant, models.vit keywords) of a setting at ``depth``."""
    from pnnh_kernels.models.coder_bank import default_coder_layer_norm_scale

    if setting not in SETTINGS:
        raise ValueError(f"setting: expected one of {tuple(SETTINGS)}, got {setting!r}")
    variant, kwargs = SETTINGS[setting]
    kwargs = dict(kwargs)
    if kwargs.get("layer_scale") == "depth":
        coded = depth if kwargs.get("coder_sublayers") == "mlp" else 2 * depth
        kwargs["layer_scale"] = default_coder_layer_norm_scale(coded)
    return variant, kwargs


def _slug(setting: str) -> str:
    """A file-name part: the three variants' own names (the 2026-11-28 runs keep theirs)."""
    return "".join(c if c.isalnum() else "-" for c in setting).strip("-")


def _recipe(config: ViTStudyConfig) -> dict[str, Any]:
    """The config as saved runs record it: ``settings`` only where not the three variants (the
    2026-11-28 runs were saved before it existed)."""
    recipe = asdict(config)
    if config.settings == VARIANTS:
        del recipe["settings"]
    return json.loads(json.dumps(recipe))


def run_one(setting: str, depth: int, seed: int, config: ViTStudyConfig) -> dict[str, Any]:
    from pnnh_kernels.models.vit import vit
    from pnnh_kernels.training.digits import load_digits_split, train_classifier

    torch.set_num_threads(1)  # the numbers then do not depend on the machine's core count
    torch.manual_seed(seed)
    variant, kwargs = model_kwargs(setting, depth)
    model = vit(variant, image_size=8, patch_size=config.patch_size, in_channels=1,
                dim=config.dim, depth=depth, heads=config.heads, **kwargs)  # fmt: skip
    result = train_classifier(
        model, load_digits_split(), epochs=config.epochs, batch_size=config.batch_size,
        max_lr=config.max_lr, weight_decay=config.weight_decay, seed=seed, optimizer_name="adamw",
    )  # fmt: skip
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"variant": setting, "depth": depth, "seed": seed, **asdict(result),
            "parameters": sum(p.numel() for p in model.parameters()),
            "trained_parameters": trained}  # fmt: skip


def run_study(config: ViTStudyConfig, out: Path, jobs: int = 1) -> list[dict[str, Any]]:
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    planned = [(v, d, s) for d in config.depths for v in config.settings for s in config.seeds]
    rows: list[dict[str, Any]] = []
    pending = []
    for setting, depth, seed in planned:
        saved = saved_run(runs_dir / f"{_slug(setting)}_d{depth}_s{seed}.json")
        if saved is not None and saved.get("config") == _recipe(config):
            rows.append(saved)
        else:
            pending.append((setting, depth, seed))
    pending.sort(key=lambda run: -run[1])  # deepest first, so that parallel jobs end together
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [(run, pool.submit(run_one, *run, config)) for run in pending]
        for (setting, depth, seed), future in futures:
            row = {**future.result(), "config": _recipe(config)}
            path = runs_dir / f"{_slug(setting)}_d{depth}_s{seed}.json"
            path.write_text(json.dumps(row, indent=1))
            rows.append(row)
    return rows


def summarise(rows: list[dict[str, Any]], config: ViTStudyConfig) -> list[dict[str, Any]]:
    table = []
    for depth in config.depths:
        for variant in config.settings:
            mine = [r for r in rows if r["variant"] == variant and r["depth"] == depth]
            accuracies = [r["test_accuracy"] for r in mine]
            table.append({
                "depth": depth, "variant": variant, "runs": len(mine),
                "mean": statistics.fmean(accuracies) if accuracies else float("nan"),
                "std": statistics.pstdev(accuracies) if len(accuracies) > 1 else 0.0,
                "each": accuracies, "diverged": sum(r["diverged"] for r in mine),
                "parameters": mine[0]["parameters"] if mine else None,
            })  # fmt: skip
    return table


def _preset_name(config: ViTStudyConfig) -> str:
    return next((name for name, preset in PRESETS.items() if preset == config), "tiny (--tiny)")


def machine() -> str:
    """The CPU's model name and core count, for the record."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def markdown(table: list[dict[str, Any]], config: ViTStudyConfig, seconds: float) -> str:
    lines = [
        "# ViT depth study on digits: residual, plain, PNNH",
        "",
        f"Recipe: scikit-learn digits (8x8, fixed stratified 75/25 split), ViT with {config.patch_size}x"
        f"{config.patch_size} patches (16 tokens), dim {config.dim}, {config.heads} heads, MLP 4x, "
        f"pre-norm; AdamW (weight decay {config.weight_decay}), one-cycle to {config.max_lr}, "
        f"{config.epochs} epochs, batch {config.batch_size}; seeds {list(config.seeds)}; one CPU "
        "thread per run. The PNNH variant: residual connections removed, a fixed rectified-isometry "
        "coder (C_B = dim / 2) per sublayer kind, shared by all blocks (pnnh_kernels/models/vit.py).",
        f"Machine: {machine()}, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}; {seconds / 60:.1f} minutes of this invocation.",
        "Reproduce: `python -m pnnh_kernels.analysis.vit_study --out DIR --jobs 2"
        + ("`." if config == FULL else f" --preset {_preset_name(config)}`."),
        "",
        "Settings (models.vit): "
        + "; ".join(
            f"{name}: {SETTINGS[name][0]} {SETTINGS[name][1] or ''}".strip() for name in config.settings
        )
        + ".",
        "",
        "| depth | variant | test accuracy (mean +- std) | per seed | diverged | parameters |",
        "|---|---|---|---|---|---|",
    ]
    for row in table:
        each = ", ".join(f"{a:.3f}" for a in row["each"])
        lines.append(
            f"| {row['depth']} | {row['variant']} | {row['mean']:.3f} +- {row['std']:.3f} | {each} | "
            f"{row['diverged']} | {row['parameters']:,} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/vit_digits"))
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (processes)")
    parser.add_argument("--tiny", action="store_true", help="the test suite's seconds-long version")
    parser.add_argument(
        "--preset", choices=list(PRESETS), default="full",
        help="full: the three variants, 12 epochs (2026-11-28); coders: every coder setting of "
        "issue #26 at 40 epochs, depths 6-24 (about 35 minutes with --jobs 2 on 2 cores)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise ValueError(f"--jobs: expected a positive number of processes, got {args.jobs}")
    config = TINY if args.tiny else PRESETS[args.preset]
    start = time.perf_counter()
    rows = run_study(config, args.out, args.jobs)
    table = summarise(rows, config)
    (args.out / "results.json").write_text(json.dumps({"config": asdict(config), "table": table},
                                                      indent=1))  # fmt: skip
    (args.out / "README.md").write_text(markdown(table, config, time.perf_counter() - start))
    print((args.out / "README.md").read_text())


if __name__ == "__main__":
    main()
