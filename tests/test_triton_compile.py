"""Ahead-of-time compiles of every Triton kernel for sm_80 and sm_90, without a GPU.

Each kernel is compiled at its default GPU configuration, specialised the way a JIT launch on a
ResNet stage shape would be (see pnnh_kernels.triton.report). Checks: it compiles, it does not spill,
and in bf16 the tensor cores are used (mma.sync on sm_80, wgmma on sm_90).
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from pnnh_kernels.triton import report


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_every_kernel_compiles_without_spills(dtype, target):
    rows = report.report_rows([dtype], [target])
    assert {row["kernel"] for row in rows} == {
        "_pnnh_conv_fwd_kernel",
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
