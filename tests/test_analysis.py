"""The dissipating-inputs analysis: the Cantelli bound, the probes, the curves and the studies."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

from pnnh_kernels.analysis import (
    cantelli_survival_bound,
    dissipation_report,
    he_stack,
    layer_curves,
    mean_cosine_similarity,
    ridge_r2,
    study,
)
from pnnh_kernels.analysis.study import TINY, planned_runs
from pnnh_kernels.coder import PNNHCoder
from pnnh_kernels.commands import analyze as analysis_run
from pnnh_kernels.models import deep_cnn
from pnnh_kernels.training.digits import load_digits_split


def test_cantelli_bound_formula_and_zero_for_non_positive_mean():
    mean = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    variance = torch.tensor([1.0, 1.0, 1.0, 4.0])
    torch.testing.assert_close(
        cantelli_survival_bound(mean, variance), torch.tensor([0.0, 0.0, 0.5, 0.5])
    )


@pytest.mark.parametrize("path", ["residual", "pnnh"])
def test_bound_holds_on_monte_carlo_samples(path):
    """P(w . x + mu > 0) over w ~ N(0, 2 / fan_in) is at least the bound, for every unit."""
    fan_in, units, draws = 36, 64, 20000
    x = torch.randn(units, fan_in).relu()  # one post-ReLU input patch per unit
    if path == "residual":
        mean = x[:, 0]  # the shortcut carries a (non-negative) input value
    else:
        coder = PNNHCoder(fan_in, fan_in // 2, init="rectified_normal")
        with torch.no_grad():
            mean = coder(x)[:, 0]
    variance = 2.0 * x.square().sum(1) / fan_in
    weights = torch.randn(draws, fan_in) * (2.0 / fan_in) ** 0.5
    pre = weights @ x.t() + mean  # [draws, units]
    survival = (pre > 0).double().mean(0)
    bound = cantelli_survival_bound(mean, variance).double()
    standard_error = (survival * (1 - survival) / draws).sqrt()
    assert bool((survival >= bound - 4 * standard_error - 1e-9).all())
    assert float(bound.max()) > 0.1  # the bound is not trivially zero everywhere


def test_probes_return_documented_values():
    x = torch.randn(200, 3, 4, 4)  # more training samples than dimensions: the identity is learnable
    assert mean_cosine_similarity(x.new_ones(5, 7)) == pytest.approx(1.0)
    assert ridge_r2(x, x) > 0.99
    assert ridge_r2(torch.randn(200, 10), x) < 0.1
    with pytest.raises(ValueError, match="features"):
        mean_cosine_similarity(torch.randn(1, 4))


def test_dissipation_report_hooks_every_relu_call():
    model = deep_cnn(5, 4, "residual", coder_init="he", coder_trainable=True)
    report = dissipation_report(model, torch.randn(8, 1, 8, 8))
    assert len(report) == 6  # stem + 5 shortcut ReLUs
    assert all(0.0 <= r.survival <= 1.0 for r in report)
    assert [r.index for r in report] == list(range(6))

    class Reused(nn.Module):  # torchvision's blocks call one nn.ReLU twice
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(6, 6)
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.linear(self.relu(x)))

    report = dissipation_report(Reused(), torch.randn(12, 6), probe_inputs=True)
    assert [r.site for r in report] == ["relu", "relu"]
    assert report[0].ridge_r2 is not None


def test_dissipation_report_gives_each_pnnh_layers_coder_gain():
    default = dissipation_report(deep_cnn(4, 8, "pnnh"), torch.randn(6, 1, 8, 8))
    assert default[0].coder_gain is None  # the stem has no coder
    assert [r.coder_gain for r in default[1:]] == pytest.approx([1.0] * 4, abs=1e-6)
    torch.manual_seed(0)
    pretrained = deep_cnn(3, 8, "pnnh", coder_init="he")
    encoder = pretrained.layers[0].coder.encoder_weight.detach().double()
    # Independently: the tied path W_E^T W_E is symmetric PSD, its largest eigenvalue is its gain.
    expected = float(torch.linalg.eigvalsh(encoder.t() @ encoder).max())
    report = dissipation_report(pretrained, torch.randn(6, 1, 8, 8))
    assert expected > 1.5  # He-normal coders amplify: the net heads for divergence
    assert [r.coder_gain for r in report[1:]] == pytest.approx([expected] * 3, rel=1e-9)
    residual = dissipation_report(deep_cnn(2, 8, "residual"), torch.randn(6, 1, 8, 8))
    assert all(r.coder_gain is None for r in residual)


def test_measured_survival_respects_the_bound_layer_by_layer():
    data = load_digits_split()
    for variant in ("residual", "pnnh"):
        torch.manual_seed(0)
        points = layer_curves(he_stack(8, 32, variant), data.train_images[:128], "digits", probe=False)
        for point in points:
            # The bound is on the expectation over weight draws; one draw of 32 channels is measured.
            assert point.survival >= point.bound - 0.02, point
            assert point.bound > 0


def test_plan_shares_runs_between_studies():
    runs = list(planned_runs(TINY))
    keys = [
        (r.depth, r.seed, r.width, tuple(sorted(r.model_kwargs.items())),
         json.dumps(r.coder_training, sort_keys=True))  # learned settings differ in training only
        for r in runs
    ]  # fmt: skip
    assert len(keys) == len(set(keys))
    assert {r.study for r in runs} == {
        "depth", "ablation", "width_check", "sharing", "init", "coder_width", "tying", "learned",
        "params",
    }  # fmt: skip
    # The ablation's default setting is the depth study's PNNH run, planned once.
    rows = [
        {"study": r.study, "model": r.model_kwargs, "depth": r.depth, "width": r.width or TINY.width}
        | r.label
        for r in runs
    ]
    ablation = study.rows_for(rows, "ablation", TINY)
    settings = {r["setting"] for r in ablation}
    assert settings == {*study.ABLATION, "residual net", "plain net"}
    assert all(r["depth"] in TINY.ablation_depths for r in ablation)
    widths = {r["width"] for r in study.rows_for(rows, "width_check", TINY)}
    assert widths == {TINY.check_width}
    # The parameter study at depth 2: width 4 from the depth study's runs, width 8 its own, every
    # variant once
    params = study.rows_for(rows, "params", TINY)
    assert sorted((r["variant"], r["width"], r["study"]) for r in params) == sorted(
        (v, w, "depth" if w == 4 else "params") for v in ("plain", "residual", "pnnh") for w in (4, 8)
    )


def test_tiny_analysis_end_to_end(tmp_path):
    args = argparse.Namespace(
        preset="tiny", curve_depth=4, out=tmp_path, skip_training=False, threads=None,
        no_resume=False, jobs=1,
    )  # fmt: skip
    analysis_run.run(args)
    summary = json.loads((tmp_path / "analysis.json").read_text())
    assert summary["runs"]
    assert summary["bounds_respected"] in (True, False)
    markdown = (tmp_path / "analysis.md").read_text()
    assert "Depth scaling" in markdown
    assert "Coder ablation, summary" in markdown
    assert "The shared coder's gain at initialisation" in markdown
    assert "Parameter efficiency" in markdown
    efficiency = summary["parameter_efficiency"]
    # every variant at both widths (width 4 from the depth study's runs), with parameter counts
    assert {(p["variant"], p["width"]) for p in efficiency["points"]} == {
        (v, w) for v in ("plain", "residual", "pnnh") for w in (4, 8)
    }
    assert all(p["trained_parameters"] <= p["stored_parameters"] for p in efficiency["points"])
    assert efficiency["verdict"] in ("supported", "not supported", "mixed")
    for figure in ("curve_survival", "curve_cosine_similarity", "curve_ridge_r2", "depth_study"):
        assert (tmp_path / f"{figure}.png").stat().st_size > 1000


def test_interrupted_analysis_resumes_from_saved_runs(tmp_path):
    args = argparse.Namespace(
        preset="tiny", curve_depth=2, out=tmp_path, skip_training=False, threads=1,
        no_resume=False, jobs=1,
    )  # fmt: skip
    analysis_run.run(args)
    first = json.loads((tmp_path / "analysis.json").read_text())["runs"]
    saved = sorted((tmp_path / "runs").glob("*.json"))
    assert len(saved) == len(list(planned_runs(TINY)))
    # Mark one saved row: a resumed study must report it instead of retraining that run.
    marked = json.loads(saved[0].read_text())
    marked["test_accuracy"] = -1.0
    saved[0].write_text(json.dumps(marked))
    saved[1].unlink()
    analysis_run.run(args)
    rows = json.loads((tmp_path / "analysis.json").read_text())["runs"]
    assert sum(r["test_accuracy"] == -1.0 for r in rows) == 1
    assert saved[1].exists()
    args.no_resume = True
    args.jobs = 2  # retrain all, two processes: the same numbers as one process
    analysis_run.run(args)
    rows = json.loads((tmp_path / "analysis.json").read_text())["runs"]
    assert all(r["test_accuracy"] >= 0 for r in rows)

    def key(row: dict) -> str:
        return json.dumps([row["study"], row["model"], row["depth"], row["width"], row["seed"]])

    def outcome(row: dict) -> tuple:
        return row["train_loss"], row["test_accuracy"], row["coder_error_after"]

    assert {key(r): outcome(r) for r in rows} == {key(r): outcome(r) for r in first}


def test_learning_rate_sweep_trains_each_run_at_its_rate(monkeypatch):
    runs = list(study.planned_lr_runs(TINY, lrs=(0.01, 0.2)))
    assert len(runs) == len(TINY.depths) * 2 * 3 * len(TINY.seeds)
    assert len({study.run_id(r, TINY) for r in runs}) == len(runs)
    seen = []

    def fake_train(model, data, **kwargs):
        seen.append(kwargs["max_lr"])
        return _FakeResult()

    monkeypatch.setattr(study, "train_classifier", fake_train)
    for run in runs[:2] + runs[-1:]:
        study.execute_run(run, TINY, None)
    assert seen == [0.01, 0.01, 0.2]
    rows = [
        {"study": "lr", "variant": "pnnh", "lr": 0.2, "depth": 4, "model": {"variant": "pnnh"}},
        {"study": "depth", "variant": "pnnh", "depth": 4, "model": {"variant": "pnnh"}},
    ]
    assert study.rows_for(rows, "lr", TINY) == rows[:1]
    assert study.rows_for(rows, "depth", TINY) == rows[1:]


class _FakeResult:
    train_loss, test_accuracy, diverged, seconds = 1.0, 0.5, False, 0.0


@pytest.mark.parametrize("preset", ["TINY", "QUICK", "FULL", "CODERS", "LEARNED_CODERS", "PARAMS"])
def test_every_study_table_lists_each_run_once(preset):
    config = getattr(study, preset)
    runs = list(planned_runs(config))
    rows = [
        {
            "study": r.study,
            "model": r.model_kwargs,
            "depth": r.depth,
            "width": r.width or config.width,
            "seed": r.seed,
        }
        | r.label
        for r in runs
    ]
    names = ("depth", "ablation", "width_check", "sharing", "init", "coder_width", "tying", "learned",
             "params")  # fmt: skip
    for name in names:
        listed = [
            (
                r["study"],
                json.dumps(r["model"], sort_keys=True),
                r["depth"],
                r["width"],
                r["seed"],
                r.get("setting"),  # learned settings differ in training, not the model
            )
            for r in study.rows_for(rows, name, config)
        ]
        assert len(listed) == len(set(listed)), name


def _tiny_digits(count: int = 64):
    data = load_digits_split()
    return type(data)(
        data.train_images[:count], data.train_labels[:count],
        data.test_images[:count], data.test_labels[:count],
    )  # fmt: skip


def _trained_coder(objective, epochs: int = 1) -> tuple[torch.Tensor, torch.Tensor, PNNHCoder]:
    from pnnh_kernels.training.digits import train_classifier

    torch.manual_seed(0)
    model = deep_cnn(4, 8, "pnnh", coder_trainable=True)
    coder = next(m for m in model.modules() if isinstance(m, PNNHCoder))
    before = coder.encoder_weight.detach().clone()
    train_classifier(model, _tiny_digits(), epochs=epochs, batch_size=16, coder_objective=objective)
    return before, coder.encoder_weight.detach().clone(), coder


def test_a_coder_kept_from_the_task_gradient_learns_only_by_reconstruction():
    from pnnh_kernels.training.digits import CoderObjective

    # No task gradient and no reconstruction: the coder does not move (nor decays: no weight decay).
    before, after, _ = _trained_coder(CoderObjective(weight=0.0, task_gradient=False))
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # The task gradient alone moves it; the reconstruction alone moves it too.
    before, after, _ = _trained_coder(CoderObjective(weight=0.0, task_gradient=True))
    assert (after - before).abs().max() > 1e-6
    before, after, _ = _trained_coder(CoderObjective(weight=1.0, task_gradient=False))
    assert (after - before).abs().max() > 1e-6


def test_the_orthonormal_setting_keeps_the_gain_at_most_one():
    from pnnh_kernels.analysis.probes import coder_gain

    torch.manual_seed(0)
    model = deep_cnn(4, 8, "pnnh", coder_trainable=True)
    coder = next(m for m in model.modules() if isinstance(m, PNNHCoder))
    study._keep_orthonormal_rows(coder)
    from pnnh_kernels.training.digits import CoderObjective, train_classifier

    train_classifier(model, _tiny_digits(), epochs=2, batch_size=16, max_lr=0.5,
                     coder_objective=CoderObjective(weight=0.0))  # fmt: skip
    weight = coder.encoder_weight.detach()
    torch.testing.assert_close(weight @ weight.T, torch.eye(4), rtol=0, atol=1e-5)
    assert coder_gain(coder) <= 1 + 1e-5
    assert not coder.encoder_bias.requires_grad
    assert float(coder.encoder_bias.abs().max()) == 0.0


def test_run_ids_of_saved_studies_do_not_change():
    """A study reuses the runs saved under OUT/runs/ by id: a field added to the recipe later must
    not change the ids of presets that do not use it (docs/results/analysis_full holds this run)."""
    first = next(iter(planned_runs(study.FULL)))
    assert study.run_id(first, study.FULL) == "depth-d8-s0-1bd2aee77886"
