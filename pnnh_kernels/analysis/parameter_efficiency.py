"""Parameter efficiency (issue #25): test accuracy against parameters for each variant on one
recipe (``pnnh analyze --preset params``), and how many parameters a variant needs to reach the
residual net's accuracy.

The paper claims PNNH nets "2x more parameter efficient" than ResNets: the residual net's accuracy
at half its parameters, a ratio of 0.5 or less. The three variants here share one architecture, so
at a given width they train the same parameters (PNNH stores its fixed coder besides, once per
stage); the ratio comes from the accuracy curves, not from the counts at one width. Trained and
stored parameters are reported separately.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Optional

from pnnh_kernels.markdown import markdown_table

CLAIMED_RATIO = 0.5  # "2x more parameter efficient": the residual net's accuracy at half its parameters
VARIANTS = ("plain", "residual", "pnnh")


@dataclass(frozen=True)
class Point:
    """One variant at one depth and width: its parameters and its test accuracy over the seeds."""

    depth: int
    variant: str
    width: int
    trained_parameters: int
    stored_parameters: int
    accuracy: float  # mean over the seeds (a diverged run counts with the accuracy it reached)
    worst: float
    runs: int
    diverged: int


@dataclass(frozen=True)
class Match:
    """The parameters ``variant`` needs (trained; ``bound``: "interpolated", "at most" where its
    smallest net already reaches the target, "not reached" where its largest does not) for the
    residual net's mean accuracy at ``depth`` and ``width``, and their ratio to the residual's."""

    depth: int
    variant: str
    width: int
    residual_parameters: int
    residual_accuracy: float
    needed: Optional[float]  # None where not reached
    bound: str
    ratio: Optional[float]  # needed / residual_parameters; with "not reached", more than this
    ratio_bound: float  # the ratio, or the bound it is known to exceed ("not reached")


def points(rows: list[dict[str, Any]]) -> list[Point]:
    """The study's rows (with their parameter counts) grouped by depth, variant and width."""
    groups: dict[tuple[int, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        if "trained_parameters" not in row:
            continue  # a run saved before parameters were recorded
        key = (row["depth"], row["variant"], row["width"])
        groups.setdefault(key, []).append(row)
    out = []
    for (depth, variant, width), group in sorted(groups.items()):
        accuracy = [r["test_accuracy"] for r in group]
        out.append(
            Point(
                depth, variant, width, group[0]["trained_parameters"], group[0]["stored_parameters"],
                statistics.fmean(accuracy), min(accuracy), len(group),
                sum(bool(r["diverged"]) for r in group),
            )
        )  # fmt: skip
    return out


def parameters_for(curve: list[Point], target: float) -> tuple[Optional[float], str]:
    """The trained parameters at which ``curve`` (one variant at one depth) first reaches
    ``target`` accuracy, linear in log(parameters) between its measured widths: (value, bound)."""
    ordered = sorted(curve, key=lambda p: p.trained_parameters)
    if not ordered:
        return None, "not reached"
    if ordered[0].accuracy >= target:
        return float(ordered[0].trained_parameters), "at most"
    for low, high in itertools.pairwise(ordered):
        if low.accuracy < target <= high.accuracy:
            fraction = (target - low.accuracy) / (high.accuracy - low.accuracy)
            logs = math.log(low.trained_parameters), math.log(high.trained_parameters)
            return math.exp(logs[0] + fraction * (logs[1] - logs[0])), "interpolated"
    return None, "not reached"


def matches(all_points: list[Point], variant: str = "pnnh") -> list[Match]:
    """For every residual point, what ``variant`` at the same depth needs for its accuracy."""
    out = []
    for reference in (p for p in all_points if p.variant == "residual"):
        curve = [p for p in all_points if p.variant == variant and p.depth == reference.depth]
        if not curve:
            continue
        needed, bound = parameters_for(curve, reference.accuracy)
        largest = max(p.trained_parameters for p in curve)
        ratio = None if needed is None else needed / reference.trained_parameters
        ratio_bound = ratio if ratio is not None else largest / reference.trained_parameters
        out.append(
            Match(
                reference.depth, variant, reference.width, reference.trained_parameters,
                reference.accuracy, needed, bound, ratio, ratio_bound,
            )
        )  # fmt: skip
    return out


def conclusive(match: Match) -> Optional[bool]:
    """Whether ``match`` supports the claim (True), contradicts it (False), or cannot tell (None:
    "at most" a ratio above the claim, where the true one may be lower; "not reached" from a
    largest net under the claim's ratio)."""
    if match.bound == "not reached":
        return False if match.ratio_bound > CLAIMED_RATIO else None
    assert match.ratio is not None
    if match.ratio <= CLAIMED_RATIO:
        return True
    return False if match.bound == "interpolated" else None


def verdict(found: list[Match]) -> str:
    """The claim against these matches: "supported" where every conclusive point supports it,
    "not supported" where every one contradicts it, "mixed" otherwise, "inconclusive" where none
    is conclusive."""
    if not found:
        return "not measured: no residual and PNNH curves at one depth"
    readings = [conclusive(m) for m in found]
    known = [r for r in readings if r is not None]
    if not known:
        return "inconclusive"
    if all(known):
        return "supported"
    if not any(known):
        return "not supported"
    return "mixed"


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The points, PNNH's and the plain net's matches against the residual net, and the verdict."""
    all_points = points(rows)
    pnnh = matches(all_points, "pnnh")
    return {
        "points": [asdict(p) for p in all_points],
        "pnnh_vs_residual": [asdict(m) for m in pnnh],
        "plain_vs_residual": [asdict(m) for m in matches(all_points, "plain")],
        "claimed_ratio": CLAIMED_RATIO,
        "verdict": verdict(pnnh),
        "inconclusive_points": sum(conclusive(m) is None for m in pnnh),
    }


def _ratio_cell(match: dict[str, Any]) -> str:
    if match["bound"] == "not reached":
        return f"not reached (> {match['ratio_bound']:.2f})"
    prefix = "at most " if match["bound"] == "at most" else ""
    return f"{prefix}{match['ratio']:.2f}"


def markdown(result: dict[str, Any]) -> str:
    """The study's two tables: accuracy by width and parameters, and the parameters each variant
    needs for the residual net's accuracy."""
    by_key = {(p["depth"], p["variant"], p["width"]): p for p in result["points"]}
    depths = sorted({p["depth"] for p in result["points"]})
    widths = sorted({p["width"] for p in result["points"]})
    rows = []
    for depth in depths:
        for width in widths:
            cells = [by_key.get((depth, v, width)) for v in VARIANTS]
            if not any(cells):
                continue
            first = next(c for c in cells if c)
            stored = "/".join(str(c["stored_parameters"]) if c else "-" for c in cells)
            accuracy = [
                f"{c['accuracy']:.3f} (min {c['worst']:.3f}; {c['diverged']}/{c['runs']} diverged)"
                if c else "-"
                for c in cells
            ]  # fmt: skip
            rows.append([str(depth), str(width), str(first["trained_parameters"]), stored, *accuracy])
    points_table = markdown_table(
        ["depth", "width", "trained parameters", "stored (plain/residual/PNNH)",
         "plain", "residual", "PNNH"], rows,
    )  # fmt: skip
    match_rows = []
    for key in ("pnnh_vs_residual", "plain_vs_residual"):
        for m in result[key]:
            needed = "-" if m["needed"] is None else f"{m['needed']:.0f}"
            match_rows.append(
                [m["variant"], str(m["depth"]), str(m["width"]), str(m["residual_parameters"]),
                 f"{m['residual_accuracy']:.3f}", needed, _ratio_cell(m)]
            )  # fmt: skip
    match_table = markdown_table(
        ["variant", "depth", "residual width", "residual's trained parameters",
         "residual's accuracy", "trained parameters the variant needs", "ratio"], match_rows,
    )  # fmt: skip
    return (
        "### Parameter efficiency: mean test accuracy over seeds by width (worst seed; diverged "
        "runs)\n\n"
        + points_table
        + "\n\n### The trained parameters each variant needs for the residual net's mean accuracy "
        'at the same depth (linear in log(parameters) between measured widths; "at most": its '
        'smallest net already reaches it; "not reached": its largest does not)\n\n'
        + match_table
        + f'\n\nThe paper\'s "2x more parameter efficient" (a ratio of {result["claimed_ratio"]} or '
        f"less), PNNH against the residual net here: **{result['verdict']}** "
        f"({result['inconclusive_points']} of {len(result['pnnh_vs_residual'])} points cannot tell: "
        '"at most" a ratio above the claim, or a largest net under it that does not reach it).'
    )
