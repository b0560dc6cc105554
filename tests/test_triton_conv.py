"""The Triton backend of FusedPNNHConv against the float64 reference, forward and every gradient.

On a machine without a GPU these run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1);
on a GPU they run the compiled kernels. Every launch writes into NaN-poisoned buffers, so an element
a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from pnnh_kernels import FusedPNNHConv
from pnnh_kernels.triton.pnnh_conv_config import ConvConfig
from tests.conv_cases import (
    CASES,
    TRAINING_CASES,
    Case,
    check_case,
    check_linear,
    check_training_case,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The smallest tiles tl.dot accepts: with channel counts above 16 they exercise every chunk loop
# (several K chunks, several code chunks, the epilogue encoder instead of the main-loop one), and
# the weight-gradient reduction split into partial sums.
SMALL_TILES = ConvConfig(
    block_m=16, block_n=16, block_k=16, block_b=16, num_warps=1, num_stages=1, wgrad_splits=3
)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_gradients_fp32(case):
    check_case(case)


@pytest.mark.parametrize(
    "case",
    [
        Case(2, 40, 37, 20, 3, 1, 1, 5, 6),  # code in 2 chunks, C_in in 3 chunks, C_out in 3 tiles
        Case(1, 33, 33, 33, 3, 2, 1, 7, 5, norm=True),  # C_B = C > one chunk, strided
        Case(2, 17, 40, 9, 1, 2, 1, 5, 5, tied=False, relu=False),
        Case(3, 18, 18, 5, 3, 1, 1, 6, 7),  # code fits one chunk: encoded in the main loop
    ],
    ids=str,
)
def test_chunked_paths_with_small_tiles(case):
    check_case(case, config=SMALL_TILES)


# sm_90's wide tiles (pnnh_conv_config.large_tiles, wgrad_image_tile) with the interpreter's small
# pixel tiles: every launch takes 256-wide channel tiles (masked down to these channel counts) except
# the input gradient with a ReLU mask or a stride, which narrows to 128 (narrow_input_gradient), and
# the weight gradient 128 x 128 channel tiles.
WIDE_TILES = ConvConfig(
    block_m=16, block_n=256, block_k=16, block_b=16, num_warps=1, num_stages=1, wgrad_image_tile=128
)


@pytest.mark.parametrize(
    "case",
    [
        Case(2, 20, 24, 10, 3, 1, 1, 5, 6),
        Case(1, 17, 33, 8, 3, 2, 1, 7, 5),
        Case(1, 72, 72, 16, 3, 1, 1, 4, 4),  # more than 64 image channels: 128-wide wgrad tiles
    ],
    ids=str,
)
def test_wide_channel_tiles(case):
    check_case(case, config=WIDE_TILES)


@pytest.mark.parametrize(
    "case", [TRAINING_CASES[0], Case(1, 72, 72, 16, 3, 1, 1, 4, 4, norm=True)], ids=str
)
def test_wide_channel_tiles_with_training_batchnorm(case):
    from pnnh_kernels.triton.pnnh_conv_config import wgrad_tiles

    if case.c_in > 64:
        tiles = wgrad_tiles(
            WIDE_TILES, case.c_in, case.c_out, torch.float32, False, 9, 0, row_taps=False, pixels=1
        )
        assert tiles.block_x == 128
    check_training_case(case, WIDE_TILES)


# sm_90's 256-wide gradient tiles in the weight gradient (pnnh_conv_config.wgrad_tiles), which a
# launch takes only on a card whose multiprocessors their grid fills: here the launcher is told it
# runs on an sm_90 card of one multiprocessor. 300 output channels: a full and a masked 256-wide
# tile, in the learner's and the decoder's weight gradients; 72 pixels in 32-pixel steps: two
# splits, their partials added by the reduction.
WIDE_GRADIENT_TILES = ConvConfig(
    block_m=16, block_n=128, block_k=16, block_b=16, num_warps=1, num_stages=1,
    wgrad_image_tile=128, wgrad_gradient_tile=256, wgrad_splits=2,
)  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        Case(1, 20, 300, 12, 3, 1, 1, 8, 9, tied=False),
        Case(1, 20, 300, 12, 3, 1, 1, 8, 9, tied=False, norm=True),
    ],
    ids=str,
)
def test_wide_gradient_tiles(case, monkeypatch):
    from pnnh_kernels.triton import pnnh_conv
    from pnnh_kernels.triton.pnnh_conv_config import wgrad_tiles

    for multiprocessors, gradient_tile in ((1, 256), (0, 64)):
        tiles = wgrad_tiles(
            WIDE_GRADIENT_TILES,
            20,
            300,
            torch.float32,
            True,
            9,
            multiprocessors,
            row_taps=False,
            pixels=72,
        )
        assert tiles.block_g == gradient_tile
    monkeypatch.setattr(pnnh_conv, "launch_card", lambda device: ((9, 0), 1))
    plans = []  # the launches' weight-gradient plans: 256-wide tiles, two splits

    def recording_plan(*arguments):
        plans.append(planned(*arguments))
        return plans[-1]

    planned = pnnh_conv._wgrad_plan
    monkeypatch.setattr(pnnh_conv, "_wgrad_plan", recording_plan)
    planned.cache_clear()  # plans made without the card
    try:
        if case.norm:
            check_training_case(case, WIDE_GRADIENT_TILES)
        else:
            check_case(case, config=WIDE_GRADIENT_TILES)
    finally:
        planned.cache_clear()  # plans made with it
    wide = [plan for plan in plans if plan.site.constants["BLOCK_G"] == 256]
    assert wide
    assert all(plan.splits == 2 for plan in wide)


# sm_90's row-tap weight gradient (the kernel's ROW_TAPS, pnnh_conv_config.row_tap_tiles): a
# program reduces a kernel row's three taps, its gradient tile loaded once for three image tiles one
# pixel (or one dilation) apart. 20 image and 24 gradient channels (masked tiles); 30-60 pixels in
# 32-pixel steps; partials in two splits, or one split stored straight into the weight's gradient
# (training BatchNorm). Row taps need stride 1 and "same" padding; the strided case keeps a program
# per tap under the same configuration.
def _row_tap_tiles(splits: int) -> ConvConfig:
    return ConvConfig(
        block_m=16, block_n=64, block_k=16, block_b=16, num_warps=1, num_stages=1,
        wgrad_splits=splits, wgrad_row_taps=True,
    )  # fmt: skip


@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize(
    "case",
    [
        Case(2, 20, 24, 10, 3, 1, 1, 5, 6),
        Case(1, 20, 24, 10, 3, 1, 2, 7, 5),  # dilation 2: the row's taps two pixels apart
        Case(2, 20, 24, 10, 3, 1, 1, 5, 6, norm=True),
        Case(1, 17, 33, 8, 3, 2, 1, 7, 5),  # strided: a program per tap
    ],
    ids=str,
)
def test_row_tap_weight_gradient(case, splits, monkeypatch):
    from pnnh_kernels.triton import pnnh_conv

    plans = []  # the launches' weight-gradient plans

    def recording_plan(*arguments):
        plans.append(planned(*arguments))
        return plans[-1]

    planned = pnnh_conv._wgrad_plan
    monkeypatch.setattr(pnnh_conv, "_wgrad_plan", recording_plan)
    planned.cache_clear()
    try:
        if case.norm:
            check_training_case(case, _row_tap_tiles(splits))
        else:
            check_case(case, config=_row_tap_tiles(splits))
    finally:
        planned.cache_clear()
    learner = [plan for plan in plans if plan.site.constants["KW"] == 3]
    assert learner
    for plan in learner:
        assert plan.site.constants["ROW_TAPS"] == (case.stride == 1)
        assert plan.site.grid[2] == plan.splits * (3 if case.stride == 1 else 9)
    # the coder's 1x1 weight gradients keep a program per tap
    assert all(not plan.site.constants["ROW_TAPS"] for plan in plans if plan.site.constants["KW"] == 1)


# sm_90's deep K steps (pnnh_conv_config.deep_k): the statistics pass and the training input
# gradient step over 32 channels where every other launch steps over 16 (40 input and output
# channels: a full and a masked deep chunk).
DEEP_TILES = ConvConfig(
    block_m=32, block_n=32, block_k=16, block_b=16, num_warps=1, num_stages=1, wgrad_splits=2,
    deep_block_k=32, deep_stages=1,
)  # fmt: skip


def test_deep_k_steps(monkeypatch):
    from pnnh_kernels.triton import compiled_launch

    launched = {}  # K step of each launch, by the launch's name
    launch = compiled_launch.launch

    def recording_launch(site, *arguments, **options):
        launched.setdefault(site.name, set()).add(site.constants.get("BLOCK_K"))
        return launch(site, *arguments, **options)

    monkeypatch.setattr(compiled_launch, "launch", recording_launch)
    check_training_case(Case(2, 40, 40, 20, 3, 1, 1, 5, 6, norm=True), DEEP_TILES)
    # the statistics pass and the input gradient took the deep configuration
    assert launched["_pnnh_conv_fwd_kernel (statistics)"] == {32}
    assert launched["_pnnh_conv_dgrad_kernel"] == {32}
    assert launched["_pnnh_conv_fwd_kernel (apply)"] == {16}


def test_wide_tiles_only_on_sm90_where_the_grid_fills_the_gpu():
    from pnnh_kernels.triton.pnnh_conv_config import large_tiles, narrow_input_gradient

    hopper, ampere = ((9, 0), 132), ((8, 0), 108)
    assert large_tiles(256, 256, torch.bfloat16, 256 * 8 * 8, *hopper) == "wide"  # 128 >= 0.75 x 132
    assert not large_tiles(512, 512, torch.bfloat16, 256 * 4 * 4, *hopper)  # 64 tiles either way
    assert not large_tiles(256, 256, torch.bfloat16, 256 * 8 * 8, *ampere)  # spilled on sm_80
    assert not large_tiles(256, 256, torch.float32, 256 * 8 * 8, *hopper)
    assert large_tiles(128, 256, torch.bfloat16, 256 * 16 * 16, *hopper) != "wide"  # dgrad's N
    assert narrow_input_gradient(WIDE_TILES, relu=True, unit_stride=True).block_n == 128
    assert narrow_input_gradient(WIDE_TILES, relu=False, unit_stride=False).block_n == 128
    assert narrow_input_gradient(WIDE_TILES, relu=False, unit_stride=True).block_n == 256

    from pnnh_kernels.triton.pnnh_conv_config import config_for_card, wgrad_tiles

    # sm_90 in 16-bit: 128-wide image tiles in the weight gradient, the statistics pass capped at 128
    # registers where its tiles are 128 x 128 (32 x 16 x 16 pixels: too few for 256-pixel tiles);
    # sm_80 neither.
    hopper_config = config_for_card(128, 128, 64, torch.bfloat16, 32 * 16 * 16, *hopper)
    ampere_config = config_for_card(128, 128, 64, torch.bfloat16, 32 * 16 * 16, *ampere)
    assert (hopper_config.block_m, hopper_config.block_n) == (128, 128)
    for config, multiprocessors, image_tile in ((hopper_config, 132, 128), (ampere_config, 108, 64)):
        tiles = wgrad_tiles(
            config, 128, 128, torch.bfloat16, False, 9, multiprocessors, row_taps=False, pixels=8192
        )
        assert tiles.block_x == image_tile
    # the weight gradient's row taps on sm_90 in 16-bit only
    assert (hopper_config.wgrad_row_taps, ampere_config.wgrad_row_taps) == (True, False)
    assert hopper_config.statistics_max_registers == 128
    assert ampere_config.statistics_max_registers is None
    # the apply pass's code chunks: 64 channels on sm_90 beside 128-wide tiles, 32 elsewhere
    assert (hopper_config.block_b, ampere_config.block_b) == (64, 32)
    assert config_for_card(256, 256, 128, torch.bfloat16, 256 * 8 * 8, *hopper).block_b == 32
    # sm_90 in 16-bit at 64 output channels: 256 x 64 tiles, but not for the masked input gradient
    tall = config_for_card(64, 64, 32, torch.bfloat16, 256 * 32 * 32, *hopper)
    assert (tall.block_m, tall.block_n) == (256, 64)
    assert narrow_input_gradient(tall, relu=True, unit_stride=True).block_m == 128
    assert config_for_card(64, 64, 32, torch.bfloat16, 256 * 32 * 32, *ampere).block_m == 128
    # ... and 256 x 128 at 128 channels where their grid fills the GPU, uncapped; the launches with
    # the coder's epilogue and the eval-mode (scaled) input gradient keep 128-pixel tiles there
    from pnnh_kernels.triton.pnnh_conv_config import narrow_coder_epilogue

    tall_128 = config_for_card(128, 128, 64, torch.bfloat16, 256 * 16 * 16, *hopper)
    assert (tall_128.block_m, tall_128.block_n, tall_128.statistics_max_registers) == (256, 128, None)
    assert narrow_coder_epilogue(tall_128).block_m == 128
    assert narrow_coder_epilogue(tall).block_m == 256  # 256 x 64 fits
    assert narrow_input_gradient(tall_128, relu=False, unit_stride=True, scaled=True).block_m == 128
    assert narrow_input_gradient(tall_128, relu=False, unit_stride=True).block_m == 256
    assert large_tiles(128, 128, torch.bfloat16, 256 * 16 * 16, *hopper) == "tall"
    assert not large_tiles(128, 128, torch.float32, 256 * 16 * 16, *hopper)
    assert not large_tiles(128, 128, torch.bfloat16, 256 * 16 * 16, *ampere)
    # 128-deep K steps where the grid has at most a tile per multiprocessor, beside 128-pixel tiles
    from pnnh_kernels.triton.pnnh_conv_config import deep_k

    deep_512 = config_for_card(512, 512, 256, torch.bfloat16, 256 * 4 * 4, *hopper)
    assert (deep_512.deep_block_k, deep_512.deep_stages) == (128, 3)
    assert (deep_k(deep_512).block_k, deep_k(deep_512).statistics_max_registers) == (128, None)
    assert config_for_card(256, 256, 128, torch.bfloat16, 256 * 8 * 8, *hopper).deep_stages == 2
    assert tall_128.deep_block_k is None  # 256 x 128 tiles spilled with them
    assert config_for_card(512, 512, 256, torch.bfloat16, 256 * 4 * 4, *ampere).deep_block_k is None


# sm_90's 256 x 128 tiles with the interpreter's channel tiles: the statistics pass and the training
# input gradient take 256-pixel tiles, the apply pass, the fused forward, the eval-mode input
# gradient and the coder backward 128-pixel ones (narrow_coder_epilogue, narrow_input_gradient,
# narrow_coder_backward). 300 pixels: two 256-pixel tiles, the second masked.
TALL_TILES = ConvConfig(
    block_m=256, block_n=128, block_k=16, block_b=16, num_warps=1, num_stages=1, wgrad_splits=2
)


@pytest.mark.parametrize(
    ("case", "training"),
    [
        (Case(3, 20, 24, 10, 3, 1, 1, 10, 10), False),
        (Case(3, 20, 24, 10, 3, 1, 1, 10, 10, norm=True), False),  # eval: the scaled input gradient
        (Case(3, 20, 24, 10, 3, 1, 1, 10, 10, norm=True), True),
    ],
    ids=["plain", "eval-bn", "train-bn"],
)
def test_tall_tiles(case, training):
    if training:
        check_training_case(case, TALL_TILES)
    else:
        check_case(case, config=TALL_TILES)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "case",
    [Case(2, 24, 24, 12, 3, 1, 1, 5, 7), Case(1, 16, 32, 8, 3, 2, 1, 7, 7, tied=False, norm=True)],
    ids=str,
)
def test_low_precision(case, dtype):
    check_case(case, dtype=dtype)


def test_module_eval_batchnorm_runs_on_triton_and_matches_torch_backend():
    layer = FusedPNNHConv(
        6, 6, norm="batch", backend="triton", coder_init="he", coder_trainable=True
    ).to(DEVICE)
    with torch.no_grad():
        layer.norm.running_mean.normal_()
        layer.norm.running_var.uniform_(0.5, 2.0)
    layer.eval()
    reference = copy.deepcopy(layer)
    reference.backend = "torch"
    assert layer.backend_in_use == "triton"
    x = torch.randn(2, 6, 5, 5, device=DEVICE).relu()
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("small_tiles", [False, True])
@pytest.mark.parametrize("case", TRAINING_CASES, ids=str)
def test_training_batchnorm_matches_reference_and_nn_batchnorm(case, small_tiles):
    check_training_case(case, SMALL_TILES if small_tiles else None)


@pytest.mark.parametrize("case", TRAINING_CASES[:2], ids=str)
def test_training_step_with_the_default_fixed_coder(case):
    # The default coder requires no gradient: the fused backward must still give the learner, norm
    # and input gradients of the reference, and none to the coder.
    check_training_case(case, coder_trainable=False)


def test_training_batchnorm_rejects_one_value_per_channel_like_nn_batchnorm():
    layer = (
        FusedPNNHConv(4, 4, norm="batch", backend="triton", coder_init="he", coder_trainable=True)
        .to(DEVICE)
        .train()
    )
    x = torch.randn(1, 4, 1, 1, device=DEVICE)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as ours:
        layer(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel") as theirs:
        nn.BatchNorm2d(4).to(DEVICE).train()(x)
    assert str(ours.value) == str(theirs.value)


def test_training_batchnorm_variance_is_accurate_at_large_means():
    layer = (
        FusedPNNHConv(8, 8, norm="batch", backend="triton", coder_init="he", coder_trainable=True)
        .to(DEVICE)
        .train()
    )
    with torch.no_grad():
        layer.bias.fill_(1e3)  # the learner output: mean 1e3, standard deviation about 1
    layer.norm.momentum = 1.0  # running_var becomes this batch's unbiased variance
    x = torch.randn(4, 8, 6, 6, device=DEVICE).relu()
    layer(x)
    weight, bias = layer.weight.detach().double().cpu(), layer.bias.detach().double().cpu()
    z = nn.functional.conv2d(x.double().cpu(), weight, bias, padding=1)
    variance = z.var(dim=(0, 2, 3), unbiased=True)
    assert float(z.mean()) > 999
    relative = ((layer.norm.running_var.double().cpu() - variance) / variance).abs().max()
    # fp32 values near 1e3 carry 6e-5 absolute error; E[z^2] - E[z]^2 in fp32 would lose it all.
    assert float(relative) < 1e-3


def test_compile_fullgraph_with_training_batchnorm():
    layers = nn.Sequential(
        FusedPNNHConv(6, 6, norm="batch", backend="triton", coder_init="he", coder_trainable=True),
        FusedPNNHConv(6, 6, norm="batch", backend="triton", coder_init="he", coder_trainable=True),
    ).to(DEVICE)
    twin = copy.deepcopy(layers)
    compiled = torch.compile(layers, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 6, 5, 5, device=DEVICE)
    out = compiled(x)
    out.sum().backward()
    expected = twin(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for a, b in zip(layers.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layers[0].norm.running_var, twin[0].norm.running_var)


def test_contiguous_input_gives_contiguous_output():
    layer = FusedPNNHConv(5, 5, backend="triton", coder_init="he", coder_trainable=True).to(DEVICE)
    x = torch.randn(2, 5, 6, 4, device=DEVICE)
    out = layer(x)
    assert out.is_contiguous()
    reference = copy.deepcopy(layer)
    reference.backend = "torch"
    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_in_bf16_out():
    layer = FusedPNNHConv(16, 16, backend="triton", coder_init="he", coder_trainable=True).to(DEVICE)
    x = torch.randn(2, 16, 5, 5, device=DEVICE).relu()
    expected = layer(x).detach()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    scale = float(expected.abs().max())
    assert float((out.detach().float() - expected).abs().max()) < 2e-2 * scale
    out.float().sum().backward()
    assert layer.weight.grad is not None
    assert layer.weight.grad.dtype == torch.float32


def _saved_activation_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward, parameters and buffers excluded."""
    owned = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(saved.values())


