"""Launchers of the CUDA kernels: check, lay out, allocate, launch. No autograd here (the shared
fused ops in pnnh_kernels.backends.fused_ops wrap these, as they wrap the Triton launchers).

Tensors arrive as NCHW tensors (any layout; channels_last avoids a copy) and leave as NCHW views of
NHWC memory. The kernels take raw device pointers, so everything they read is made contiguous in the
layout they expect here, and every argument is checked before a pointer is handed over: a wrong
device, dtype or shape raises ValueError naming the argument, never an illegal memory access.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from pnnh_kernels.backends.fused_common import (
    ConvGradients,
    TrainingForward,
    batch_norm_from_tiles,
    decoder_rows,
    nhwc,
    output_buffer,
)
from pnnh_kernels.conv_geometry import ConvGeometry
from pnnh_kernels.cuda import SUPPORTED_DTYPES, cache_dir, extension, unavailable_reason
from pnnh_kernels.ledger.record import kernel_launch, modelling, tensor_bytes

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
FUSED, STATISTICS, APPLY = 0, 1, 2
WGRAD_MIN_STEPS = 8  # reduction steps (of tile_sizes()["block_k"] pixels) per weight-gradient split
WGRAD_TARGET_CTAS = 512  # enough CTAs to fill an H100 (132 SMs) several times over


# The CPU emulation of the kernels (pnnh_kernels.cuda.emulation), when a test has switched it on:
# the same kernel source compiled for the host, run on CPU tensors.
_emulator: Optional[ModuleType] = None


@contextlib.contextmanager
def emulated(module: ModuleType) -> Iterator[None]:
    """Run the launchers on ``module`` (an emulation build of the kernels) with CPU tensors."""
    global _emulator
    previous, _emulator = _emulator, module
    try:
        yield
    finally:
        _emulator = previous


def _module(x: Optional[Tensor] = None) -> ModuleType:
    """The kernels' module: the emulation a test switched on, else the built extension. For the
    ledger's meta tensors (kernels declared, not run) only its tile sizes are read: the built
    extension's, or on a machine without one the CPU emulation's (the same source; built once into
    the cache, about 35 s)."""
    if _emulator is not None:
        return _emulator
    if x is not None and modelling(x) and extension() is None:
        from pnnh_kernels.cuda import emulation

        return emulation.load_emulator(emulation.cached_emulator(cache_dir() / "emulation"))
    module = extension()
    if module is None:
        raise RuntimeError(unavailable_reason(torch.device("cuda"), torch.float32, "conv2d"))
    return module


def _check(
    name: str,
    tensor: Optional[Tensor],
    device: torch.device,
    dtype: Optional[torch.dtype],
    shape: Optional[tuple[int, ...]] = None,
) -> None:
    if tensor is None:
        return
    if tensor.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {tensor.device}")
    if dtype is not None and tensor.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {tensor.dtype}")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(tensor.shape)}")


def _check_call(
    x: Tensor,
    weight: Tensor,
    encoder_weight: Optional[Tensor],
    encoder_bias: Optional[Tensor],
    decoder_weight: Optional[Tensor],
) -> None:
    expected = "cpu" if _emulator is not None else "cuda"
    if x.device.type != expected and not modelling(x):
        raise ValueError(f"x: the CUDA kernels need a {expected.upper()} tensor, got one on {x.device}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x: expected float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight: expected [C_out, {x.shape[1] if x.dim() == 4 else 'C_in'}, KH, KW] for x of "
            f"shape {tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    _check("weight", weight, x.device, x.dtype)
    c_out, c_in = weight.shape[0], weight.shape[1]
    if encoder_weight is not None:
        c_b = encoder_weight.shape[0]
        _check("encoder_weight", encoder_weight, x.device, x.dtype, (c_b, c_in))
        _check("encoder_bias", encoder_bias, x.device, None, (c_b,))
        _check("decoder_weight", decoder_weight, x.device, x.dtype, (c_out, c_b))
        if decoder_weight is None and c_out != c_in:
            raise ValueError(f"decoder_weight: a tied coder needs C_out == C_in, got {c_out} != {c_in}")


def _pointer(tensor: Optional[Tensor]) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _stream(device: torch.device) -> int:
    if _emulator is not None or device.type == "meta":
        return 0
    return torch.cuda.current_stream(device).cuda_stream


def _float_vector(tensor: Optional[Tensor]) -> Optional[Tensor]:
    return None if tensor is None else tensor.detach().float().contiguous()


def _shape(module: ModuleType, x: Tensor, weight: Tensor, geometry: ConvGeometry):
    n, c_in, height, width = x.shape
    c_out, _, kh, kw = weight.shape
    oh, ow = geometry.output_size(height, width)
    return module.ConvShape(
        n,
        height,
        width,
        c_in,
        oh,
        ow,
        c_out,
        kh,
        kw,
        *geometry.stride,
        *geometry.padding,
        *geometry.dilation,
    )


def _launch_forward(
    x: Tensor,
    weight: Tensor,
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    encoder_weight: Optional[Tensor],
    encoder_bias: Optional[Tensor],
    decoder_weight: Optional[Tensor],
    geometry: ConvGeometry,
    relu: bool,
    *,
    mode: int,
    y: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    partials: Optional[tuple[Tensor, Tensor]] = None,
) -> None:
    module = _module(x)
    c_out = weight.shape[0]
    c_in, kh, kw = weight.shape[1], weight.shape[2], weight.shape[3]
    reads_x = mode != APPLY or encoder_weight is not None
    x_rows = nhwc(x) if reads_x else None
    # [C_out, KH, KW, C_in]; the apply pass reads z instead of convolving, so no weight there.
    weight_rows = weight.permute(0, 2, 3, 1).contiguous() if mode != APPLY else None
    scale_f, shift_f = _float_vector(scale), _float_vector(shift)
    for name, vector in (("scale", scale_f), ("shift", shift_f)):
        _check(name, vector, x.device, torch.float32, (c_out,))
    has_coder = encoder_weight is not None and mode != STATISTICS
    encoder = encoder_weight.contiguous() if has_coder else None
    encoder_bias_f = _float_vector(encoder_bias) if has_coder else None
    # The decoder as [C_out, C_B] rows: W_E^T for a tied coder (a small copy).
    decoder = None
    if has_coder:
        decoder = (
            encoder_weight.t().contiguous() if decoder_weight is None else decoder_weight.contiguous()
        )
    c_b = encoder.shape[0] if encoder is not None else 0
    shape = _shape(module, x, weight, geometry)
    arguments = (
        shape, c_b, mode, relu, DTYPE_CODES[x.dtype], _pointer(x_rows), _pointer(weight_rows),
        _pointer(scale_f), _pointer(shift_f), _pointer(encoder), _pointer(encoder_bias_f),
        _pointer(decoder), _pointer(y), _pointer(z),
        _pointer(partials[0] if partials else None), _pointer(partials[1] if partials else None),
        _stream(x.device),
    )  # fmt: skip
    sizes = module.tile_sizes()
    oh, ow = geometry.output_size(x.shape[2], x.shape[3])
    m = x.shape[0] * oh * ow
    tiles_m, tiles_n = math.ceil(m / sizes["block_m"]), math.ceil(c_out / sizes["block_n"])
    flops = 0 if mode == APPLY else 2 * m * c_out * c_in * kh * kw
    flops += 2 * m * c_b * (c_in + c_out) * tiles_n if c_b else 0  # the code per channel tile
    cached = 0
    if mode != APPLY:  # every channel tile re-reads x per tap; every pixel tile the weight
        cached += (tiles_n * kh * kw - 1) * tensor_bytes(x_rows) + (tiles_m - 1) * tensor_bytes(
            weight_rows
        )
    elif c_b:
        cached += (tiles_n - 1) * tensor_bytes(x_rows)
    label = {FUSED: "fused", STATISTICS: "statistics", APPLY: "apply"}[mode]
    kernel_launch(
        f"pnnh_conv_forward_kernel ({label})",
        "cuda",
        lambda: module.forward(*arguments),
        reads=[
            x_rows, weight_rows, scale_f, shift_f, encoder, encoder_bias_f, decoder,
            z if mode == APPLY else None,
        ],
        writes=[y, z if mode == STATISTICS else None, *(partials or ())],
        flops=flops,
        cached_read=cached,
    )  # fmt: skip


def conv_forward(
    x: Tensor,
    weight: Tensor,
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    encoder_weight: Optional[Tensor],
    encoder_bias: Optional[Tensor],
    decoder_weight: Optional[Tensor],
    geometry: ConvGeometry,
    relu: bool,
) -> Tensor:
    """The fused forward; returns an NCHW tensor in channels_last memory."""
    _check_call(x, weight, encoder_weight, encoder_bias, decoder_weight)
    n, _, height, width = x.shape
    c_out = weight.shape[0]
    oh, ow = geometry.output_size(height, width)
    y = output_buffer((n, oh, ow, c_out), x.dtype, x.device)
    if y.numel():
        _launch_forward(
            x, weight, scale, shift, encoder_weight, encoder_bias, decoder_weight, geometry, relu,
            mode=FUSED, y=y,
        )  # fmt: skip
    return y.permute(0, 3, 1, 2)


def conv_forward_train(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    encoder_weight: Optional[Tensor],
    encoder_bias: Optional[Tensor],
    decoder_weight: Optional[Tensor],
    geometry: ConvGeometry,
    relu: bool,
    eps: float,
) -> TrainingForward:
    """Training-mode BatchNorm in two launches of the forward kernel: convolution + per-tile
    statistics (mean, M2 per 64-pixel tile), then normalisation + coder + activation from z."""
    _check_call(x, weight, encoder_weight, encoder_bias, decoder_weight)
    module = _module(x)
    n, _, height, width = x.shape
    c_out = weight.shape[0]
    oh, ow = geometry.output_size(height, width)
    m = n * oh * ow
    rows = module.tile_rows()
    tiles = math.ceil(m / rows)
    z = output_buffer((n, oh, ow, c_out), x.dtype, x.device)
    partials = (
        output_buffer((tiles, c_out), torch.float32, x.device),
        output_buffer((tiles, c_out), torch.float32, x.device),
    )
    _launch_forward(
        x, weight, None, bias, None, None, None, geometry, False, mode=STATISTICS, z=z, partials=partials
    )
    mean, variance, scale, shift = batch_norm_from_tiles(*partials, rows, m, eps, norm_weight, norm_bias)
    y = output_buffer((n, oh, ow, c_out), x.dtype, x.device)
    _launch_forward(
        x, weight, scale, shift, encoder_weight, encoder_bias, decoder_weight, geometry, relu,
        mode=APPLY, y=y, z=z,
    )  # fmt: skip
    return TrainingForward(y.permute(0, 3, 1, 2), z.permute(0, 3, 1, 2), mean, variance)


def _wgrad(
    module: ModuleType,
    image: Tensor,
    grad: Tensor,
    out_hw: tuple[int, int],
    kernel: tuple[int, int],
    geometry: ConvGeometry,
) -> Tensor:
    """``[KH, KW, C_x, C_g]`` float32 = sum over output pixels of image_tap^T @ grad, from per-split
    partial sums added in a fixed order (deterministic)."""
    n, height, width, c_x = image.shape
    c_g = grad.shape[-1]
    m = grad.numel() // c_g if c_g else 0
    if m == 0:
        return torch.zeros((*kernel, c_x, c_g), dtype=torch.float32, device=image.device)
    taps = kernel[0] * kernel[1]
    sizes = module.tile_sizes()  # image channels x gradient channels per CTA, pixels per step
    tiles = math.ceil(c_x / sizes["block_m"]) * math.ceil(c_g / sizes["block_n"]) * taps
    # Enough CTAs to fill the GPU, each still reducing at least WGRAD_MIN_STEPS steps of pixels, and
    # no more splits than grid.z holds.
    steps = math.ceil(m / (WGRAD_MIN_STEPS * sizes["block_k"]))
    splits = max(1, min(math.ceil(WGRAD_TARGET_CTAS / tiles), steps, sizes["max_grid_yz"] // taps))
    per_split = math.ceil(math.ceil(m / splits) / sizes["block_k"]) * sizes["block_k"]
    splits = math.ceil(m / per_split)
    partial = output_buffer((splits, *kernel, c_x, c_g), torch.float32, image.device)
    shape = module.ConvShape(
        n,
        height,
        width,
        c_x,
        *out_hw,
        c_g,
        *kernel,
        *geometry.stride,
        *geometry.padding,
        *geometry.dilation,
    )
    arguments = (
        shape, c_g, per_split, splits, DTYPE_CODES[image.dtype], _pointer(image), _pointer(grad),
        _pointer(partial), _stream(image.device),
    )  # fmt: skip
    tiles_x, tiles_g = math.ceil(c_x / sizes["block_m"]), math.ceil(c_g / sizes["block_n"])
    kernel_launch(
        "pnnh_conv_wgrad_kernel",
        "cuda",
        lambda: module.wgrad(*arguments),
        reads=[image, grad],
        writes=[partial],
        flops=2 * m * c_x * c_g * taps,
        # every (image tile, gradient tile, tap) CTA reads its rows of both
        cached_read=(tiles_g * taps - 1) * tensor_bytes(image)
        + (tiles_x * taps - 1) * tensor_bytes(grad),
    )
    return partial.sum(0) if splits > 1 else partial[0]


def conv_backward(
    grad_output: Tensor,
    x: Tensor,
    y: Tensor,
    weight: Tensor,
    scale: Optional[Tensor],
    encoder_weight: Optional[Tensor],
    encoder_bias: Optional[Tensor],
    decoder_weight: Optional[Tensor],
    geometry: ConvGeometry,
    relu: bool,
    learner_grad: Optional[Tensor] = None,
) -> ConvGradients:
    """All gradients of the fused op (the same contract as the Triton backend's conv_backward: the
    learner's weight gradient unscaled, ``learner_grad`` replacing the masked dy for the learner)."""
    _check_call(x, weight, encoder_weight, encoder_bias, decoder_weight)
    _check("grad_output", grad_output, x.device, None, tuple(y.shape))
    module = _module(x)
    dtype_code = DTYPE_CODES[x.dtype]
    stream = _stream(x.device)
    n, c_in, height, width = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    oh, ow = y.shape[2], y.shape[3]
    x_rows = nhwc(x)
    dy = nhwc(grad_output.to(x.dtype))
    # The output ReLU's mask, applied once here (the Triton kernels apply it while loading).
    dp = torch.where(nhwc(y) > 0, dy, 0).contiguous() if relu else dy.contiguous()
    if learner_grad is not None:
        learner_dp = nhwc(learner_grad.to(x.dtype)).contiguous()
        learner_for_input = learner_dp
    else:
        learner_dp = dp
        learner_for_input = dp if scale is None else (dp.float() * scale).to(x.dtype).contiguous()

    shape = _shape(module, x, weight, geometry)
    grads_coder: tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]] = (None, None, None)
    grad_pre = encoder_t_rows = None
    c_b = 0
    if encoder_weight is not None:
        c_b = encoder_weight.shape[0]
        encoder = encoder_weight.contiguous()
        code = output_buffer((n, oh, ow, c_b), x.dtype, x.device)
        grad_pre = output_buffer((n, oh, ow, c_b), x.dtype, x.device)
        # Bound to names so that they outlive the launch: a temporary freed before the call returns
        # could hand its memory to the next allocation while its pointer is in flight.
        encoder_bias_f = _float_vector(encoder_bias)
        decoder_t = decoder_rows(encoder_weight, decoder_weight)  # [C_B, C_out]
        arguments = (
            shape, c_b, dtype_code, _pointer(x_rows), _pointer(encoder), _pointer(encoder_bias_f),
            _pointer(decoder_t), _pointer(dp), _pointer(code), _pointer(grad_pre), stream,
        )  # fmt: skip
        kernel_launch(
            "pnnh_coder_backward_kernel",
            "cuda",
            lambda: module.coder_backward(*arguments),
            reads=[x_rows, encoder, encoder_bias_f, decoder_t, dp],
            writes=[code, grad_pre],
            flops=2 * n * oh * ow * c_b * (c_in + weight.shape[0]),
        )
        strided = ConvGeometry((1, 1), geometry.stride, (0, 0), (1, 1))
        unit = ConvGeometry((1, 1), (1, 1), (0, 0), (1, 1))
        encoder_grad = _wgrad(module, x_rows, grad_pre, (oh, ow), (1, 1), strided)[0, 0].t()
        decoder_grad_t = _wgrad(module, code, dp, (oh, ow), (1, 1), unit)[0, 0]
        if decoder_weight is None:
            grads_coder = (encoder_grad + decoder_grad_t, None, None)
        else:
            grads_coder = (encoder_grad, None, decoder_grad_t.t())
        if encoder_bias is not None:
            grads_coder = (grads_coder[0], grad_pre.float().sum((0, 1, 2)), grads_coder[2])
        encoder_t_rows = encoder_weight.t().contiguous()  # [C_in, C_B]

    dx = output_buffer((n, height, width, c_in), x.dtype, x.device)
    if dx.numel():
        weight_t = weight.permute(1, 2, 3, 0).contiguous()  # [C_in, KH, KW, C_out]
        arguments = (
            shape, c_b, dtype_code, _pointer(learner_for_input), _pointer(weight_t), _pointer(grad_pre),
            _pointer(encoder_t_rows), _pointer(dx), stream,
        )  # fmt: skip
        sizes = module.tile_sizes()
        tiles_m = math.ceil(n * height * width / sizes["block_m"])
        tiles_n = math.ceil(c_in / sizes["block_n"])
        kernel_launch(
            "pnnh_conv_dgrad_kernel",
            "cuda",
            lambda: module.dgrad(*arguments),
            reads=[learner_for_input, weight_t, grad_pre, encoder_t_rows],
            writes=[dx],
            flops=2 * n * height * width * c_in * weight.shape[0] * kh * kw
            + 2 * n * oh * ow * c_b * c_in,
            cached_read=(tiles_n * kh * kw - 1) * tensor_bytes(learner_for_input)
            + (tiles_m - 1) * tensor_bytes(weight_t),
        )
    weight_unscaled = _wgrad(module, x_rows, learner_dp, (oh, ow), (kh, kw), geometry)
    return ConvGradients(
        dx.permute(0, 3, 1, 2),
        weight_unscaled,
        learner_dp.float().sum((0, 1, 2)),
        *grads_coder,
    )
