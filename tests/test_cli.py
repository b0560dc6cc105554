"""The ``pnnh`` command and the demo's experiment."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pnnh_kernels.commands import main


def test_help_lists_demo(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_module_entry_point_runs_a_tiny_demo():
    result = subprocess.run(
        [sys.executable, "-m", "pnnh_kernels", "demo", "--depth", "2", "--width", "4", "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for variant in ("residual", "plain", "pnnh"):
        assert f"| {variant} |" in result.stdout
    assert "| resnet18 | residual | 11,689,512 | 0 |" in result.stdout


def test_a_usage_error_is_one_line_with_argparses_status_2():
    result = subprocess.run(
        [sys.executable, "-m", "pnnh_kernels", "train", "--epochs", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1:] == [
        "pnnh train: error: --epochs: expected a positive int, got 0"
    ]
    assert "Traceback" not in result.stderr


def test_demo_arguments_are_checked_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--depth", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "pnnh demo: error: --depth: expected a positive int, got 0\n"


def test_an_error_during_the_work_keeps_its_traceback(monkeypatch):
    from pnnh_kernels.commands import demo

    def crash(args):
        raise ValueError("a bug inside the work")

    monkeypatch.setattr(demo, "depth_table", crash)
    with pytest.raises(ValueError, match="a bug inside the work"):
        main(["demo", "--depth", "2", "--width", "4", "--epochs", "1", "--skip-resnets"])


def test_demo_without_scikit_learn_says_what_to_install_before_it_starts(monkeypatch, capsys):
    from pnnh_kernels.commands import demo

    for name in ("sklearn", "sklearn.datasets", "sklearn.model_selection"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails, as without the package

    def started(args):
        raise AssertionError("the demo started training without scikit-learn")

    monkeypatch.setattr(demo, "depth_table", started)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--depth", "2", "--width", "4", "--epochs", "1"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("pnnh demo: error: the demo trains on scikit-learn's digits")
    assert "pip install 'pnnh-kernels[experiments]'" in captured.err


def test_profile_runs_one_step_of_a_layer_and_a_model(capsys):
    main(["profile", "--layer", "2x8x5x5", "--dtype", "fp32", "--warmup", "1", "--mode", "forward"])
    main(["profile", "--model", "resnet18", "--batch", "2", "--dtype", "fp32", "--warmup", "1"])
    out = capsys.readouterr().out
    assert out.count("profiled step:") == 2
    assert "backend in use: torch" in out


def test_nvtx_ranges_are_harmless_without_a_gpu():
    import torch

    from pnnh_kernels import FusedPNNHConv, profiling

    layer = FusedPNNHConv(4, 4, coder_init="he", coder_trainable=True)
    x = torch.randn(1, 4, 5, 5)
    expected = layer(x)
    profiling.enable_nvtx()
    try:
        torch.testing.assert_close(layer(x), expected)
    finally:
        profiling.enable_nvtx(False)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "missing.json"], "pnnh report: error: bench_json: no file at missing.json"),
        (["analyze", "--jobs", "0"], "pnnh analyze: error: --jobs: expected a positive number"),
    ],
)
def test_report_and_analyze_usage_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(message), error
    assert error.count("\n") == 1
    assert not any(tmp_path.iterdir())  # nothing written