def test_triton_op_keeps_only_input_and_output_alive():
    layer = (
        FusedPNNHConv(32, 32, norm="batch", backend="triton", coder_init="he", coder_trainable=True)
        .to(DEVICE)
        .eval()
    )
    reference = copy.deepcopy(layer)
    reference.backend = "torch"
    x = torch.randn(2, 32, 16, 16, device=DEVICE).to(memory_format=torch.channels_last).relu()
    x.requires_grad_(True)
    x_bytes = x.numel() * x.element_size()
    fused = _saved_activation_bytes(layer, x)
    unfused = _saved_activation_bytes(reference, x)
    # x and the output (same shape here), plus a few per-channel vectors of the BatchNorm folding
    # (the scale, 1/std, the mean) that autograd keeps for gamma's and beta's gradients.
    assert 2 * x_bytes <= fused <= 2 * x_bytes + 8 * 32 * 4
    # The unfused layer also keeps the conv output and the code (C_B = C / 2): 3.5x the input.
    assert unfused == int(3.5 * x_bytes)
    print(
        f"saved for backward: fused {fused / x_bytes:.2f}x, unfused {unfused / x_bytes:.2f}x the input"
    )


def assert_compiled_matches_eager(module: nn.Module, x: torch.Tensor) -> None:
    """torch.compile(fullgraph=True) traces ``module`` and gives eager's output and input gradient."""
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = x.requires_grad_(True)
    out = compiled(x)
    out.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    expected = module(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, x.grad)


