"""The claims report: a Markdown report and PNG plots from a ``pytest bench/ --benchmark-json`` file.

It sets what this machine measured beside the paper's claims — "up to 0.3x higher training
throughput" and "2x better parameter efficiency" than ResNets — and says plainly when the
measurement does not support them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

THROUGHPUT_CLAIM = 0.3  # "up to 0.3x higher training throughput" than the ResNet
PARAMETER_EFFICIENCY_CLAIM = 2.0  # "2x better parameter efficiency"


@dataclass(frozen=True)
class Result:
    name: str
    group: str
    median_s: float
    info: dict[str, Any]
    # The interquartile range of the rounds (s); the median where the file has no quartiles.
    q1_s: float = float("nan")
    q3_s: float = float("nan")

    @property
    def spread(self) -> float:
        """Half the interquartile range relative to the median: the noise a ratio must exceed; NaN
        where the file has no quartiles (a verdict then cannot rest on the row)."""
        if not (self.q3_s >= self.q1_s) or self.median_s <= 0:  # NaN: no quartiles recorded
            return float("nan")
        return (self.q3_s - self.q1_s) / (2 * self.median_s)


def _read_json(path: Path, argument: str, expected: str) -> Any:
    """The JSON in ``path``; a FileNotFoundError or ValueError naming ``argument``, the path and
    what was ``expected`` where there is none."""
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: no file at {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{argument}: {path} is not JSON ({error}); {expected}") from error


def load(path: Path) -> tuple[dict[str, Any], list[Result]]:
    """The results of ``pytest bench/ --benchmark-json=PATH``; a ValueError naming ``path`` for a
    file that is not one (unreadable JSON, no benchmarks: an empty report would pass for a result)."""
    path = Path(path)
    expected = "expected the output of pytest bench/ --benchmark-json=FILE"
    data = _read_json(path, "bench_json", expected)
    benchmarks = data.get("benchmarks") if isinstance(data, dict) else None
    if not isinstance(benchmarks, list) or not benchmarks:
        raise ValueError(f"bench_json: {path} holds no benchmark results; {expected}")
    try:
        results = [
            Result(
                b["name"],
                b.get("group") or "",
                float(b["stats"]["median"]),
                b.get("extra_info", {}),
                float(b["stats"].get("q1", "nan")),
                float(b["stats"].get("q3", "nan")),
            )
            for b in benchmarks
        ]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"bench_json: {path} has a benchmark without a name or a median time ({error!r}); {expected}"
        ) from error
    return data, results


def machine_name(data: dict[str, Any], results: list[Result]) -> str:
    for result in results:
        name = result.info.get("device_name")
        if name and name != "cpu":
            return name
    cpu = data.get("machine_info", {}).get("cpu", {})
    brand = cpu.get("brand_raw") or cpu.get("brand") or "unknown CPU"
    return f"CPU: {brand}"


def _layer_rows(results: list[Result]) -> list[dict[str, Any]]:
    """One row per layer/block result with its time relative to the ResNet baseline of its group."""
    baselines = {}
    ledger_baselines = {}
    for r in results:
        if r.info.get("implementation") in ("resnet-layer", "resnet-block"):
            baselines[(r.info["kind"], r.group)] = r.median_s
            ledger_baselines[(r.info["kind"], r.group)] = r.info.get("ledger_bytes")
    rows = []
    for r in results:
        if r.info.get("kind") not in ("layer", "block"):
            continue
        baseline = baselines.get((r.info["kind"], r.group))
        ledger_bytes = r.info.get("ledger_bytes")
        ledger_baseline = ledger_baselines.get((r.info["kind"], r.group))
        rows.append(
            {
                "kind": r.info["kind"],
                "shape": r.info["shape"],
                "dtype": r.info["dtype"],
                "mode": r.info["mode"] + (", train-BN" if r.info.get("norm") == "train" else ""),
                "ledger_launches": r.info.get("ledger_launches"),
                "ledger_mb": ledger_bytes / 1e6 if ledger_bytes else None,
                "ledger_relative": ledger_bytes / ledger_baseline
                if ledger_bytes and ledger_baseline
                else None,
                "implementation": r.info["implementation"],
                "median_ms": r.median_s * 1e3,
                "spread": r.spread,
                "relative": r.median_s / baseline if baseline else None,
                "tflops": r.info.get("tflops_per_s"),
                "gbps": r.info.get("gb_per_s"),
                "roofline": r.info.get("roofline_fraction"),
                "roofline_error": r.info.get("roofline_error"),
            }
        )
    return rows


def _model_rows(results: list[Result]) -> list[dict[str, Any]]:
    rows = [
        r.info | {"median_s": r.median_s, "spread": r.spread}
        for r in results
        if r.info.get("kind") == "model"
    ]
    residual = {
        (row["model"], row["stem"], row["mode"]): row for row in rows if row["variant"] == "residual"
    }
    for row in rows:
        base = residual.get((row["model"], row["stem"], row["mode"]))
        row["throughput_vs_residual"] = row["images_per_s"] / base["images_per_s"] if base else None
        # The ratio's noise: the two rows' relative half-IQRs added (a first-order bound).
        row["ratio_spread"] = row["spread"] + base["spread"] if base else None
        row["parameters_vs_residual"] = _trained(row) / _trained(base) if base else None
    return rows


def _trained(row: dict[str, Any]) -> int:
    """The parameters the optimizer trains (a fixed coder is stored, not trained); the stored count
    for a run recorded before trained counts were (then the verdict says stored)."""
    return row.get("trained_parameters", row["parameters"])


def _shape_order(shape: str) -> tuple[int, ...]:
    """ "256x64x32x32" sorts by channels, then size, then batch."""
    batch, channels, size, _ = (int(part) for part in shape.split("x"))
    return channels, size, batch


def _noise(value: float) -> float:
    """An error bar: 0 where no spread was recorded (NaN)."""
    return 0.0 if value != value else value


def _fmt(value: Optional[float], pattern: str = "{:.2f}") -> str:
    return "n/a" if value is None or value != value else pattern.format(value)  # None or NaN


def _interleaved_rows(results: list[Result]) -> list[dict[str, Any]]:
    """bench/test_models.py's interleaved rounds: the three variants' steps with paired ratios."""
    return [r.info for r in results if r.info.get("kind") == "interleaved"]


def interleaved_verdict(rows: list[dict[str, Any]]) -> str:
    """The throughput claim from interleaved rounds: per setting the 95% interval of PNNH's
    images/s over the residual net's; supported where an interval lies wholly at or above the
    claim, not supported where every one lies below it, otherwise inconclusive. A setting where
    PNNH outran the plain net of its architecture beyond the interval (it does strictly more work)
    is a measurement problem, and the verdict is inconclusive."""
    target = 1.0 + THROUGHPUT_CLAIM

    def interval(ratio: dict[str, Any]) -> str:
        return f"{ratio['ratio']:.2f}x [{ratio['low']:.2f}, {ratio['high']:.2f}]"

    listed = "; ".join(
        f"{r['model']} {r['stem']} batch {r['batch']} {r['mode']}: {interval(r['pnnh_vs_residual'])} "
        f"({r['pnnh_vs_residual']['rounds']} rounds)"
        for r in rows
    )
    flags = [
        f"{r['model']} {r['stem']} batch {r['batch']} {r['mode']}: PNNH ran "
        f"{interval(r['pnnh_vs_plain'])} the plain net's images/s, though it does strictly more work"
        for r in rows
        if r["pnnh_vs_plain"]["low"] > 1.0
    ]
    intervals = [r["pnnh_vs_residual"] for r in rows]
    if flags:
        verdict = "inconclusive here: the ordering contradicts the work done (below)"
    elif any(i["low"] >= target for i in intervals):
        verdict = f"supported here: at least one setting's 95% interval lies at or above {target:.1f}x"
    elif all(i["high"] < target for i in intervals):
        verdict = f"not supported here: every setting's 95% interval lies below {target:.1f}x"
    else:
        verdict = f"inconclusive here: an interval spans {target:.1f}x"
    flagged = f" Measurement problem: {'; '.join(flags)}." if flags else ""
    return (
        f"{verdict} (PNNH/residual images/s from interleaved rounds, 95% interval: {listed}).{flagged}"
    )


def throughput_verdict(
    model_rows: list[dict[str, Any]], interleaved: Optional[list[dict[str, Any]]] = None
) -> str:
    """The throughput claim: from interleaved rounds where the file has them
    (interleaved_verdict), else from the separately timed rows (below)."""
    if interleaved:
        return interleaved_verdict(interleaved)
    return _unpaired_verdict(model_rows)


def _unpaired_verdict(model_rows: list[dict[str, Any]]) -> str:
    """The claim against every PNNH/residual pair, each ratio with its noise (the two rows' relative
    half-IQRs): supported only where a pair's gain exceeds the claim by more than its noise, refuted
    only where every pair falls short of it by more than its noise, otherwise inconclusive. Every
    pair is listed: the best of many noisy pairs alone would overstate the result."""
    pnnh = [r for r in model_rows if r["variant"] == "pnnh" and r["throughput_vs_residual"]]
    if not pnnh:
        return "not measured: no PNNH and residual training steps side by side in this file."
    target = 1.0 + THROUGHPUT_CLAIM

    def pair(r: dict[str, Any]) -> str:
        return (
            f"{r['model']} {r['stem']} batch {r['batch']} {r['mode']}: "
            f"{r['throughput_vs_residual']:.2f}x "
            f"± {_fmt(r['ratio_spread'] * r['throughput_vs_residual'])}"
        )

    listed = "; ".join(pair(r) for r in sorted(pnnh, key=lambda r: -r["throughput_vs_residual"]))
    # A row without quartiles has a NaN spread: it can neither support nor refute the claim.
    lows = [r["throughput_vs_residual"] * (1 - r["ratio_spread"]) for r in pnnh]
    highs = [r["throughput_vs_residual"] * (1 + r["ratio_spread"]) for r in pnnh]
    flags = _work_order_flags(model_rows)
    if any(low >= target for low in lows) and not flags:
        verdict = f"supported here: at least one setting is {target:.1f}x or more beyond its noise"
    elif all(high < target for high in highs):
        faster = max(lows) > 1.0
        verdict = f"not supported here: every setting falls short of {target:.1f}x beyond its noise" + (
            " (PNNH faster in some)" if faster else ""
        )
    else:
        verdict = f"inconclusive here: within the noise of {target:.1f}x, or noise not recorded"
        if flags:
            verdict = "inconclusive here: the ordering contradicts the work done (below)"
    flagged = f" Measurement problem: {'; '.join(flags)}." if flags else ""
    return f"{verdict} (PNNH/residual images/s, ± half the IQRs: {listed}).{flagged}"


def _work_order_flags(model_rows: list[dict[str, Any]]) -> list[str]:
    """Settings where the PNNH net, which does strictly more work than the plain net of the same
    architecture (the plain net's layers plus the coders), ran faster than it beyond the noise: an
    ordering that contradicts the work done is a problem of the measurement, not support."""
    plain = {
        (r["model"], r["stem"], r["batch"], r["mode"]): r for r in model_rows if r["variant"] == "plain"
    }
    flags = []
    for r in model_rows:
        other = plain.get((r["model"], r["stem"], r["batch"], r["mode"]))
        if r["variant"] != "pnnh" or other is None:
            continue
        ratio = r["images_per_s"] / other["images_per_s"]
        if ratio * (1 - r["spread"] - other["spread"]) > 1.0:  # False where a spread is NaN
            flags.append(
                f"{r['model']} {r['stem']} batch {r['batch']} {r['mode']}: PNNH ran {ratio:.2f}x the "
                "plain net's images/s, though it does strictly more work"
            )
    return flags


def load_study(path: Path) -> dict[str, Any]:
    """The parameter-efficiency summary of ``pnnh analyze --preset params`` (its analysis.json); a
    named error for a file that is not one."""
    path = Path(path)
    expected = "expected the analysis.json of pnnh analyze --preset params"
    data = _read_json(path, "--study", expected)
    efficiency = data.get("parameter_efficiency") if isinstance(data, dict) else None
    if not isinstance(efficiency, dict) or not isinstance(efficiency.get("pnnh_vs_residual"), list):
        raise ValueError(f"--study: {path} holds no parameter-efficiency study; {expected}")
    return {**efficiency, "path": str(path), "preset": data.get("preset")}


def study_verdict(efficiency: Optional[dict[str, Any]]) -> str:
    """The claim measured as meant: accuracy against parameters (parameter_efficiency), or "not
    measured" without a study."""
    if efficiency is None:
        return (
            "Accuracy against parameters: not measured in this report (pnnh analyze --preset params, "
            "then pnnh report --study its analysis.json)."
        )
    found = efficiency["pnnh_vs_residual"]
    ratios = [
        f"depth {m['depth']} width {m['width']}: "
        + (f"> {m['ratio_bound']:.2f}" if m["ratio"] is None
           else ("<= " if m["bound"] == "at most" else "") + f"{m['ratio']:.2f}")
        for m in found
    ]  # fmt: skip
    return (
        f"Accuracy against parameters ({efficiency['path']}): the trained parameters PNNH needs for "
        f"the residual net's accuracy, over the residual's ({'; '.join(ratios) or 'none'}); the "
        f"claimed {1 / efficiency['claimed_ratio']:.0f}x is {efficiency['verdict']} on that study."
    )


def parameter_verdict(
    model_rows: list[dict[str, Any]], efficiency: Optional[dict[str, Any]] = None
) -> str:
    study = study_verdict(efficiency)
    pairs = {}
    for r in model_rows:
        if r["variant"] == "pnnh" and r["parameters_vs_residual"]:
            pairs[r["model"] + " " + r["stem"]] = r["parameters_vs_residual"]
    if not pairs:
        return f"Parameter counts: no PNNH and residual models side by side in this file. {study}"
    kind = "trained" if all("trained_parameters" in r for r in model_rows) else "stored"
    listed = ", ".join(
        f"{k}: {v:.3f}x the residual's {kind} parameters" for k, v in sorted(pairs.items())
    )
    smaller = all(v < 1.0 for v in pairs.values())
    verdict = "PNNH is smaller" if smaller else "PNNH is not smaller than the residual ResNet"
    return (
        f"{verdict} here ({listed}); by parameter count alone, the claimed "
        f"{PARAMETER_EFFICIENCY_CLAIM:.0f}x is not shown. {study}"
    )


def _vit_lines(results: list[Result]) -> list[str]:
    """One ViT block's training step per variant (bench/test_vit.py), against the residual one."""
    rows = [r for r in results if r.info.get("kind") == "vit-block"]
    if not rows:
        return []
    residual = {(r.info["shape"], r.info["dtype"]): r.median_s for r in rows
                if r.info["variant"] == "residual"}  # fmt: skip
    lines = [
        "",
        "## ViT blocks (one block's training step; eager PyTorch, no kernel of ours applies)",
        "",
        "The ledger counts attention as scaled_dot_product_attention's math decomposition; a GPU "
        "runs one fused kernel there, so on a GPU its attention launches and bytes are an upper bound.",
        "",
        "| shape | dtype | variant | median (ms) | vs residual | ledger launches | ledger MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r.info["shape"], r.info["dtype"], r.info["variant"])):
        baseline = residual.get((r.info["shape"], r.info["dtype"]))
        relative = r.median_s / baseline if baseline else None
        lines.append(
            f"| {r.info['shape']} | {r.info['dtype']} | {r.info['variant']} | {r.median_s * 1e3:.3f} | "
            f"{_fmt(relative, '{:.2f}x')} | {r.info.get('ledger_launches')} | "
            f"{r.info.get('ledger_bytes', 0) / 1e6:.1f} |"
        )
    return lines


def _missing_lines(data: dict[str, Any]) -> list[str]:
    """The implementations the run could not measure here, with the reason (bench/conftest.py)."""
    missing = data.get("missing_implementations")
    if missing is None:
        return ["", "## Not measured", "", "Not recorded: this file predates the list of skipped "
                "implementations."]  # fmt: skip
    if not missing:
        return ["", "## Not measured", "", "Every implementation of the suite ran on this machine."]
    lines = ["", "## Not measured on this machine", "", "| implementation | why |", "|---|---|"]
    lines += [f"| {name} | {reason} |" for name, reason in sorted(missing.items())]
    return lines


def _roofline_cell(row: dict[str, Any]) -> str:
    if row.get("roofline_error"):
        return "measurement error: above the roofline"
    roofline = row.get("roofline")
    if roofline is not None and roofline > 1.0:  # a run recorded before achieved() flagged these
        return "measurement error: above the roofline"
    return _fmt(roofline, "{:.3f}")


def markdown(
    data: dict[str, Any],
    results: list[Result],
    figures: list[str],
    efficiency: Optional[dict[str, Any]] = None,
) -> str:
    machine = machine_name(data, results)
    peaks = next((r.info["peaks"] for r in results if "peaks" in r.info), None)
    lines = [
        f"# PNNH benchmark report: {machine}",
        "",
        f"Run {data.get('datetime', 'unknown date')}, torch "
        f"{next((r.info.get('torch') for r in results if r.info.get('torch')), 'unknown')}.",
    ]
    if peaks:
        matmul = peaks.get("compute_flops", peaks.get("matmul_flops"))  # older runs: matmul only
        if not isinstance(matmul, dict):  # a run recorded before the peaks were per dtype
            matmul = {peaks.get("matmul_dtype", "unknown dtype"): matmul}
        per_dtype = ", ".join(f"{flops / 1e12:.3g} TFLOP/s {name}" for name, flops in matmul.items())
        notes = f" ({peaks['notes']})" if peaks.get("notes") else ""
        lines.append(
            f"Peaks measured in this run: {per_dtype}{notes}, "
            f"{peaks['copy_bytes_per_second'] / 1e9:.1f} GB/s (device copy). Each row's roofline "
            "fraction is against the peak of its own dtype; a result above its roofline is flagged "
            "as a measurement error, not printed as a fraction."
        )
    model_rows = _model_rows(results)
    lines += [
        "",
        "## The paper's claims against this machine",
        "",
        "| claim | measured here |",
        "|---|---|",
        "| up to 0.3x higher training throughput than ResNets | "
        f"{throughput_verdict(model_rows, _interleaved_rows(results))} |",
        f"| 2x better parameter efficiency than ResNets | {parameter_verdict(model_rows, efficiency)} |",
        "",
        "## Layers and blocks (time relative to the cuDNN ResNet layer / BasicBlock of the same group)",
        "",
        "The ledger columns: the same step counted by `pnnh ledger` (launches and HBM bytes of the "
        "model, not measured).",
        "",
        "| kind | shape | dtype | mode | implementation | median (ms) | ± (half IQR) | vs ResNet "
        "| TFLOP/s | GB/s | roofline fraction | ledger launches | ledger MB | ledger bytes vs ResNet |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(
        _layer_rows(results),
        key=lambda r: (r["kind"], _shape_order(r["shape"]), r["dtype"], r["mode"], r["implementation"]),
    ):
        lines.append(
            f"| {row['kind']} | {row['shape']} | {row['dtype']} | {row['mode']} | "
            f"{row['implementation']} | {row['median_ms']:.3f} | {_fmt(row['spread'], '{:.1%}')} | "
            f"{_fmt(row['relative'], '{:.2f}x')} | "
            f"{_fmt(row['tflops'], '{:.3g}')} | {_fmt(row['gbps'], '{:.3g}')} | "
            f"{_roofline_cell(row)} | {_fmt(row['ledger_launches'], '{}')} | "
            f"{_fmt(row['ledger_mb'], '{:.1f}')} | {_fmt(row['ledger_relative'], '{:.2f}x')} |"
        )
    lines += [
        "",
        "## Training steps (bf16 autocast, channels_last)",
        "",
        "| model | stem | batch | mode | variant | images/s | ± (half IQR) | vs residual "
        "| trained parameters | stored parameters | of which coders | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(model_rows, key=lambda r: (r["model"], r["stem"], r["mode"], r["variant"])):
        memory = row.get("peak_memory_bytes")
        lines.append(
            f"| {row['model']} | {row['stem']} | {row['batch']} | {row['mode']} | {row['variant']} | "
            f"{row['images_per_s']:.1f} | {_fmt(row['spread'], '{:.1%}')} | "
            f"{_fmt(row['throughput_vs_residual'], '{:.2f}x')} | "
            f"{_trained(row):,} | {row['parameters']:,} | {row['coder_parameters']:,} | "
            f"{'not measured' if memory is None else f'{memory / 2**20:.0f}'} |"
        )
    lines += _vit_lines(results)
    lines += _missing_lines(data)
    throttled = [r.name for r in results if r.info.get("throttling")]
    if throttled:
        lines += ["", f"Clocks dropped (throttling) during: {', '.join(throttled)}."]
    lines += ["", *[f"![{Path(f).stem}]({Path(f).name})" for f in figures]]
    return "\n".join(lines) + "\n"


def plot(results: list[Result], out_dir: Path) -> list[str]:
    """PNG figures: layer time relative to the ResNet layer per shape; model images/s."""
    try:
        import matplotlib
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'pnnh-kernels[bench]')")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    layer_rows = [
        r
        for r in _layer_rows(results)
        if r["kind"] == "layer" and r["relative"] and r["implementation"] != "resnet-layer"
    ]
    if layer_rows:
        panels = sorted({(r["dtype"], r["mode"]) for r in layer_rows})
        columns = min(2, len(panels))
        grid_rows = -(-len(panels) // columns)
        fig, axes = plt.subplots(
            grid_rows, columns, figsize=(6.5 * columns, 4 * grid_rows), squeeze=False
        )
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        for ax, (dtype, mode) in zip(axes.flat, panels):
            rows = [r for r in layer_rows if (r["dtype"], r["mode"]) == (dtype, mode)]
            shapes = sorted({r["shape"] for r in rows}, key=_shape_order)
            implementations = sorted({r["implementation"] for r in rows})
            width = 0.8 / len(implementations)
            by_key = {(r["shape"], r["implementation"]): r for r in rows}
            for index, implementation in enumerate(implementations):
                cells = [by_key.get((shape, implementation)) for shape in shapes]
                values = [c["relative"] if c else float("nan") for c in cells]
                # the row's own noise; the baseline's is in the table
                errors = [_noise(c["relative"] * c["spread"]) if c else 0.0 for c in cells]
                positions = [i + index * width for i in range(len(shapes))]
                ax.bar(positions, values, width, yerr=errors, capsize=2, label=implementation)
            ax.axhline(1.0, color="black", linewidth=0.8, label="ResNet layer = 1")
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, rotation=30)
            ax.set_ylabel("time / ResNet layer's (lower is better)")
            ax.set_title(f"{dtype}, {mode}")
            ax.legend(fontsize=7)
        fig.suptitle("Layer step time relative to the ResNet layer (PyTorch; cuDNN on GPUs)")
        fig.tight_layout()
        path = out_dir / "layers_relative.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        figures.append(str(path))
    model_rows = _model_rows(results)
    if model_rows:
        labels = [f"{r['model']} {r['stem']} {r['mode']}\n{r['variant']}" for r in model_rows]
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(labels)), 4.5))
        ax.bar(
            range(len(labels)),
            [r["images_per_s"] for r in model_rows],
            yerr=[_noise(r["images_per_s"] * r["spread"]) for r in model_rows],
            capsize=3,
        )
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
        ax.set_ylabel("images/s (higher is better)")
        batches = ", ".join(str(b) for b in sorted({r["batch"] for r in model_rows}))
        ax.set_title(f"Training step throughput, bf16 autocast, batch {batches} (± half IQR)")
        fig.tight_layout()
        path = out_dir / "models_throughput.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        figures.append(str(path))
    return figures


def write_report(bench_json: Path, out_dir: Path, study_json: Optional[Path] = None) -> Path:
    """The report of ``bench_json`` into ``out_dir``, the parameter-efficiency study of
    ``study_json`` (pnnh analyze --preset params) in its claims table where given."""
    data, results = load(bench_json)
    efficiency = None if study_json is None else load_study(study_json)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = plot(results, out_dir)
    path = out_dir / "report.md"
    path.write_text(markdown(data, results, figures, efficiency))
    return path
