"""The CUDA backend (``backend="cuda"``) against the float64 reference, forward and every gradient,
on the cases the Triton backend passes plus cases that cross the CUDA kernels' 64-wide tiles and
32-wide reduction slices. GPU only: without a GPU and the built extension every test here skips,
saying why (tests/test_cuda_build.py checks what a CPU machine can)."""

from __future__ import annotations

import pytest
import torch

from pnnh_kernels import FusedPNNHConv
from pnnh_kernels import cuda as cuda_backend
from pnnh_kernels.backends.fused_common import poisoned_outputs
from tests.conv_cases import (
    ASYMMETRIC_PADDING_CASES,
    CASES,
    CUDA_TILE_CASES,
    TRAINING_CASES,
    Case,
    check_asymmetric_padding,
    check_case,
    check_linear,
    check_training_case,
)

pytestmark = pytest.mark.skipif(
    not cuda_backend.is_available(), reason=f"CUDA backend unavailable: {cuda_backend.why_unavailable()}"
)


@pytest.mark.parametrize("case", CASES + CUDA_TILE_CASES, ids=str)
def test_forward_and_gradients_fp32(case):
    check_case(case, backend="cuda")


@pytest.mark.parametrize("case", ASYMMETRIC_PADDING_CASES, ids=str)
def test_asymmetric_same_padding_without_coder(case):
    check_asymmetric_padding(case, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[4], *CUDA_TILE_CASES], ids=str)
def test_tensor_core_dtypes(case, dtype):
    check_case(case, dtype=dtype, backend="cuda")


@pytest.mark.parametrize(
    "case", [*TRAINING_CASES, Case(2, 72, 72, 36, 3, 1, 1, 9, 9, norm=True)], ids=str
)
def test_training_batchnorm(case):
    check_training_case(case, backend="cuda")


@pytest.mark.parametrize("case", TRAINING_CASES[:2], ids=str)
def test_training_step_with_the_default_fixed_coder(case):
    # The default coder requires no gradient: the fused backward must still give the learner, norm
    # and input gradients of the reference, and none to the coder.
    check_training_case(case, backend="cuda", coder_trainable=False)


@pytest.mark.parametrize(
    ("leading", "c_in", "c_out", "c_b"), [((7,), 9, 9, 4), ((2, 5), 13, 6, 5), ((300,), 96, 160, 48)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear(leading, c_in, c_out, c_b, dtype):
    check_linear(leading, c_in, c_out, c_b, dtype, backend="cuda")


def test_auto_does_not_pick_the_unverified_cuda_backend():
    layer = FusedPNNHConv(8, 8).cuda()
    assert layer.backend_in_use != "cuda"
    assert FusedPNNHConv(8, 8, backend="cuda").cuda().backend_in_use == "cuda"


def test_bad_arguments_raise_before_any_launch():
    from pnnh_kernels.cuda import launch

    geometry = ([1, 1], [1, 1, 1, 1], [1, 1])  # stride, padding (top, left, bottom, right), dilation
    x = torch.randn(1, 4, 5, 5, device="cuda")
    weight = torch.randn(4, 4, 3, 3, device="cuda")
    with pytest.raises(ValueError, match="weight: expected dtype"):
        launch.conv_forward(x, weight.half(), None, None, None, None, None, *geometry, True)
    with pytest.raises(ValueError, match="x: the CUDA kernels need a CUDA tensor"):
        launch.conv_forward(x.cpu(), weight, None, None, None, None, None, *geometry, True)
    with pytest.raises(ValueError, match="encoder_weight: expected shape"):
        launch.conv_forward(
            x, weight, None, None, torch.randn(2, 3, device="cuda"), None, None, *geometry, True
        )


def test_more_than_2_31_elements_index_with_64_bits():
    """A bf16 input of 2.3e9 elements: the last output rows match the torch backend on a crop."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of free GPU memory, has {free / 2**30:.0f}")
    torch.manual_seed(0)
    layer = (
        FusedPNNHConv(16, 16, coder_init="he", coder_trainable=True, backend="cuda").cuda().bfloat16()
    )
    x = torch.randn(1, 16, 12_000, 12_000, device="cuda", dtype=torch.bfloat16).relu()
    x = x.contiguous(memory_format=torch.channels_last)
    assert x.numel() > 2**31
    with torch.no_grad(), poisoned_outputs():
        tail = layer(x)[:, :, -4:, :].float()
        layer.backend = "torch"
        expected = layer(x[:, :, -5:, :])[:, :, -4:, :].float()
    del x
    assert torch.isfinite(tail).all()
    torch.testing.assert_close(tail, expected, rtol=2e-2, atol=2e-2)
