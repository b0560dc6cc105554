"""The CUDA kernels' own source, compiled for the host with csrc/cuda_emulation.h (threads, shared
memory, barriers, cp.async and mma.sync m16n8k16 emulated), against the float64 reference on CPU
tensors: the same checks tests/test_cuda_conv.py runs on a GPU, so that a machine without one still
verifies the kernels' indexing, tiling, fragment loads, epilogues and launch glue.

What this cannot verify: races and missing cp.async waits (emulated copies are synchronous), the
hardware's rounding inside an MMA, anything about speed. Those need the GPU tests.
"""

from __future__ import annotations

import pytest
import torch

from pnnh_kernels.cuda import launch
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

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the real kernels instead")

# The fixtures ``cuda_emulator`` (built once, cached) and ``emulated_cuda_backend`` are in
# conftest.py, shared with tests/test_conv2d_opinfo.py and tests/test_opcheck.py.


def test_the_module_is_the_emulation(cuda_emulator):
    assert cuda_emulator.emulated is True
    assert cuda_emulator.kernel_names() == [
        "pnnh_conv_forward_kernel",
        "pnnh_coder_backward_kernel",
        "pnnh_conv_dgrad_kernel",
        "pnnh_conv_wgrad_kernel",
        "bn_finalize_forward_kernel",
        "bn_running_update_kernel",
        "bn_backward_reduce_kernel",
        "bn_finalize_backward_kernel",
        "wgrad_reduce_kernel",
    ]


@pytest.mark.usefixtures("emulated_cuda_backend")
@pytest.mark.parametrize("case", CASES + CUDA_TILE_CASES, ids=str)
def test_forward_and_gradients_fp32(case):
    check_case(case, backend="cuda")


@pytest.mark.usefixtures("emulated_cuda_backend")
@pytest.mark.parametrize("case", ASYMMETRIC_PADDING_CASES, ids=str)
def test_asymmetric_same_padding_without_coder(case):
    check_asymmetric_padding(case, backend="cuda")


@pytest.mark.usefixtures("emulated_cuda_backend")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[4], *CUDA_TILE_CASES], ids=str)
def test_tensor_core_path(case, dtype):
    check_case(case, dtype=dtype, backend="cuda")


@pytest.mark.usefixtures("emulated_cuda_backend")
@pytest.mark.parametrize(
    "case", [*TRAINING_CASES, Case(2, 72, 72, 36, 3, 1, 1, 9, 9, norm=True)], ids=str
)
def test_training_batchnorm(case):
    check_training_case(case, backend="cuda")


@pytest.mark.usefixtures("emulated_cuda_backend")
@pytest.mark.parametrize(
    ("leading", "c_in", "c_out", "c_b"), [((7,), 9, 9, 4), ((2, 5), 13, 6, 5), ((70,), 40, 72, 24)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear(leading, c_in, c_out, c_b, dtype):
    check_linear(leading, c_in, c_out, c_b, dtype, backend="cuda")


@pytest.mark.usefixtures("emulated_cuda_backend")
def test_launchers_reject_bad_arguments():

    geometry = ([1, 1], [1, 1, 1, 1], [1, 1])  # stride, padding (top, left, bottom, right), dilation
    x = torch.randn(1, 4, 5, 5)
    weight = torch.randn(4, 4, 3, 3)
    with pytest.raises(ValueError, match="weight: expected dtype"):
        launch.conv_forward(x, weight.half(), None, None, None, None, None, *geometry, True)
    encoder, wide = torch.randn(2, 3), torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="encoder_weight: expected shape"):
        launch.conv_forward(x, weight, None, None, encoder, None, None, *geometry, True)
    with pytest.raises(ValueError, match="decoder_weight: a tied coder needs C_out == C_in"):
        launch.conv_forward(x, wide, None, None, torch.randn(2, 4), None, None, *geometry, True)


@pytest.mark.usefixtures("emulated_cuda_backend")
@pytest.mark.parametrize("case", TRAINING_CASES[:1], ids=str)  # 105 pixels: four 32-pixel splits
def test_training_batchnorm_with_a_split_weight_gradient(case, monkeypatch):
    """The weight gradient from several split partials, added by wgrad_reduce_kernel into the
    weight's layout and dtype (the CIFAR shapes' path; these small shapes would not split)."""
    from pnnh_kernels.backends import fused_common
    from pnnh_kernels.cuda import launch

    monkeypatch.setattr(launch, "WGRAD_MIN_STEPS", 1)
    monkeypatch.setattr(fused_common, "WGRAD_PARTIAL_TRAFFIC", 1e9)
    emulator, splits = launch._emulator, []

    class Spy:  # sees the reduction's launches: the number of partials each adds
        def __getattr__(self, name):
            target = getattr(emulator, name)
            if name != "wgrad_reduce":
                return target

            def reduce(*arguments):
                splits.append(arguments[0])
                return target(*arguments)

            return reduce

    monkeypatch.setattr(launch, "_emulator", Spy())
    check_training_case(case, backend="cuda")
    assert splits
    assert min(splits) > 1
