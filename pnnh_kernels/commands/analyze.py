"""``pnnh analyze``: curves, bounds and studies, written as
PNG figures, a JSON file and a Markdown summary."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pnnh_kernels.analysis import parameter_efficiency, study
from pnnh_kernels.analysis.curves import LayerCurvePoint, he_stack, layer_curves
from pnnh_kernels.analysis.probes import coder_gain
from pnnh_kernels.coder import CODER_INITS, PNNHCoder, default_code_channels
from pnnh_kernels.markdown import markdown_table
from pnnh_kernels.training.digits import (
    DigitsSplit,
    load_digits_split,
    load_fashion_split,
    require_scikit_learn,
)

VARIANTS = ("plain", "residual", "pnnh")
PRESETS = {
    "quick": study.QUICK,
    "full": study.FULL,
    "coders": study.CODERS,
    "tiny": study.TINY,
    "lr": study.LR_SWEEP,
    "learned": study.LEARNED_CODERS,
    "fashion": study.FASHION,
    "params": study.PARAMS,
}


def study_data(config: study.StudyConfig) -> DigitsSplit:
    """The training data of a preset's runs: the digits, or the Fashion-MNIST study split."""
    if config.dataset == "fashion-mnist":
        return load_fashion_split(*config.fashion_split)
    return load_digits_split()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="quick",
        help="quick: under 10 minutes on 2 CPU cores (default); full: depths to 128, 3 seeds, "
        "12 epochs, the coder ablation and a width-32 check (about 80 minutes with --jobs 2 on 2 "
        "cores); coders: the coder's init, width, tying and trained-coder sharing at depth 64; "
        "lr: the three variants at depth 64 for peak learning rates 0.01, 0.02, 0.05 (about 20 "
        "minutes); learned: coders that learn by the paper's reconstruction task, beside the fixed "
        "default, depths 16-128, 3 seeds (about 70 minutes with --jobs 2); tiny: a seconds-long "
        "end-to-end check; fashion: the three variants and the gain-1 learned coder on "
        "Fashion-MNIST at 14 x 14, depths 16 and 64, 3 seeds (about 30 minutes with --jobs 2); "
        "params: accuracy against parameters, the three variants at widths 8-32 and depths 16 and "
        "32, 3 seeds (about 35 minutes with --jobs 2)",
    )
    parser.add_argument("--curve-depth", type=int, default=None, help="depth of the He-init curves")
    parser.add_argument("--out", type=Path, default=Path("analysis_output"))
    parser.add_argument("--skip-training", action="store_true", help="curves and bounds only")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per training run (default: torch's; 1 with --jobs)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="training runs at once, each in its own process (results do not depend on it when "
        "--threads is the same)",
    )
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="retrain every run instead of reusing the rows saved under OUT/runs/ by an earlier, "
        "interrupted run with the same preset",
    )


def _progress(total: int, description: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=description, unit="run")


def curves(depth: int, width: int, samples: int = 256) -> list[LayerCurvePoint]:
    data = load_digits_split()
    digits = data.train_images[:samples]
    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(digits.shape, generator=generator)
    points = []
    for variant in VARIANTS:
        for name, batch in (("digits", digits), ("gaussian", gaussian)):
            torch.manual_seed(0)
            # float64: without normalisation the residual stack's activations double in variance per
            # layer and overflow float32 past layer ~115, which made the bounds NaN at depth 128.
            stack = he_stack(depth, width, variant).double()
            points += layer_curves(stack, batch.double(), name)
    return points