def test_compile_fullgraph_traces_the_triton_op():
    layers = nn.Sequential(
        FusedPNNHConv(8, 8, backend="triton", coder_init="he", coder_trainable=True),
        FusedPNNHConv(8, 12, stride=2, backend="triton", coder_init="he", coder_trainable=True),
    ).to(DEVICE)
    assert_compiled_matches_eager(layers, torch.randn(2, 8, 6, 6, device=DEVICE))


@pytest.mark.parametrize(
    ("leading", "c_in", "c_out", "c_b"), [((7,), 9, 9, 4), ((2, 5), 13, 6, 5), ((3,), 20, 20, 20)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_on_the_fused_kernels_matches_float64_reference(leading, c_in, c_out, c_b, dtype):
    check_linear(leading, c_in, c_out, c_b, dtype)


def test_compile_fullgraph_of_a_triton_linear_stack():
    from pnnh_kernels import FusedPNNHLinear

    stack = nn.Sequential(
        FusedPNNHLinear(12, 12, backend="triton", coder_init="he", coder_trainable=True),
        FusedPNNHLinear(12, 20, backend="triton", coder_init="he", coder_trainable=True),
    ).to(DEVICE)
    assert_compiled_matches_eager(stack, torch.randn(2, 5, 12, device=DEVICE))


# bf16 training steps at the CIFAR stage shapes on a GPU: the sm_90 configuration (wide and tall
# tiles, the statistics pass's register cap, 128-wide weight-gradient tiles, the split fill) is
# chosen only there, at these sizes. On the CPU one small shape checks the comparison itself.
TRAINING_STAGES = [(64, 32), (128, 16), (256, 8), (512, 4)] if DEVICE == "cuda" else [(24, 6)]


@pytest.mark.parametrize(("channels", "size"), TRAINING_STAGES, ids=str)
def test_bf16_training_step_matches_the_torch_backend(channels, size):
    batch = 256 if DEVICE == "cuda" else 2
    torch.manual_seed(0)
    fused = FusedPNNHConv(channels, channels, norm="batch", backend="triton").to(DEVICE)
    reference = copy.deepcopy(fused)
    reference.backend = "torch"
    fused = fused.to(torch.bfloat16, memory_format=torch.channels_last)
    x = torch.randn(batch, channels, size, size, device=DEVICE).relu()
    grad = torch.randn(batch, channels, size, size, device=DEVICE)
    x_fused = x.to(torch.bfloat16, memory_format=torch.channels_last).requires_grad_(True)
    x_reference = x.clone().requires_grad_(True)
    y_fused, y_reference = fused(x_fused), reference(x_reference)
    y_fused.backward(grad.to(torch.bfloat16))
    y_reference.backward(grad)

    def assert_close(name: str, value: torch.Tensor, expected: torch.Tensor) -> None:
        # bf16 operands (8 mantissa bits) against fp32: a relative error of the whole tensor
        error = (value.float() - expected).norm() / expected.norm()
        assert error < 0.03, f"{name}: relative error {error:.3g}"

    assert_close("output", y_fused, y_reference)
    assert_close("input gradient", x_fused.grad, x_reference.grad)
    assert_close("weight gradient", fused.weight.grad, reference.weight.grad)
    assert_close("norm weight gradient", fused.norm.weight.grad, reference.norm.weight.grad)
