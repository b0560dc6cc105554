"""The ``pnnh`` command and the demo's experiment."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pnnh_kernels.cli import main


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