def coder_gains_at_init(width: int, seeds: tuple[int, ...] = (0, 1, 2)) -> list[list[str]]:
    """Rows: coder init, seed, the shared coder's gain (coder_gain) and that gain to the power 64
    and 128, what it compounds to over a deep_cnn of that depth."""
    rows = []
    for init in CODER_INITS:
        for seed in seeds:
            torch.manual_seed(seed)
            gain = coder_gain(PNNHCoder(width, default_code_channels(width), init=init))
            rows.append([init, str(seed), f"{gain:.4f}", f"{gain**64:.3g}", f"{gain**128:.3g}"])
    return rows


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def study_tables(rows: list[dict[str, Any]], config: study.StudyConfig) -> str:
    """Markdown tables, mean over seeds (diverged runs counted and shown, not averaged)."""
    out = []
    specs = [
        ("depth", "Depth scaling", ("depth", "variant")),
        ("init", f"Coder initialisation (PNNH, depth {config.init_depth})", ("init",)),
        (
            "coder_width",
            f"Coder width C_B (PNNH, depth {config.init_depth}, C = {config.width})",
            ("coder_width",),
        ),
        ("tying", f"Tied vs untied coder (PNNH, depth {config.init_depth})", ("tied",)),
        (
            "ablation",
            "Coder ablation (PNNH; residual and plain nets for reference)",
            ("setting", "depth"),
        ),
        ("width_check", f"The three variants at width {config.check_width}", ("depth", "variant")),
        (
            "sharing",
            "Trained shared coder: its gradient averaged, summed, or one coder per layer",
            ("depth", "sharing"),
        ),
        ("lr", "Peak learning rate", ("depth", "lr", "variant")),
    ]
    for name, title, keys in specs:
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for row in study.rows_for(rows, name, config):
            groups[tuple(row[k] for k in keys)].append(row)
        if not groups:  # a preset without this study
            continue
        table_rows = []
        for key in sorted(groups, key=lambda k: tuple(str(v).zfill(4) for v in k)):
            runs = groups[key]
            finite = [r for r in runs if not r["diverged"]]
            diverged = len(runs) - len(finite)
            errors = [r["coder_error_after"] for r in finite if r["coder_error_after"] is not None]
            table_rows.append(
                [
                    *(str(v) for v in key),
                    f"{_mean([r['train_loss'] for r in finite]):.3f}" if finite else "diverged",
                    f"{_mean([r['test_accuracy'] for r in runs]):.3f}",
                    f"{min(r['test_accuracy'] for r in runs):.3f}",
                    f"{diverged}/{len(runs)}",
                    f"{_mean(errors):.3f}" if errors else "-",
                ]
            )
        out.append(
            f"### {title}\n\n"
            + markdown_table(
                [
                    *keys,
                    "train loss",
                    "test accuracy (mean)",
                    "(min)",
                    "diverged",
                    "coder error after training",
                ],
                table_rows,
            )
        )
    ablation = ablation_summary(rows, config)
    if ablation:
        out.append(ablation)
    learned = learned_summary(rows, config)
    if learned:
        out.append(learned)
    efficiency = study.rows_for(rows, "params", config)
    if efficiency:
        out.append(parameter_efficiency.markdown(parameter_efficiency.summary(efficiency)))
    return "\n\n".join(out)


def learned_summary(rows: list[dict[str, Any]], config: study.StudyConfig) -> str:
    """Coders that learn, one row per setting and one column per depth: mean test accuracy over the
    seeds (worst seed; diverged runs), then the coder's reconstruction error on rectified-normal
    inputs and its gain (largest singular value of the path) after training, means over seeds."""
    runs = study.rows_for(rows, "learned", config)
    if not runs:
        return ""
    depths = sorted({r["depth"] for r in runs})
    reference = [r | {"setting": f"{r['variant']} net"} for r in rows
                 if r["study"] == "depth" and r["variant"] in ("residual", "plain")
                 and r["depth"] in depths]  # fmt: skip
    table_rows = []
    for setting in ("residual net", "plain net", study.LEARNED_DEFAULT, *study.LEARNED):
        cells = []
        for depth in depths:
            group = [r for r in (*runs, *reference) if r["setting"] == setting and r["depth"] == depth]
            if not group:
                cells.append("-")
                continue
            accuracy = [r["test_accuracy"] for r in group]
            cell = f"{_mean(accuracy):.3f} (min {min(accuracy):.3f}; "
            cell += f"{sum(r['diverged'] for r in group)}/{len(group)} diverged)"
            finite = [r for r in group if not r["diverged"]]  # a diverged coder's numbers are noise
            errors = [r["coder_error_after"] for r in finite if r.get("coder_error_after") is not None]
            gains = [r["coder_gain_after"] for r in finite if r.get("coder_gain_after") is not None]
            if errors:
                gain = _mean(gains)
                shown = f"{gain:.3f}" if gain < 100 else f"{gain:.3g}"
                cell += f"; error {_mean(errors):.3f}, gain {shown}"
            cells.append(cell)
        if any(cell != "-" for cell in cells):  # a preset may run only some settings
            table_rows.append([setting, *cells])
    return (
        "### Coders that learn: mean test accuracy over seeds (worst seed; diverged runs); the "
        "coder's reconstruction error on relu(N(0, I)) and its gain after training (means over the "
        "runs that did not diverge)\n\n"
        + markdown_table(["setting", *(f"depth {d}" for d in depths)], table_rows)
    )


