"""``pnnh info``: the environment, every backend's availability with the reason, and "auto"'s
choice with its reason."""

from __future__ import annotations

import torch

from pnnh_kernels import backends
from pnnh_kernels.commands.info import report


def test_info_lists_every_backend_with_its_reason():
    text = report(torch.bfloat16)
    assert f"torch {torch.__version__}" in text
    lines = text.splitlines()
    cpu = lines.index("  on cpu:")
    statuses = {line.split()[0]: line for line in lines[cpu + 1 : cpu + 4]}
    assert set(statuses) == {"cuda", "triton", "torch"}
    assert statuses["torch"].split()[1] == "available"
    assert "unavailable: the CUDA kernels run on CUDA tensors" in statuses["cuda"]
    assert lines[cpu + 4].strip().startswith("auto: torch, on a CPU")


def test_info_says_how_to_install_a_missing_backend(monkeypatch):
    monkeypatch.setattr(backends, "_resolved", {})
    removed = backends.unregister_backend("triton")
    try:
        text = report(torch.float32)
    finally:
        if removed is not None:
            backends.register_backend(removed)
    assert "triton  unavailable: not registered in this installation (pip install triton" in text


def test_the_cli_prints_info_and_the_version(capsys):
    import pytest

    from pnnh_kernels.commands import main
    from pnnh_kernels.version import VERSION

    main(["info", "--dtype", "float32"])
    assert "backends, for torch.float32 conv2d:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith(f"pnnh-kernels {VERSION}")
