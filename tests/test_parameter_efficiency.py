"""Parameter efficiency (issue #25): the parameters a variant needs for the residual net's accuracy,
the claim's verdict and the claims report's use of the study, on synthetic study rows."""

from __future__ import annotations

import json
import math

import pytest

from pnnh_kernels.analysis import parameter_efficiency as efficiency
from pnnh_kernels.benchmarking.report import load_study, parameter_verdict, study_verdict

PARAMETERS = {8: 1_000, 16: 4_000, 32: 16_000}  # trained parameters by width (one architecture)


def rows(accuracy: dict[str, dict[int, float]], depth: int = 16) -> list[dict]:
    """Two seeds per variant and width, ``accuracy`` their mean (one 0.01 above, one below)."""
    out = []
    for variant, by_width in accuracy.items():
        for width, mean in by_width.items():
            for seed, offset in ((0, 0.01), (1, -0.01)):
                out.append({
                    "study": "params", "variant": variant, "width": width, "depth": depth,
                    "seed": seed, "test_accuracy": mean + offset, "diverged": False,
                    "trained_parameters": PARAMETERS[width],
                    "stored_parameters": PARAMETERS[width] + (36 if variant == "pnnh" else 0),
                })  # fmt: skip
    return out


def test_the_parameters_needed_are_interpolated_in_log_parameters():
    points = efficiency.points(rows({"pnnh": {8: 0.5, 16: 0.7, 32: 0.9}}))
    assert [(p.width, round(p.accuracy, 6), p.worst, p.runs) for p in points] == [
        (8, 0.5, 0.49, 2), (16, 0.7, 0.69, 2), (32, 0.9, 0.89, 2)
    ]  # fmt: skip
    needed, bound = efficiency.parameters_for(points, 0.6)  # halfway from 1,000 to 4,000 in log
    assert bound == "interpolated"
    assert needed == pytest.approx(math.sqrt(1_000 * 4_000))
    assert efficiency.parameters_for(points, 0.4) == (1_000.0, "at most")
    assert efficiency.parameters_for(points, 0.95) == (None, "not reached")


def test_the_verdict_needs_every_point_at_half_the_parameters_or_less():
    # PNNH at width 8 matches the residual at width 16, and at 16 the residual at 32: 0.25x
    supported = rows({"residual": {8: 0.3, 16: 0.5, 32: 0.7}, "pnnh": {8: 0.5, 16: 0.7, 32: 0.9}})
    result = efficiency.summary(supported)
    assert result["verdict"] == "supported"
    ratios = [(m["width"], m["bound"], round(m["ratio"], 9)) for m in result["pnnh_vs_residual"]]
    assert ratios == [(8, "at most", 1.0), (16, "at most", 0.25), (32, "interpolated", 0.25)]
    # the other way round: PNNH needs 4x the residual's parameters, or never gets there
    against = rows({"residual": {8: 0.5, 16: 0.7, 32: 0.9}, "pnnh": {8: 0.3, 16: 0.5, 32: 0.7}})
    result = efficiency.summary(against)
    assert result["verdict"] == "not supported"
    assert [m["bound"] for m in result["pnnh_vs_residual"]] == ["interpolated", "interpolated",
                                                                 "not reached"]  # fmt: skip
    # equal curves: a ratio of 1 where interpolated; "at most 1" at the smallest cannot tell
    same = efficiency.summary(
        rows({"residual": {8: 0.5, 16: 0.7, 32: 0.9}, "pnnh": {8: 0.5, 16: 0.7, 32: 0.9}})
    )
    assert (same["verdict"], same["inconclusive_points"]) == ("not supported", 1)
    # a point for and a point against
    mixed = rows({"residual": {8: 0.5, 16: 0.6, 32: 0.65}, "pnnh": {8: 0.3, 16: 0.7, 32: 0.8}})
    assert efficiency.summary(mixed)["verdict"] == "mixed"
    # only the smallest PNNH net's "at most 1": nothing conclusive
    alone = rows({"residual": {8: 0.5}, "pnnh": {8: 0.9}})
    assert efficiency.summary(alone)["verdict"] == "inconclusive"
    assert efficiency.summary([])["verdict"].startswith("not measured")
    markdown = efficiency.markdown(efficiency.summary(against))
    assert "not reached (> 1.00)" in markdown
    assert "**not supported**" in markdown


def test_the_claims_report_takes_the_study_or_says_not_measured(tmp_path):
    assert "not measured in this report" in parameter_verdict([])
    analysis = tmp_path / "analysis.json"
    result = efficiency.summary(
        rows({"residual": {8: 0.5, 16: 0.7, 32: 0.9}, "pnnh": {8: 0.3, 16: 0.5, 32: 0.7}})
    )
    analysis.write_text(json.dumps({"preset": "params", "parameter_efficiency": result}))
    text = study_verdict(load_study(analysis))
    assert "claimed 2x is not supported" in text
    assert "depth 16 width 32: > 1.00" in text
    assert "depth 16 width 8: 4.00" in text
    with pytest.raises(FileNotFoundError, match="--study: no file"):
        load_study(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"--study: .* is not JSON"):
        load_study(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"preset": "quick", "runs": []}))
    with pytest.raises(ValueError, match="no parameter-efficiency study"):
        load_study(tmp_path / "other.json")