def ablation_summary(rows: list[dict[str, Any]], config: study.StudyConfig) -> str:
    """The ablation as one row per setting and one column per depth: mean test accuracy over the
    seeds (a diverged run counts as its chance-level accuracy), the worst seed, diverged runs."""
    runs = study.rows_for(rows, "ablation", config)
    if not runs:
        return ""
    depths = sorted({r["depth"] for r in runs})
    order = ["residual net", "plain net", *study.ABLATION]
    table_rows = []
    for setting in order:
        cells = []
        for depth in depths:
            group = [r for r in runs if r["setting"] == setting and r["depth"] == depth]
            if not group:
                cells.append("-")
                continue
            accuracy = [r["test_accuracy"] for r in group]
            diverged = sum(r["diverged"] for r in group)
            cells.append(
                f"{_mean(accuracy):.3f} (min {min(accuracy):.3f}; {diverged}/{len(group)} diverged)"
            )
        table_rows.append([setting, *cells])
    return (
        "### Coder ablation, summary: mean test accuracy over seeds (worst seed; diverged runs)\n\n"
        + markdown_table(["setting", *(f"depth {d}" for d in depths)], table_rows)
    )


def figures(points: list[LayerCurvePoint], rows: list[dict[str, Any]], out: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        print("figures skipped: matplotlib is not installed (pip install 'pnnh-kernels[bench]')")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for field, label in (
        ("survival", "fraction of pre-activations > 0"),
        ("cosine_similarity", "mean cosine similarity between inputs"),
        ("ridge_r2", "ridge R^2 of reconstructing the input"),
    ):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, inputs in zip(axes, ("digits", "gaussian")):
            for variant in VARIANTS:
                series = [p for p in points if p.variant == variant and p.inputs == inputs]
                line = ax.plot(
                    [p.layer for p in series], [getattr(p, field) for p in series], label=variant
                )
                if field == "survival" and variant != "plain":
                    ax.plot(
                        [p.layer for p in series],
                        [p.bound for p in series],
                        linestyle="--",
                        color=line[0].get_color(),
                        label=f"{variant}: Cantelli bound",
                    )
            ax.set_title(f"{inputs} inputs, He init, no norm")
            ax.set_xlabel("layer")
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"curve_{field}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    depth_rows = [r for r in rows if r["study"] == "depth"]
    if depth_rows:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for variant in VARIANTS:
            depths = sorted({r["depth"] for r in depth_rows})
            accuracy = [
                _mean(
                    [
                        r["test_accuracy"]
                        for r in depth_rows
                        if r["variant"] == variant and r["depth"] == d
                    ]
                )
                for d in depths
            ]
            loss = [
                _mean(
                    [
                        r["train_loss"]
                        for r in depth_rows
                        if r["variant"] == variant and r["depth"] == d and not r["diverged"]
                    ]
                )
                for d in depths
            ]
            axes[0].plot(depths, accuracy, marker="o", label=variant)
            axes[1].plot(depths, loss, marker="o", label=variant)
        for ax, label in zip(axes, ("test accuracy", "final training loss")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("depth")
            ax.set_ylabel(label)
            ax.legend()
        fig.suptitle("deep_cnn on scikit-learn digits, same recipe for every variant")
        fig.tight_layout()
        path = out / "depth_study.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _save(row: dict[str, Any], saved: Path) -> None:
    # Written per run (temp file + rename) so an interrupted study resumes where it stopped.
    partial = saved.with_suffix(".tmp")
    partial.write_text(json.dumps(row, indent=1))
    partial.replace(saved)


_worker_data = None


def _worker_start(threads: int, config: study.StudyConfig) -> None:
    global _worker_data
    torch.set_num_threads(threads)
    _worker_data = study_data(config)


def _worker_run(single: study.Run, config: study.StudyConfig) -> dict[str, Any]:
    return study.execute_run(single, config, _worker_data)


def _trained_rows(
    pending: list[study.Run], config: study.StudyConfig, args: argparse.Namespace
) -> Iterator[tuple[study.Run, dict[str, Any]]]:
    """Train the pending runs, yielding each (run, row) as it finishes; ``--jobs`` processes."""
    if args.jobs <= 1 or len(pending) <= 1:
        data = study_data(config)
        for single in pending:
            yield single, study.execute_run(single, config, data)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn: a forked child would inherit the parent's torch thread pool state.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        args.jobs,
        mp_context=context,
        initializer=_worker_start,
        initargs=(args.threads or 1, config),
    ) as pool:
        futures = {pool.submit(_worker_run, single, config): single for single in pending}
        for future in as_completed(futures):
            yield futures[future], future.result()


def check(args: argparse.Namespace) -> None:
    """The arguments and scikit-learn (the digits), before anything is written."""
    if args.jobs < 1:
        raise ValueError(f"--jobs: expected a positive number of processes, got {args.jobs}")
    if args.threads is not None and args.threads < 0:
        raise ValueError(f"--threads: expected a non-negative int, got {args.threads}")
    if args.out.exists() and not args.out.is_dir():
        raise NotADirectoryError(f"--out: {args.out} exists and is not a folder")
    require_scikit_learn("pnnh analyze")


def run(args: argparse.Namespace) -> None:
    check(args)  # again, for a caller that did not go through pnnh_kernels.commands.main
    if args.threads:
        torch.set_num_threads(args.threads)
    config = PRESETS[args.preset]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    curve_depth = args.curve_depth or max(config.depths or (config.init_depth or 8,))
    points = curves(curve_depth, config.width)
    rows: list[dict[str, Any]] = []
    reused = 0
    if not args.skip_training:
        runs = list(study.planned_lr_runs(config) if args.preset == "lr" else study.planned_runs(config))
        bar = _progress(len(runs), "training runs")

        saved_runs = out / "runs"
        saved_runs.mkdir(exist_ok=True)
        pending = []
        for single in runs:
            saved = saved_runs / f"{study.run_id(single, config)}.json"
            saved_row = None if args.no_resume else study.saved_run(saved)
            if saved_row is not None:
                rows.append(saved_row)
                reused += 1
                if bar is not None:
                    bar.update(1)
            else:
                pending.append(single)
        # Longest first, so that parallel jobs finish together.
        pending.sort(key=lambda single: -single.cost(config))
        for single, row in _trained_rows(pending, config, args):
            _save(row, saved_runs / f"{study.run_id(single, config)}.json")
            rows.append(row)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    written = figures(points, rows, out)
    # NaN never passes: a bound that could not be computed counts as not respected.
    bound_holds = all(p.survival >= p.bound for p in points)
    summary = {
        "preset": args.preset,
        "config": config.__dict__,
        "curve_depth": curve_depth,
        "curves": [p.as_dict() for p in points],
        "runs": rows,
        "runs_reused": reused,
        "bounds_respected": bound_holds,
        "seconds": time.perf_counter() - start,
    }
    efficiency = study.rows_for(rows, "params", config)
    if efficiency:  # read by pnnh report --study
        summary["parameter_efficiency"] = parameter_efficiency.summary(efficiency)
    (out / "analysis.json").write_text(json.dumps(summary, indent=1, default=str))
    markdown = [
        f"# Dissipating inputs: analysis ({args.preset} preset)",
        "",
        f"Command: `pnnh analyze --preset {args.preset}`; {summary['seconds']:.0f} s on "
        f"{torch.get_num_threads()} CPU threads for this invocation"
        + (
            f"; the {len(rows)} training runs took {sum(r['seconds'] for r in rows):.0f} s in all, "
            f"{reused} of them reused from an earlier invocation (OUT/runs/)"
            if reused
            else ""
        )
        + ".",
        "",
        f"## Per-layer curves at He initialisation (depth {curve_depth}, width {config.width}, no norm)",
        "",
        f"Every measured survival fraction respects its Cantelli bound: **{bound_holds}**.",
        "",
        markdown_table(
            ["variant", "inputs", "layer", "survival", "bound", "cosine similarity", "ridge R^2"],
            [
                [p.variant, p.inputs, str(p.layer), f"{p.survival:.3f}", f"{p.bound:.3f}",
                 f"{p.cosine_similarity:.3f}", f"{p.ridge_r2:.3f}"]
                for p in points
                if p.layer in (1, 2, 4, 8, 16, 32, 64, 128, curve_depth)
            ],
        ),
        "",
        f"## The shared coder's gain at initialisation (width {config.width}, C_B = C/2)",
        "",
        "The largest singular value of the coder path (`pnnh_kernels.analysis.coder_gain`); the "
        "path reaches each layer's output without a norm, so its gain compounds over the layers "
        "that share it.",
        "",
        markdown_table(
            ["init", "seed", "gain", "gain^64", "gain^128"], coder_gains_at_init(config.width)
        ),
    ]  # fmt: skip
    if rows:
        markdown += [
            "",
            f"## Training studies ({config.epochs} epochs, seeds {list(config.seeds)}, "
            f"width {config.width})",
            "",
            study_tables(rows, config),
        ]
    markdown += ["", *[f"![{p.stem}]({p.name})" for p in written]]
    (out / "analysis.md").write_text("\n".join(markdown) + "\n")
    print("\n".join(markdown))
    print(f"\nwritten to {out}/ (analysis.md, analysis.json, {len(written)} figures)")
