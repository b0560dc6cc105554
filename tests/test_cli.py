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


def test_profile_runs_one_step_of_a_layer_and_a_model(capsys):
    main(["profile", "--layer", "8,5,2", "--dtype", "fp32", "--warmup", "1", "--mode", "forward"])
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
