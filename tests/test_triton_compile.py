"""Ahead-of-time compiles of every Triton kernel for sm_80 and sm_90, without a GPU.

The compiles run in a subprocess without TRITON_INTERPRET: this test process has the interpreter on,
and interpreted kernels cannot be compiled.

Each kernel is compiled at its default GPU configuration, specialised the way a JIT launch on a
ResNet stage shape would be (see pnnh_kernels.triton.report). Checks: it compiles, it does not spill,
and in bf16 the tensor cores are used (mma.sync on sm_80, wgmma on sm_90).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from pnnh_kernels.triton import report


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_every_kernel_compiles_without_spills(dtype, target, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    command = [sys.executable, "-m", "pnnh_kernels.triton.report", "--dtype", dtype, "--target", target]
    result = subprocess.run(
        [*command, "--json", str(out)], env=env, capture_output=True, text=True, check=False, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {row["kernel"] for row in rows} == {
        "_pnnh_conv_fwd_kernel",
        "_pnnh_conv_fwd_kernel[bn stats]",
        "_pnnh_conv_fwd_kernel[bn apply]",
        "_pnnh_conv_fwd_kernel[linear]",
        "_pnnh_coder_bwd_kernel",
        "_conv_wgrad_kernel",
        "_pnnh_conv_dgrad_kernel",
    }
    for row in rows:
        assert row["registers"] > 0, row
        assert row["stack"] == 0, f"{row['kernel']} spills: {row}"
        assert row["local"] == 0, f"{row['kernel']} spills: {row}"
        assert row["shared_bytes"] <= report.SHARED_MEMORY_LIMIT[target], row
        if dtype == "bf16":
            tensor_core = "wgmma" if target == "sm_90" else "mma.sync"
            assert row["instructions"][tensor_core] > 0, row
    print("\n" + report.format_table(rows))


def test_autotune_keys_and_configs():
    from pnnh_kernels.triton import kernels
    from pnnh_kernels.triton.pnnh_conv import _TUNING_KEYS, tuning_configs

    for name, keys in _TUNING_KEYS.items():
        assert set(keys) <= set(getattr(kernels, name).arg_names), name
    configs = tuning_configs()
    assert configs[0].kwargs == {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}  # the report's default
    assert all(min(c.kwargs.values()) >= 16 for c in configs)  # tl.dot's minimum
