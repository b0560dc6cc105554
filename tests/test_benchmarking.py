"""The benchmark suite's own logic: cost counting, roofline, telemetry without NVML, the report."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from pnnh_kernels.benchmarking import counting, telemetry
from pnnh_kernels.benchmarking.peaks import measure_peaks
from pnnh_kernels.benchmarking.report import (
    load,
    markdown,
    parameter_verdict,
    throughput_verdict,
    write_report,
)


def test_conv_layer_cost_counts_macs_and_bytes():
    shape = counting.LayerShape(batch=2, channels=8, size=4)
    plain = counting.conv_layer_cost(shape, element_bytes=2, mode="forward")
    pixels = 2 * 4 * 4
    assert plain.flops == 2 * pixels * 8 * 8 * 9
    parameters = 8 * 8 * 9 + 2 * 8
    assert plain.bytes == 2 * pixels * 8 * 2 + parameters * 2
    coder = counting.conv_layer_cost(shape, element_bytes=2, mode="forward", code_channels=4)
    assert coder.flops - plain.flops == 2 * pixels * 2 * 8 * 4
    training = counting.conv_layer_cost(shape, element_bytes=2, mode="forward+backward")
    assert training.flops == 3 * plain.flops
    with pytest.raises(ValueError, match="mode"):
        counting.conv_layer_cost(shape, 2, "backward")


def test_roofline_picks_the_binding_limit():
    cost = counting.Cost(flops=1e12, bytes=1e9)
    assert counting.roofline_seconds(cost, peak_flops=1e12, peak_bytes_per_second=1e12) == 1.0
    assert counting.roofline_seconds(cost, peak_flops=1e15, peak_bytes_per_second=1e9) == 1.0
    info = counting.achieved(cost, seconds=2.0, peak_flops=1e12, peak_bytes_per_second=1e12)
    assert info["tflops_per_s"] == 0.5
    assert info["roofline_fraction"] == 0.5
    assert info["roofline_error"] is None


def test_a_result_above_its_roofline_is_an_error_not_a_fraction():
    cost = counting.Cost(flops=1e12, bytes=1e9)
    info = counting.achieved(cost, seconds=0.4, peak_flops=1e12, peak_bytes_per_second=1e12)
    assert info["roofline_fraction"] is None
    assert "2.50x the roofline" in info["roofline_error"]


def test_telemetry_without_nvml_says_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes "import pynvml" fail
    assert telemetry.snapshot()["nvml"].startswith("absent")


def test_clock_drop_is_reported():
    before = {"sm_clock_mhz": 1980, "temperature_c": 60, "power_w": 500}
    assert telemetry.clock_drop(before, before) is None
    after = {"sm_clock_mhz": 1500, "temperature_c": 85, "power_w": 700}
    assert "throttling" in telemetry.clock_drop(before, after)
    info = {}
    with pytest.warns(UserWarning, match="throttling"):
        telemetry.record(info, before, after)
    assert "throttling" in info
    assert telemetry.clock_drop({"nvml": "absent"}, after) is None


def test_cpu_peaks_are_positive():
    peaks = measure_peaks(torch.device("cpu"), repeats=1)
    assert set(peaks.compute_flops) == {"float32", "bfloat16"}
    assert min(peaks.compute_flops.values()) > 1e8
    assert peaks.flops_for(torch.bfloat16) == peaks.compute_flops["bfloat16"]
    assert peaks.copy_bytes_per_second > 1e8


def _benchmark(name, group, median, spread=0.01, **info):
    """A pytest-benchmark row whose quartiles lie ``spread`` (relative) either side of the median."""
    stats = {"median": median, "q1": median * (1 - spread), "q3": median * (1 + spread)}
    return {"name": name, "group": group, "stats": stats, "extra_info": info}


def _recorded_run(pnnh_images_per_s: float, pnnh_parameters: int, spread: float = 0.01) -> dict:
    peaks = {"compute_flops": {"float32": 5e11, "bfloat16": 1e12}, "copy_bytes_per_second": 1e12}
    layer = {"kind": "layer", "shape": "8x64x32x32", "dtype": "bf16", "mode": "forward", "peaks": peaks}
    model = {"kind": "model", "model": "resnet18", "stem": "cifar", "batch": 8, "mode": "eager"}
    return {
        "datetime": "2026-11-26T00:00:00",
        "machine_info": {"cpu": {"brand_raw": "Test CPU"}},
        "benchmarks": [
            _benchmark("a", "g", 0.002, implementation="resnet-layer", tflops_per_s=1.0, **layer),
            _benchmark("b", "g", 0.003, implementation="pnnh-torch", tflops_per_s=0.7, **layer),
            _benchmark(
                "c",
                "m",
                0.1,
                spread=spread,
                variant="residual",
                images_per_s=80.0,
                parameters=1000,
                coder_parameters=0,
                **model,
            ),
            _benchmark(
                "d",
                "m",
                0.1,
                spread=spread,
                variant="pnnh",
                images_per_s=pnnh_images_per_s,
                parameters=pnnh_parameters,
                coder_parameters=10,
                **model,
            ),
        ],
    }


def test_report_says_when_the_claims_do_not_hold(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_recorded_run(pnnh_images_per_s=60.0, pnnh_parameters=1010)))
    data, results = load(path)
    text = markdown(data, results, [])
    assert "Test CPU" in text
    assert "not supported here" in text
    assert "PNNH is not smaller" in text
    assert "| layer | 8x64x32x32 | bf16 | forward | pnnh-torch | 3.000 | 1.0% | 1.50x |" in text
    assert "Not recorded: this file predates the list of skipped implementations." in text


def test_a_pnnh_net_faster_than_its_plain_net_is_flagged(tmp_path):
    run = _recorded_run(pnnh_images_per_s=110.0, pnnh_parameters=400)
    model = {"kind": "model", "model": "resnet18", "stem": "cifar", "batch": 8, "mode": "eager"}
    plain = _benchmark("e", "m", 0.1, variant="plain", images_per_s=90.0, parameters=900,
                       coder_parameters=0, **model)  # fmt: skip
    run["benchmarks"].append(plain)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(run))
    from pnnh_kernels.benchmarking.report import _model_rows

    verdict = throughput_verdict(_model_rows(load(path)[1]))
    assert "Measurement problem: resnet18 cifar batch 8 eager: PNNH ran 1.22x the plain" in verdict
    assert verdict.startswith("inconclusive here: the ordering contradicts the work done")
    plain["extra_info"]["images_per_s"] = 115.0  # plain faster, as the work says: no flag
    path.write_text(json.dumps(run))
    assert "Measurement problem" not in throughput_verdict(_model_rows(load(path)[1]))


def test_report_lists_what_was_not_measured(tmp_path):
    run = _recorded_run(pnnh_images_per_s=60.0, pnnh_parameters=1010)
    run["missing_implementations"] = {"pnnh-layer-cuda": "the CUDA extension is not built"}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(run))
    text = markdown(*load(path), [])
    assert "| pnnh-layer-cuda | the CUDA extension is not built |" in text
    run["missing_implementations"] = {}
    path.write_text(json.dumps(run))
    assert "Every implementation of the suite ran on this machine." in markdown(*load(path), [])


def test_report_says_when_the_claims_hold(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_recorded_run(pnnh_images_per_s=110.0, pnnh_parameters=400)))
    _, results = load(path)
    from pnnh_kernels.benchmarking.report import _model_rows

    rows = _model_rows(results)
    assert throughput_verdict(rows).startswith("supported here")
    assert "resnet18 cifar batch 8 eager: 1.38x ± 0.03" in throughput_verdict(rows)
    # The same medians with 10% spread either side: the claim is within the noise.
    path.write_text(json.dumps(_recorded_run(110.0, 400, spread=0.1)))
    noisy = _model_rows(load(path)[1])
    assert throughput_verdict(noisy).startswith("inconclusive here: within the noise of 1.3x")
    # No quartiles recorded: no verdict can rest on the rows.
    run = _recorded_run(110.0, 400)
    for row in run["benchmarks"]:
        row["stats"] = {"median": row["stats"]["median"]}
    path.write_text(json.dumps(run))
    unknown = throughput_verdict(_model_rows(load(path)[1]))
    assert unknown.startswith("inconclusive here"), unknown
    assert "1.38x ± n/a" in unknown
    assert parameter_verdict(rows).startswith("PNNH is smaller")
    assert "the residual's stored parameters" in parameter_verdict(rows)  # recorded without trained
    for row in rows:  # a run that recorded the trained counts: the verdict uses them
        row["trained_parameters"] = 1000
        row["parameters_vs_residual"] = 1.0
    assert "1.000x the residual's trained parameters" in parameter_verdict(rows)


def test_write_report_makes_markdown_and_plots(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_recorded_run(pnnh_images_per_s=60.0, pnnh_parameters=1010)))
    report = write_report(path, tmp_path / "out")
    assert report.read_text().startswith("# PNNH benchmark report: CPU: Test CPU")
    for figure in ("layers_relative.png", "models_throughput.png"):
        assert (tmp_path / "out" / figure).read_bytes()[:4] == b"\x89PNG"


def test_report_flags_a_result_above_its_roofline(tmp_path):
    run = _recorded_run(pnnh_images_per_s=60.0, pnnh_parameters=1010)
    run["benchmarks"][1]["extra_info"].update(roofline_fraction=None, roofline_error="2.50x ...")
    run["benchmarks"][0]["extra_info"].update(roofline_fraction=3.1)  # recorded before the flag
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(run))
    text = markdown(*load(path), [])
    assert text.count("measurement error: above the roofline") == 2
    assert "3.100" not in text
    assert "0.5 TFLOP/s float32, 1 TFLOP/s bfloat16" in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{}", "holds no benchmark results"),
        ('{"benchmarks": []}', "holds no benchmark results"),
        ("{not json", "is not JSON"),
        ('{"benchmarks": [{"name": "a"}]}', "without a name or a median time"),
    ],
)
def test_report_refuses_a_file_without_results(tmp_path, content, message):
    path = tmp_path / "bench.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        write_report(path, tmp_path / "out")
    assert str(path) in str(error.value)
    assert not (tmp_path / "out" / "report.md").exists()


def test_report_lists_vit_blocks_against_the_residual_one(tmp_path):
    run = _recorded_run(pnnh_images_per_s=60.0, pnnh_parameters=1010)
    for variant, median in (("residual", 0.004), ("plain", 0.003), ("pnnh", 0.005)):
        run["benchmarks"].append(
            _benchmark(f"vit-{variant}", "v", median, kind="vit-block", variant=variant,
                       shape="8x64x192", dtype="fp32", ledger_launches=62, ledger_bytes=3.96e8)
        )  # fmt: skip
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(run))
    text = markdown(*load(path), [])
    assert "| 8x64x192 | fp32 | pnnh | 5.000 | 1.25x | 62 | 396.0 |" in text
    assert "| 8x64x192 | fp32 | plain | 3.000 | 0.75x |" in text


def test_host_cost_table_from_benchmark_json():
    from pnnh_kernels.benchmarking.host_cost import format_results

    info = {
        "device_name": "cpu", "torch": "2.13", "method": "CPU: thread time", "baseline": "resnet-layer",
        "pnnh_host_us_median": 300.0, "pnnh_host_us_p20": 290.0, "pnnh_host_us_p80": 310.0,
        "baseline_host_us_median": 330.0, "baseline_host_us_p20": 320.0,
        "baseline_host_us_p80": 340.0, "host_ratio": 300 / 330,
    }  # fmt: skip
    table = format_results({"benchmarks": [{"name": "test_layer_step[x]", "extra_info": info}]})
    assert (
        "| layer_step[x] | 300 (290-310), nan | 330 (320-340), nan | 0.91 | - | resnet-layer |" in table
    )
    with pytest.raises(ValueError, match="no host-cost rows"):
        format_results({"benchmarks": [{"name": "other", "extra_info": {}}]})


def _interleaved(pnnh: list[float], plain: list[float], residual: list[float]) -> dict:
    """A bench row of test_interleaved_training_steps with these per-round step times."""
    from dataclasses import asdict

    from pnnh_kernels.benchmarking.interleaved import throughput_ratio

    seconds = {"pnnh": pnnh, "plain": plain, "residual": residual}
    ratios = {
        f"{v}_vs_{r}": asdict(throughput_ratio(seconds[v], seconds[r]))
        for v, r in (("pnnh", "residual"), ("plain", "residual"), ("pnnh", "plain"))
    }
    info = {"kind": "interleaved", "model": "resnet18", "stem": "cifar", "batch": 8,
            "mode": "eager", "step_seconds": seconds, **ratios}  # fmt: skip
    return _benchmark("i", "interleaved", 1.0, **info)


def test_paired_throughput_ratios_and_their_intervals():
    from pnnh_kernels.benchmarking.interleaved import round_orders, t_975, throughput_ratio

    exact = throughput_ratio([1.0, 1.0, 1.0], [2.0, 2.0, 2.0])  # twice the images/s every round
    assert (exact.ratio, exact.low, exact.high, exact.rounds) == (2.0, 2.0, 2.0, 3)
    noisy = throughput_ratio([1.0, 1.0], [1.0, 4.0])  # log ratios 0 and log 4: mean log 2
    assert noisy.ratio == pytest.approx(2.0)
    half = 12.706 * math.log(4) / math.sqrt(2) / math.sqrt(2)
    assert noisy.low == pytest.approx(2.0 * math.exp(-half))
    assert noisy.high == pytest.approx(2.0 * math.exp(half))
    assert (t_975(1), t_975(30), t_975(31)) == (12.706, 2.042, 1.960)
    with pytest.raises(ValueError, match="at least 2 rounds"):
        throughput_ratio([1.0], [1.0])
    with pytest.raises(ValueError, match="one per round"):
        throughput_ratio([1.0, 1.0], [1.0, 1.0, 1.0])
    orders = round_orders(["a", "b", "c"], 30)
    assert all(sorted(order) == ["a", "b", "c"] for order in orders)
    assert len({order[0] for order in orders}) == 3  # no variant always first
    assert orders == round_orders(["a", "b", "c"], 30)  # seeded


def test_the_throughput_verdict_comes_from_interleaved_intervals(tmp_path):
    from pnnh_kernels.benchmarking.report import _interleaved_rows, _model_rows

    residual = [1.0, 1.02, 0.98, 1.01, 0.99]
    cases = {
        # PNNH 1.4x the residual's images/s every round, the plain net a little faster still
        "supported": ([t / 1.4 for t in residual], [t / 1.45 for t in residual]),
        # a ratio that swings around 1.3 from round to round
        "inconclusive here: an interval spans": (
            [1 / 1.0, 1 / 1.7, 1 / 1.1, 1 / 1.6, 1 / 1.2],
            [0.5] * 5,
        ),
        "not supported": ([t / 0.9 for t in residual], [t / 1.0 for t in residual]),
        # PNNH 1.4x, the plain net 1.2x: PNNH outran the plain net, which does less work
        "inconclusive here: the ordering": ([t / 1.4 for t in residual], [t / 1.2 for t in residual]),
    }
    for expected, (pnnh, plain) in cases.items():
        run = _recorded_run(pnnh_images_per_s=60.0, pnnh_parameters=1010)
        run["benchmarks"].append(_interleaved(pnnh, plain, residual))
        path = tmp_path / "bench.json"
        path.write_text(json.dumps(run))
        results = load(path)[1]
        verdict = throughput_verdict(_model_rows(results), _interleaved_rows(results))
        assert verdict.startswith(expected), (expected, verdict)
        assert "from interleaved rounds, 95% interval" in verdict
        assert ("Measurement problem" in verdict) == (expected == "inconclusive here: the ordering")
        assert verdict in markdown(*load(path), [])  # the report's claims table takes it
