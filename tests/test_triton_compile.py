"""Ahead-of-time compiles of the Triton kernels for the A100 (sm_80) and H100/H200 (sm_90), no GPU.

``python -m pnnh_kernels.triton.report`` compiles the launches the launchers would make for a layer
shape and checks each against the cards' limits (shared memory per block, registers, spills). The
whole ResNet-18/34/50 grid (docs/perf/triton_resources.md) takes about half an hour on two cores;
CI checks the shapes at which each variant's tiles reach their caps: 512 -> 512 channels with code
256 (channel tiles 128, K chunks 64 in bf16 and 32 in fp32), the same with code 32 (the code
encoded in the main loop beside 128-wide tiles), a 1x1 256 -> 64 layer with code 128 (64-channel
code chunks) and a strided layer, in bf16 with every autotune candidate, and the first in fp32.
The launches left out here are the twins without an output ReLU (forward, apply pass, eval-mode
input gradient, coder backward): in the first full report they never needed more shared memory
than their ReLU twins, and more registers in 9 of 312 compiles; the full report checks them.

The compiles run in a subprocess without TRITON_INTERPRET: this test process has the interpreter on,
and interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from pnnh_kernels.triton import report
from pnnh_kernels.triton.pnnh_conv_config import ConvConfig, tuning_configs

SHAPES = {
    "bf16": [
        "256x512x4x4",
        "256x512x4x4,code=32",
        "64x256x56x56,out=64,k=1,code=128",
        "256x256x8x8,out=512,stride=2",
    ],
    "fp32": ["256x512x4x4"],
}
CHECKED = (
    r"fwd_kernel\[(relu|bn apply, relu|bn stats)\]|dgrad_kernel\[(eval, relu|train-BN)\]"
    r"|coder_bwd_kernel\[coder(, train-BN)?\]|wgrad_kernel"
)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_every_variant_fits_every_card_at_the_largest_tiles(dtype, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    shapes = [argument for shape in SHAPES[dtype] for argument in ("--shape", shape)]
    command = [
        sys.executable, "-m", "pnnh_kernels.triton.report", *shapes, "--dtype", dtype,
        "--only", CHECKED, "--jobs", str(min(2, os.cpu_count() or 1)), "--check", "--json", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())
    variants = {row["kernel"] for row in rows}
    assert variants == {
        "_pnnh_conv_fwd_kernel[relu]",
        "_pnnh_conv_fwd_kernel[bn apply, relu]",
        "_pnnh_conv_fwd_kernel[bn stats]",
        "_pnnh_conv_dgrad_kernel[eval, relu]",
        "_pnnh_conv_dgrad_kernel[train-BN]",
        "_pnnh_coder_bwd_kernel[coder]",
        "_pnnh_coder_bwd_kernel[coder, train-BN]",
        "_conv_wgrad_kernel[learner, relu]",
        "_conv_wgrad_kernel[learner]",
        "_conv_wgrad_kernel[learner, train-BN]",
        "_conv_wgrad_kernel[encoder]",
        "_conv_wgrad_kernel[decoder, relu]",
        "_conv_wgrad_kernel[decoder]",
    }
    assert {row["target"] for row in rows} == {"sm_80", "sm_90"}
    for row in rows:
        assert not row["problems"], row
        assert row["registers"] > 0, row
        if dtype == "bf16":  # tensor cores: wgmma on sm_90 where the tile allows, else mma.sync
            mma = row["instructions"]["mma.sync"] + row["instructions"]["wgmma"]
            assert mma > 0, row


def test_the_written_out_grid_matches_the_model():
    from pnnh_kernels.models import resnet18

    torch.manual_seed(0)
    model = resnet18(variant="pnnh", stem="cifar", num_classes=10).eval()
    built = report.model_shapes(model, batch=256, size=32)
    assert set(built) == set(report.resnet_shapes((2, 2, 2, 2), False, 256, 32, imagenet=False))


def test_the_check_fails_on_a_config_over_a_card_limit():
    row = report.Row("k", "bf16", "sm_80", "", 8, 3, 128, 200_000, 0, 0, {})
    assert report.problems(row, report.CARDS["A100"]) == ["A100: shared memory 200000 > 166912"]
    assert report.problems(row, report.CARDS["H100"]) == []
    spilled = report.Row("k", "bf16", "sm_90", "", 8, 3, 255, 1024, 16, 16, {})
    assert report.problems(spilled, report.CARDS["H100"]) == ["spills (stack 16, local 16)"]
    unread = report.Row("k", "bf16", "sm_90", "", 8, 3, -1, 1024, -1, -1, {})
    assert report.problems(unread, report.CARDS["H100"])[0].startswith("resources unreadable")
    with pytest.raises(ValueError, match="no launch matches"):
        report.report_rows([report.LayerShape(2, 16, 16, 4, 4)], ["bf16"], ["H100"], only="nothing")


def test_shapes_parse_and_the_resnet_grid_has_every_stage():
    assert report.parse_shape("256x128x16x16") == report.LayerShape(256, 128, 128, 16, 16)
    stem = report.parse_shape("64x3x224x224,out=64,k=7,stride=2,code=0")
    assert stem == report.LayerShape(64, 3, 64, 224, 224, 7, 2, 0)
    assert stem.code_channels == 0
    with pytest.raises(ValueError, match="--shape: expected NxCxHxW"):
        report.parse_shape("256,128,128,16,16")  # the old syntax, refused with the new one
    with pytest.raises(ValueError, match="key among"):
        report.parse_shape("256x128x16x16,kernel=3")
    grid = {str(shape) for shape in report.resnet_grid()}
    assert len(grid) == 46
    assert "256x512->512(b256)@4x4/k3s1" in grid  # ResNet-18/34 CIFAR, last stage
    assert "64x3->64(b0)@224x224/k7s2" in grid  # ImageNet stem, no coder
    assert "64x2048->512(b1024)@7x7/k1s1" in grid  # ResNet-50 ImageNet, last stage


def test_autotune_candidates_start_at_the_default_and_never_exceed_it():
    from pnnh_kernels.triton import kernels
    from pnnh_kernels.triton.pnnh_conv_config import TUNING_KEYS

    for name, keys in TUNING_KEYS.items():
        assert set(keys) <= set(getattr(kernels, name).arg_names), name
    narrow = ConvConfig(block_m=128, block_n=32, block_k=16, block_b=16, num_warps=8, num_stages=3)
    configs = tuning_configs(narrow, torch.bfloat16)
    assert configs[0].kwargs == {"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 16}
    assert (configs[0].num_warps, configs[0].num_stages) == (8, 3)
    assert all(c.kwargs["BLOCK_N"] <= 32 and c.kwargs["BLOCK_K"] <= 16 for c in configs)
    assert len({(*c.kwargs.items(), c.num_warps, c.num_stages) for c in configs}) == len(configs)
    assert all(min(c.kwargs.values()) >= 16 for c in configs)  # tl.dot's minimum
    assert len(configs) > 1
    assert [c.kwargs for c in tuning_configs(narrow, torch.float32)] == [configs[0].kwargs]
