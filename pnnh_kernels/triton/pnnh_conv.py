"""Launchers of the fused PNNH convolution kernels: allocate, take the configuration
(pnnh_kernels.triton.pnnh_conv_config), launch. Each launcher is the implementation of the op of
its name (pnnh_kernels.ops.pnnh_conv) and has its flat signature.

No autograd here (see :mod:`pnnh_kernels.ops.pnnh_conv`). Tensors arrive as NCHW tensors in
channels_last memory (so their storage is NHWC, the kernels' layout) and leave the same way.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from pnnh_kernels.backends.fused_common import (
    ConvGradients,
    TrainingForward,
    TrainingGradients,
    TrainingNorm,
    channels_last,
    decoder_rows,
    image_buffer,
    in_dtype,
    output_like,
)
from pnnh_kernels.backends.fused_common import output_buffer as _output
from pnnh_kernels.conv_geometry import ConvGeometry, op_geometry
from pnnh_kernels.observer import (
    Declared,
    placeholder,
    tensor_bytes,
)
from pnnh_kernels.triton import availability, compiled_launch
from pnnh_kernels.triton.batch_norm_kernels import (
    _bn_dz_kernel,
    _bn_finalize_backward_kernel,
    _bn_finalize_forward_kernel,
    _bn_running_update_kernel,
)
from pnnh_kernels.triton.kernels import (
    _conv_wgrad_kernel,
    _pnnh_coder_bwd_kernel,
    _pnnh_conv_dgrad_kernel,
    _pnnh_conv_fwd_kernel,
    _wgrad_reduce_kernel,
)
from pnnh_kernels.triton.pnnh_conv_config import (
    ConvConfig,
    block_size,
    cdiv,
    choose_config,
    code_in_main_loop,
    deep_k,
    forcing,
    grid_of,
    input_gradient_config,
    input_precision,
    launch_card,
    launch_options,
    narrow_coder_backward,
    narrow_coder_epilogue,
    reduce_block_k,
    row_taps_allowed,
    statistics_launch_options,
    tuned_or_fixed,
    upcast_dot,
    wgrad_gradient_bytes,
    wgrad_programs_per_tile,
    wgrad_rows,
    wgrad_split_rows,
    wgrad_splits,
    wgrad_tiles,
)


@functools.lru_cache(maxsize=1024)
def _forward_site(
    x_shape: tuple[int, ...],
    weight_shape: tuple[int, ...],
    weight_strides: tuple[int, ...],
    c_b: int,
    flags: tuple[bool, ...],  # has scale, shift, encoder bias; writes statistics; reads z; ReLU
    dtype: torch.dtype,
    precision: str,
    geometry: ConvGeometry,
    config: ConvConfig,
    fixed_tiles: bool,
) -> compiled_launch.Site:
    """The fixed part of a forward launch (kernel, grid, integers, constexprs), once per shape."""
    has_scale, has_shift, has_encoder_bias, write_stats, z_input, relu = flags
    n, c_in, height, width = x_shape
    c_out, _, kh, kw = weight_shape
    oh, ow = geometry.output_size(height, width)
    m = n * oh * ow
    if write_stats:  # the partial buffers have one row per BLOCK_M tile: no autotuning of BLOCK_M
        tiles = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k}
        kernel, tiles = _pnnh_conv_fwd_kernel, {**tiles, **statistics_launch_options(config)}
        grid: Any = (cdiv(m, config.block_m), cdiv(c_out, config.block_n))
    else:
        kernel, tiles = tuned_or_fixed(_pnnh_conv_fwd_kernel, config, dtype)
        grid = grid_of(m, c_out, config)
    scalars = (
        m, height, width, c_in, oh, ow, c_out, c_b,
        *geometry.stride, *geometry.padding, *geometry.dilation, *weight_strides,
    )  # fmt: skip
    constants = dict(
        KH=kh,
        KW=kw,
        HAS_SCALE=has_scale,
        HAS_SHIFT=has_shift,
        HAS_CODER=c_b > 0,
        HAS_ENCODER_BIAS=has_encoder_bias,
        CODE_IN_MAIN_LOOP=not z_input and code_in_main_loop(config, c_b, kh, kw),
        WRITE_STATS=write_stats,
        Z_INPUT=z_input,
        RELU=relu,
        INPUT_PRECISION=precision,
        UPCAST_DOT=upcast_dot(dtype),
        BLOCK_B=config.block_b,
        **tiles,
    )
    return compiled_launch.Site(_FORWARD_NAMES[write_stats, z_input], kernel, grid, scalars, constants)


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
    y: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    partials: Optional[tuple[Tensor, Tensor]] = None,
    config: ConvConfig,
) -> None:
    """One launch of the forward kernel: fused (y given), statistics pass (``partials`` given: writes
    z and the per-tile statistics) or apply pass (y and z given: reads z instead of convolving)."""
    has_coder = encoder_weight is not None
    c_b = encoder_weight.shape[0] if has_coder else 0
    write_stats = partials is not None
    z_input = z is not None and not write_stats
    if not write_stats:
        config = narrow_coder_epilogue(config)
    site = _forward_site(
        tuple(x.shape), tuple(weight.shape), weight.stride(), c_b,
        (scale is not None, shift is not None, encoder_bias is not None, write_stats, z_input, relu),
        x.dtype, input_precision(x.dtype, x.device), geometry, config,
        forcing(),
    )  # fmt: skip
    # Absent pointer arguments get a placeholder the kernel never dereferences (constexpr-guarded).
    dummy = placeholder(x.device, x.dtype)
    x_image = channels_last(x)
    # The apply pass (z given) reads z instead of convolving: no weight, and x only for the code.
    reads_x = not z_input or has_coder
    encoder = encoder_weight.contiguous() if has_coder else None
    decoder = decoder_rows(encoder_weight, decoder_weight) if has_coder else None
    arguments = (
        x_image if reads_x else dummy,
        weight if not z_input else dummy,
        scale if scale is not None else dummy,
        shift if shift is not None else dummy,
        encoder if has_coder else dummy,
        encoder_bias if encoder_bias is not None else dummy,
        decoder if has_coder else dummy,
        y if y is not None else dummy,
        z if z is not None else dummy,
        partials[0] if write_stats else dummy,
        partials[1] if write_stats else dummy,
    )

    def declare() -> Declared:
        c_in = x.shape[1]
        c_out, _, kh, kw = weight.shape
        m = site.scalars[0]
        tiles_m, tiles_n = cdiv(m, config.block_m), cdiv(c_out, config.block_n)
        learner_flops = 0 if z_input else 2 * m * c_out * c_in * kh * kw
        # the encoder per output-channel tile (every tile recomputes the code), the decoder once
        coder_flops = 2 * m * c_b * (c_in * tiles_n + c_out) if has_coder else 0
        cached = 0
        if not z_input:  # every channel tile re-reads x per tap; every pixel tile the weight
            cached += (tiles_n * kh * kw - 1) * tensor_bytes(x_image)
            cached += (tiles_m - 1) * tensor_bytes(weight)
        elif has_coder:
            cached += (tiles_n - 1) * tensor_bytes(x_image)
        return Declared(
            reads=[
                x_image if reads_x else None, weight if not z_input else None, scale, shift,
                encoder, encoder_bias, decoder, z if z_input else None,
            ],
            writes=[y, z if write_stats else None, *(partials or ())],
            flops=learner_flops + coder_flops,
            cached_read=cached,
        )  # fmt: skip

    compiled_launch.launch(site, declare, arguments)


_FORWARD_NAMES = {
    (False, False): "_pnnh_conv_fwd_kernel (fused)",
    (True, False): "_pnnh_conv_fwd_kernel (statistics)",
    (False, True): "_pnnh_conv_fwd_kernel (apply)",
}


def conv_forward(
    x: Tensor,
    weight: Tensor,
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    encoder_weight: Optional[Tensor],
    encoder_bias: Optional[Tensor],
    decoder_weight: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    relu: bool,
) -> Tensor:
    """The fused forward (``conv2d_fused``'s implementation); returns an NCHW tensor in
    channels_last memory."""
    geometry = op_geometry(weight, stride, padding, dilation)
    n, c_in, height, width = x.shape
    c_out = weight.shape[0]
    oh, ow = geometry.output_size(height, width)
    y = image_buffer((n, c_out, oh, ow), x.dtype, x.device)
    if n * oh * ow == 0:
        return y
    c_b = 0 if encoder_weight is None else encoder_weight.shape[0]
    config = choose_config(c_in, c_out, c_b, x.dtype, n * oh * ow, x.device)
    _launch_forward(
        x, weight, scale, shift, encoder_weight, encoder_bias, decoder_weight, geometry, relu,
        y=y, config=config,
    )  # fmt: skip
    return y


def conv_forward_train(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    encoder_weight: Optional[Tensor],
    encoder_bias: Optional[Tensor],
    decoder_weight: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    relu: bool,
    eps: float,
) -> TrainingForward:
    """Training-mode BatchNorm on the learner branch in three launches: the convolution with
    per-tile statistics (z written), the statistics finished (mean, variance, scale, shift), then
    normalisation + coder + activation from z. The running statistics are the caller's (see
    :func:`update_running_statistics`)."""
    geometry = op_geometry(weight, stride, padding, dilation)
    norm = TrainingNorm(norm_weight, norm_bias, eps)
    n, c_in, height, width = x.shape
    c_out = weight.shape[0]
    oh, ow = geometry.output_size(height, width)
    m = n * oh * ow
    c_b = 0 if encoder_weight is None else encoder_weight.shape[0]
    config = choose_config(c_in, c_out, c_b, x.dtype, m, x.device)
    z = image_buffer((n, c_out, oh, ow), x.dtype, x.device)
    tiles = cdiv(m, config.block_m)
    # One allocation for the two per-tile partials (each allocation is a host cost of its own).
    partials = tuple(_output((2, tiles, c_out), torch.float32, x.device).unbind(0))
    shift = None if bias is None else bias.float()
    _launch_forward(
        x, weight, None, shift, None, None, None, geometry, False, z=z, partials=partials,
        config=deep_k(config),
    )  # fmt: skip
    mean, variance, rstd, scale, shift = _finalize_statistics(partials, config.block_m, m, norm)
    y = image_buffer((n, c_out, oh, ow), x.dtype, x.device)
    _launch_forward(
        x, weight, scale, shift, encoder_weight, encoder_bias, decoder_weight, geometry, relu,
        y=y, z=z, config=config,
    )  # fmt: skip
    return TrainingForward(y, z, mean, variance, rstd)


def _channel_block(channels: int) -> int:
    """Channels per program of the per-channel BatchNorm kernels (four launches a step: one cached
    call each, where computing it was five)."""
    return _channel_block_for(channels, availability._INTERPRETER)


@functools.lru_cache(maxsize=1024)
def _channel_block_for(channels: int, interpreted: bool) -> int:
    return 64 if interpreted else min(128, block_size(channels, 128))


@functools.lru_cache(maxsize=1024)
def _finalize_forward_site(
    tiles: int, channels: int, tile_rows: int, pixels: int, weight: bool, bias: bool, block_c: int
) -> compiled_launch.Site:
    return compiled_launch.Site(
        "_bn_finalize_forward_kernel",
        _bn_finalize_forward_kernel,
        (cdiv(channels, block_c),),
        (tiles, channels, tile_rows, pixels),
        {"HAS_WEIGHT": weight, "HAS_BIAS": bias, "BLOCK_T": 32, "BLOCK_C": block_c},
    )


def _finalize_statistics(
    partials: tuple[Tensor, Tensor], tile_rows: int, pixels: int, norm: TrainingNorm
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(mean, biased variance, rstd, scale, shift) from the statistics pass's per-tile partials."""
    tiles, channels = partials[0].shape
    device = partials[0].device
    # mean, variance and rstd leave the op (outputs of an op may not share memory); scale and shift
    # are the apply pass's and share one allocation.
    mean, variance, rstd = (_output((channels,), torch.float32, device) for _ in range(3))
    scale, shift = _output((2, channels), torch.float32, device).unbind(0)
    block_c = _channel_block(channels)
    dummy = placeholder(device, torch.float32)
    arguments = (
        *partials,
        norm.weight if norm.weight is not None else dummy,
        norm.bias if norm.bias is not None else dummy,
        mean, variance, rstd, scale, shift,
    )  # fmt: skip
    site = _finalize_forward_site(
        tiles, channels, tile_rows, pixels, norm.weight is not None, norm.bias is not None, block_c
    )
    compiled_launch.launch(
        site,
        lambda: Declared(
            reads=[*partials, norm.weight, norm.bias],
            writes=[mean, variance, rstd, scale, shift],
            flops=8 * tiles * channels,
        ),
        arguments,
        (norm.eps,),
    )
    return mean, variance, rstd, scale, shift


def update_running_statistics(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, variance: Tensor, momentum: float,
    pixels: int,
) -> None:  # fmt: skip
    """nn.BatchNorm2d's running-statistics update, in place, in one launch."""
    # What an ADInplaceOrView kernel does for an in-place op: a saved copy sees the change.
    torch.autograd.graph.increment_version((running_mean, running_var))
    channels = running_mean.shape[0]
    compiled_launch.launch(
        _running_update_site(channels, _channel_block(channels)),
        lambda: Declared(
            reads=[running_mean, running_var, mean, variance],
            writes=[running_mean, running_var],
            flops=6 * channels,
        ),
        (running_mean, running_var, mean, variance),
        (momentum, pixels / (pixels - 1)),
    )


@functools.lru_cache(maxsize=1024)
def _running_update_site(channels: int, block_c: int) -> compiled_launch.Site:
    grid = (cdiv(channels, block_c),)
    constants = {"BLOCK_C": block_c}
    return compiled_launch.Site(
        "_bn_running_update_kernel", _bn_running_update_kernel, grid, (channels,), constants
    )


def _wgrad(
    image: Tensor,
    grad: Tensor,
    y_image: Optional[Tensor],
    out_hw: tuple[int, int],
    kernel: tuple[int, int],
    geometry: ConvGeometry,
    config: ConvConfig,
    out: Optional[Tensor] = None,
) -> Tensor:
    """The weight gradient, sum over output pixels of image_tap^T @ grad: into ``out`` (shaped as
    the weight [C_g, C_x, KH, KW], any strides and dtype) when given, else as a new
    ``[KH, KW, C_x, C_g]`` float32 tensor. ``image`` [N, C_x, H, W], ``grad`` and ``y_image``
    [N, C_g, OH, OW], all in channels_last memory (NHWC storage: the pixels' rows of channels)."""
    relu = y_image is not None
    plan = _wgrad_plan(
        tuple(image.shape), grad.shape[1], out_hw, kernel, geometry, config, image.dtype,
        input_precision(image.dtype, image.device), relu,
        None if out is None else (tuple(out.shape), out.stride()), image.device,
        forcing(),
    )  # fmt: skip
    if plan.strided_out:
        assert out is not None
        target = out
        partial = placeholder(image.device, torch.float32)
    else:
        target = _output(plan.partial_shape, torch.float32, image.device)
        partial = target
    absent = placeholder(image.device, image.dtype)
    arguments = (
        image, grad, y_image if relu else absent, partial, out if plan.strided_out else absent,
    )  # fmt: skip

    def declare() -> Declared:
        # Every (image tile, gradient tile, tap) reads its rows of the image; every program (a tap's
        # or, with row taps, a kernel row's) its rows of the gradient.
        m, c_x, c_g, taps = plan.site.scalars[0], image.shape[1], grad.shape[1], plan.taps
        tiles_x, tiles_g = plan.site.grid[0], plan.site.grid[1]
        return Declared(
            reads=[image, grad, y_image if relu else None],
            writes=[target],
            flops=2 * m * c_x * c_g * taps,
            cached_read=(tiles_g * taps - 1) * tensor_bytes(image)
            + (tiles_x * plan.programs_per_tile - 1) * plan.gradient_bytes,
        )

    compiled_launch.launch(plan.site, declare, arguments)
    if out is None:
        return target.sum(0) if plan.splits > 1 else target[0]
    if plan.reduce_site is not None:
        compiled_launch.launch(
            plan.reduce_site,
            lambda: Declared(reads=[target], writes=[out], flops=target.numel()),
            (target, out),
        )
    return out


class _WgradPlan(NamedTuple):
    site: compiled_launch.Site
    reduce_site: Optional[compiled_launch.Site]  # the split partials' reduction into ``out``
    splits: int
    strided_out: bool  # written straight into ``out`` (one split)
    partial_shape: tuple[int, ...]
    taps: int
    programs_per_tile: int  # of a channel tile: one per tap, or per kernel row (row taps)
    gradient_bytes: int  # of the gradient rows the kernel reads (dy, and y, z where it reads them)


@functools.lru_cache(maxsize=1024)
def _wgrad_plan(
    image_shape: tuple[int, ...],
    c_g: int,
    out_hw: tuple[int, int],
    kernel: tuple[int, int],
    geometry: ConvGeometry,
    config: ConvConfig,
    dtype: torch.dtype,
    precision: str,
    relu: bool,
    out_layout: Optional[tuple[tuple[int, ...], tuple[int, ...]]],
    device: torch.device,
    fixed_tiles: bool,
) -> _WgradPlan:
    """Tiles, split count and the fixed part of the weight gradient's launches, once per shape."""
    n, c_x, height, width = image_shape
    m = n * out_hw[0] * out_hw[1]
    taps = kernel[0] * kernel[1]
    card = launch_card(device)
    rows = wgrad_rows(kernel, geometry.stride, geometry.padding, (height, width), tuple(out_hw))
    wgrad = wgrad_tiles(
        config, c_x, c_g, dtype, relu, taps, 0 if card is None else card[1],
        row_taps=row_taps_allowed(rows, kernel), pixels=m,
    )  # fmt: skip
    block_x, block_g, block_m = wgrad.block_x, wgrad.block_g, wgrad.block_m
    programs_per_tile = wgrad_programs_per_tile(wgrad, kernel)
    splits = wgrad_splits(config, wgrad, c_x, c_g, kernel, m, dtype, relu, device)
    splits, m_per_split = wgrad_split_rows(m, block_m, splits)
    strided_out = out_layout is not None and splits == 1
    out_strides = tuple(out_layout[1]) if out_layout is not None else (0, 0, 0, 0)
    grid = (cdiv(c_x, block_x), cdiv(c_g, block_g), splits * programs_per_tile)
    scalars = (
        m, m_per_split, height, width, c_x, *out_hw, c_g,
        *geometry.stride, *geometry.padding, *geometry.dilation, *out_strides,
    )  # fmt: skip
    constants = dict(
        KH=kernel[0],
        KW=kernel[1],
        RELU=relu,
        STRIDED_OUT=strided_out,
        **rows,
        ROW_TAPS=wgrad.row_taps,
        INPUT_PRECISION=precision,
        UPCAST_DOT=upcast_dot(dtype),
        BLOCK_X=block_x,
        BLOCK_G=block_g,
        BLOCK_M=block_m,
        **launch_options(replace(config, num_stages=wgrad.stages)),
    )
    site = compiled_launch.Site("_conv_wgrad_kernel", _conv_wgrad_kernel, grid, scalars, constants)
    partial_shape = (splits, kernel[0], kernel[1], c_x, c_g)
    reduce_site = None
    if out_layout is not None and not strided_out:
        block = 1024
        reduce_site = compiled_launch.Site(
            "_wgrad_reduce_kernel",
            _wgrad_reduce_kernel,
            (cdiv(kernel[0] * kernel[1] * c_x * c_g, block),),
            (splits, c_x, c_g, *out_strides),
            {"KH": kernel[0], "KW": kernel[1], "BLOCK": block},
        )
    return _WgradPlan(
        site, reduce_site, splits, strided_out, partial_shape, taps, programs_per_tile,
        wgrad_gradient_bytes(m, c_g, dtype, relu),
    )  # fmt: skip


def _backward_reduce(
    x_image: Tensor,
    dy_image: Tensor,
    y_image: Optional[Tensor],
    geometry: ConvGeometry,
    out_hw: tuple[int, int],
    coder: Optional[tuple[Tensor, Optional[Tensor], Tensor]],
    write_code: bool,
    batch_norm: Optional[tuple[Tensor, Tensor]],
    config: ConvConfig,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[tuple[Tensor, Tensor]]]:
    """The backward's first pass (``_pnnh_coder_bwd_kernel``): (code or None, dpre or None,
    per-tile BatchNorm sums or None). ``coder``: (W_E, b_E, W_D^T rows); ``batch_norm``: (z, batch
    mean); ``y_image``: the output, for the ReLU mask (None without an output ReLU). Images are
    [N, C, H, W] in channels_last memory; the code and dpre come back so, [N, C_B, OH, OW]."""
    config = narrow_coder_backward(config)
    n, c_in = x_image.shape[:2]
    c_out = dy_image.shape[1]
    m = n * out_hw[0] * out_hw[1]
    dtype, device = x_image.dtype, x_image.device
    dummy = placeholder(device, dtype)
    c_b = 0 if coder is None else coder[0].shape[0]
    tiles = cdiv(m, config.block_m)
    block_b = block_size(c_b, config.block_b) if coder is not None else 16
    code_shape = (n, c_b, *out_hw)
    code = image_buffer(code_shape, dtype, device) if coder is not None and write_code else None
    dpre = image_buffer(code_shape, dtype, device) if coder is not None else None
    sums = None
    if batch_norm is not None:
        sums = tuple(_output((2, tiles, c_out), torch.float32, device).unbind(0))
    encoder, encoder_bias, decoder = coder if coder is not None else (None, None, None)
    z_image, mean = batch_norm if batch_norm is not None else (None, None)

    arguments = tuple(
        dummy if tensor is None else tensor
        for tensor in (
            x_image if coder is not None else None, encoder, encoder_bias, decoder, dy_image,
            y_image, z_image, mean, code, dpre, sums[0] if sums else None,
            sums[1] if sums else None,
        )
    )  # fmt: skip
    site = _backward_reduce_site(
        tuple(x_image.shape), c_out, out_hw, c_b,
        (coder is not None, encoder_bias is not None, code is not None, batch_norm is not None,
         y_image is not None),
        dtype, input_precision(dtype, device), geometry.stride, config, block_b,
    )  # fmt: skip
    tiles_b = site.grid[1]

    def declare() -> Declared:
        gradient_bytes = tensor_bytes(dy_image) + (tensor_bytes(y_image) if y_image is not None else 0)
        x_bytes = tensor_bytes(x_image) if coder is not None else 0
        return Declared(
            reads=[
                x_image if coder is not None else None, encoder, encoder_bias, decoder, dy_image,
                y_image, z_image, mean,
            ],
            writes=[code, dpre, *(sums or ())],
            flops=2 * m * c_b * (c_in + c_out),
            # every code-channel tile re-reads the pixels' x, dy and y rows
            cached_read=(tiles_b - 1) * (x_bytes + gradient_bytes),
        )  # fmt: skip

    compiled_launch.launch(site, declare, arguments)
    return code, dpre, sums


@functools.lru_cache(maxsize=1024)
def _backward_reduce_site(
    x_shape: tuple[int, ...],
    c_out: int,
    out_hw: tuple[int, int],
    c_b: int,
    flags: tuple[bool, ...],  # has a coder, an encoder bias; writes the code; BatchNorm sums; ReLU
    dtype: torch.dtype,
    precision: str,
    stride: tuple[int, int],
    config: ConvConfig,
    block_b: int,
) -> compiled_launch.Site:
    has_coder, has_encoder_bias, write_code, batch_norm, relu = flags
    n, c_in, height, width = x_shape
    m = n * out_hw[0] * out_hw[1]
    constants = dict(
        HAS_CODER=has_coder,
        HAS_ENCODER_BIAS=has_encoder_bias,
        WRITE_CODE=write_code,
        BN_REDUCE=batch_norm,
        RELU=relu,
        INPUT_PRECISION=precision,
        UPCAST_DOT=upcast_dot(dtype),
        BLOCK_M=config.block_m,
        BLOCK_B=block_b,
        BLOCK_K=reduce_block_k(config, has_coder, batch_norm),
        **launch_options(config),
    )
    grid = (cdiv(m, config.block_m), cdiv(c_b, block_b) if has_coder else 1)
    scalars = (m, height, width, c_in, *out_hw, c_out, c_b, *stride)
    return compiled_launch.Site(
        "_pnnh_coder_bwd_kernel", _pnnh_coder_bwd_kernel, grid, scalars, constants
    )


def _coder_weight_grads(
    x_image: Tensor,
    code: Tensor,
    dpre: Tensor,
    dy_image: Tensor,
    y_image: Optional[Tensor],
    geometry: ConvGeometry,
    out_hw: tuple[int, int],
    tied: bool,
    has_encoder_bias: bool,
    config: ConvConfig,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(dW_E (both uses when tied), db_E, dW_D): dW_E^T = x_s^T @ dpre, dW_D^T = code^T @ dp."""
    one_by_one = ConvGeometry((1, 1), geometry.stride, (0, 0), (1, 1))
    encoder_t = _wgrad(x_image, dpre, None, out_hw, (1, 1), one_by_one, config)[0, 0]
    unit = ConvGeometry((1, 1), (1, 1), (0, 0), (1, 1))
    decoder_t = _wgrad(code, dy_image, y_image, out_hw, (1, 1), unit, config)[0, 0]
    encoder_grad = encoder_t.t()
    bias_grad = dpre.float().sum((0, 2, 3)) if has_encoder_bias else None
    if tied:
        return encoder_grad + decoder_t, bias_grad, None
    return encoder_grad, bias_grad, decoder_t.t()


def _input_grad(
    learner: Tensor,
    y_image: Optional[Tensor],
    scale: Optional[Tensor],
    weight: Tensor,
    dpre: Optional[Tensor],
    encoder_weight: Optional[Tensor],
    input_shape: tuple[int, ...],
    geometry: ConvGeometry,
    config: ConvConfig,
) -> Tensor:
    """dX [N, C_in, H, W] (channels_last memory) of both paths (``_pnnh_conv_dgrad_kernel``): the
    learner's transposed convolution of ``learner`` (masked by ``y_image > 0`` and scaled when
    given; training BatchNorm's dz as it is) and the coder's ``dpre @ W_E``."""
    config = input_gradient_config(
        config, y_image is not None, geometry.stride == (1, 1), scale is not None
    )
    n, c_in, height, width = input_shape
    c_out, _, kh, kw = weight.shape
    oh, ow = learner.shape[2], learner.shape[3]
    dtype, device = learner.dtype, learner.device
    m = n * oh * ow
    c_b = 0 if encoder_weight is None else encoder_weight.shape[0]
    dummy = placeholder(device, dtype)
    dx = image_buffer((n, c_in, height, width), dtype, device)
    has_coder = encoder_weight is not None
    we_in = encoder_weight.contiguous() if has_coder else None
    arguments = (
        learner, y_image if y_image is not None else dummy,
        scale if scale is not None else dummy, weight,
        dpre if has_coder else dummy, we_in if has_coder else dummy, dx,
    )  # fmt: skip
    site = _input_grad_site(
        tuple(input_shape), tuple(weight.shape), weight.stride(), (oh, ow), c_b,
        (scale is not None, y_image is not None), dtype,
        input_precision(dtype, device), geometry, config, forcing(),
    )  # fmt: skip

    def declare() -> Declared:
        tiles_m, tiles_n = cdiv(n * height * width, config.block_m), cdiv(c_in, config.block_n)
        gradient_bytes = sum(tensor_bytes(t) for t in (learner, y_image) if t is not None)
        learner_flops = 2 * n * height * width * c_in * c_out * kh * kw
        return Declared(
            reads=[
                learner, y_image, scale, weight,
                dpre if has_coder else None, we_in,
            ],
            writes=[dx],
            flops=learner_flops + (2 * m * c_b * c_in if has_coder else 0),
            cached_read=(tiles_n * kh * kw - 1) * gradient_bytes
            + (tiles_m - 1) * tensor_bytes(weight),
        )  # fmt: skip

    compiled_launch.launch(site, declare, arguments)
    return dx


@functools.lru_cache(maxsize=1024)
def _input_grad_site(
    input_shape: tuple[int, ...],
    weight_shape: tuple[int, ...],
    weight_strides: tuple[int, ...],
    out_hw: tuple[int, int],
    c_b: int,
    flags: tuple[bool, ...],  # a scale; the ReLU mask
    dtype: torch.dtype,
    precision: str,
    geometry: ConvGeometry,
    config: ConvConfig,
    fixed_tiles: bool,
) -> compiled_launch.Site:
    has_scale, relu = flags
    n, c_in, height, width = input_shape
    c_out, _, kh, kw = weight_shape
    kernel, tiles = tuned_or_fixed(_pnnh_conv_dgrad_kernel, config, dtype)
    grid = grid_of(n * height * width, c_in, config)
    scalars = (
        n * height * width, height, width, c_in, *out_hw, c_out, c_b,
        *geometry.stride, *geometry.padding, *geometry.dilation, *weight_strides,
    )  # fmt: skip
    constants = dict(
        KH=kh,
        KW=kw,
        HAS_SCALE=has_scale,
        HAS_CODER=c_b > 0,
        RELU=relu,
        UNIT_STRIDE=geometry.stride == (1, 1),
        INPUT_PRECISION=precision,
        UPCAST_DOT=upcast_dot(dtype),
        **tiles,
    )
    return compiled_launch.Site("_pnnh_conv_dgrad_kernel", kernel, grid, scalars, constants)


def conv_backward(
    grad_output: Tensor,
    x: Tensor,
    y: Tensor,
    weight: Tensor,
    scale: Optional[Tensor],
    encoder_weight: Optional[Tensor],
    encoder_bias: Optional[Tensor],
    decoder_weight: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    relu: bool,
    coder_grads: bool = True,
    *,
    op_outputs: bool = True,
) -> Any:
    """All gradients of the fused op from x, the output y (its ReLU mask) and the weights.

    The code is recomputed from x into [M, C_B] scratch buffers that die with this call. The
    learner's weight gradient comes back *unscaled* (``dp``, not ``dp * scale``): the caller turns it
    into the weight's and the scale's gradients, which avoids dividing by a scale that may be zero.
    ``coder_grads=False`` (a fixed coder): the coder's weight gradients are not computed.
    """
    geometry = op_geometry(weight, stride, padding, dilation)
    c_in = x.shape[1]
    c_out, _, kh, kw = weight.shape
    oh, ow = y.shape[2], y.shape[3]
    c_b = 0 if encoder_weight is None else encoder_weight.shape[0]
    config = choose_config(c_in, c_out, c_b, x.dtype, x.shape[0] * oh * ow, x.device)
    x_image, y_image = channels_last(x), channels_last(y)
    dy_image = channels_last(in_dtype(grad_output, x.dtype))
    mask = y_image if relu else None
    coder = None
    code = dpre = None
    if encoder_weight is not None:
        coder = (encoder_weight.contiguous(), encoder_bias, decoder_rows(encoder_weight, decoder_weight))
        code, dpre, _ = _backward_reduce(
            x_image, dy_image, mask, geometry, (oh, ow), coder, coder_grads, None, config
        )
    grads_coder: tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]] = (None, None, None)
    if coder is not None and coder_grads:
        grads_coder = _coder_weight_grads(
            x_image, code, dpre, dy_image, mask, geometry, (oh, ow), decoder_weight is None,
            encoder_bias is not None, config,
        )  # fmt: skip
    dx = _input_grad(
        dy_image, y_image if relu else None, scale, weight, dpre, encoder_weight, tuple(x.shape),
        geometry, config,
    )  # fmt: skip
    weight_unscaled = _wgrad(x_image, dy_image, mask, (oh, ow), (kh, kw), geometry, config)
    masked = torch.where(y_image <= 0, 0, dy_image) if relu else dy_image  # NaN y passes dy
    grads = ConvGradients(dx, weight_unscaled, masked.float().sum((0, 2, 3)), *grads_coder)
    return grads.op_outputs(x) if op_outputs else grads


@functools.lru_cache(maxsize=1024)
def _finalize_backward_site(
    tiles: int, channels: int, pixels: int, weight: bool, bias: bool, block_c: int
) -> compiled_launch.Site:
    return compiled_launch.Site(
        "_bn_finalize_backward_kernel",
        _bn_finalize_backward_kernel,
        (cdiv(channels, block_c),),
        (tiles, channels, pixels),
        {"HAS_WEIGHT": weight, "HAS_BIAS": bias, "BLOCK_T": 32, "BLOCK_C": block_c},
    )


def _batch_norm_dz(
    dy_image: Tensor, mask: Optional[Tensor], z_image: Tensor, coefficients: Tensor
) -> Tensor:
    """Training BatchNorm's dz [N, C, OH, OW] (channels_last memory) from dy, the ReLU mask's y
    (None: no output ReLU), z and the finalize kernel's coefficients."""
    n, c, oh, ow = dy_image.shape
    dz = image_buffer((n, c, oh, ow), dy_image.dtype, dy_image.device)
    m = n * oh * ow
    if m == 0:
        return dz
    arguments = (
        dy_image, mask if mask is not None else placeholder(dy_image.device, dy_image.dtype),
        z_image, coefficients, dz,
    )  # fmt: skip
    compiled_launch.launch(
        _dz_site(m, c, mask is not None, 64 if availability._INTERPRETER else 32, _channel_block(c)),
        lambda: Declared(reads=[dy_image, mask, z_image, coefficients], writes=[dz], flops=4 * m * c),
        arguments,
    )
    return dz


@functools.lru_cache(maxsize=1024)
def _dz_site(pixels: int, channels: int, relu: bool, block_m: int, block_c: int) -> compiled_launch.Site:
    return compiled_launch.Site(
        "_bn_dz_kernel",
        _bn_dz_kernel,
        (cdiv(pixels, block_m), cdiv(channels, block_c)),
        (pixels, channels),
        {"RELU": relu, "BLOCK_M": block_m, "BLOCK_C": block_c},
    )


def clear_sites() -> None:
    """Forget every launch site (the stub launch path: its sites hold stand-in autotuners)."""
    for site_builder in (
        _forward_site, _finalize_forward_site, _running_update_site, _wgrad_plan,
        _backward_reduce_site, _input_grad_site, _finalize_backward_site, _dz_site,
        _channel_block_for,
    ):  # fmt: skip
        site_builder.cache_clear()


def conv_backward_train(
    grad_output: Tensor,
    x: Tensor,
    y: Tensor,
    z: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    encoder_weight: Optional[Tensor],
    encoder_bias: Optional[Tensor],
    decoder_weight: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    relu: bool,
    coder_grads: bool = True,
    *,
    op_outputs: bool = True,
) -> Any:
    """All gradients of the training-mode op (BatchNorm on the learner branch with batch
    statistics; ``z``, ``mean``, ``rstd`` saved by the forward).

    Five passes: (1) one over dy, y, z (and x for the coder) that writes the coder's dpre and the
    per-tile sums BatchNorm needs; (2) the sums finished into the gradients of gamma and beta and
    the coefficients of dz = a * dp + b * z + c; (3) dz stored, from dy, y and z; (4) dX of both
    paths from dpre and dz; (5) dW from x and dz (one more launch when the weight gradient is
    split). Plus, for a trainable coder only, its weight gradients.
    """
    geometry = op_geometry(weight, stride, padding, dilation)
    n, c_in = x.shape[:2]
    c_out, _, kh, kw = weight.shape
    oh, ow = y.shape[2], y.shape[3]
    m = n * oh * ow
    c_b = 0 if encoder_weight is None else encoder_weight.shape[0]
    config = choose_config(c_in, c_out, c_b, x.dtype, m, x.device)
    x_image, y_image, z_image = channels_last(x), channels_last(y), channels_last(z)
    dy_image = channels_last(in_dtype(grad_output, x.dtype))
    mask = y_image if relu else None
    coder = None
    if encoder_weight is not None:
        coder = (encoder_weight.contiguous(), encoder_bias, decoder_rows(encoder_weight, decoder_weight))
    code, dpre, sums = _backward_reduce(
        x_image, dy_image, mask, geometry, (oh, ow), coder, coder_grads, (z_image, mean), config
    )
    assert sums is not None
    grad_norm_weight = (
        _output((c_out,), norm_weight.dtype, x.device) if norm_weight is not None else None
    )
    grad_norm_bias = _output((c_out,), norm_bias.dtype, x.device) if norm_bias is not None else None
    coefficients = _output((3, c_out), torch.float32, x.device)
    # The learner bias's gradient (4 bytes a channel; the op returns it whether or not there is one).
    grad_learner_bias = _output((c_out,), torch.float32, x.device)
    dummy = placeholder(x.device, torch.float32)
    block_c = _channel_block(c_out)
    arguments = (
        *sums, mean, rstd, norm_weight if norm_weight is not None else dummy,
        grad_norm_weight if grad_norm_weight is not None else dummy,
        grad_norm_bias if grad_norm_bias is not None else dummy,
        coefficients, grad_learner_bias,
    )  # fmt: skip
    site = _finalize_backward_site(
        sums[0].shape[0], c_out, m, norm_weight is not None, norm_bias is not None, block_c
    )
    compiled_launch.launch(
        site,
        lambda: Declared(
            reads=[*sums, mean, rstd, norm_weight],
            writes=[grad_norm_weight, grad_norm_bias, coefficients, grad_learner_bias],
            flops=4 * sums[0].numel(),
        ),
        arguments,
    )
    grads_coder: tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]] = (None, None, None)
    if coder is not None and coder_grads:
        grads_coder = _coder_weight_grads(
            x_image, code, dpre, dy_image, mask, geometry, (oh, ow), decoder_weight is None,
            encoder_bias is not None, config,
        )  # fmt: skip
    # dz = a * dp + b * z + c stored once: the two gradient kernels then load one tile per tap
    # (dz) where forming it on load had them load three (dy, y, z); the same DRAM bytes, a third of
    # the L2 bytes per tap (their mainloops are L2-bound: docs/kernels.md, the static model).
    dz = _batch_norm_dz(dy_image, mask, z_image, coefficients)
    dx = _input_grad(
        dz, None, None, weight, dpre, encoder_weight, tuple(x.shape), geometry, config
    )  # fmt: skip
    weight_grad = _wgrad(
        x_image, dz, None, (oh, ow), (kh, kw), geometry, config, out=output_like(weight)
    )  # fmt: skip
    grads = TrainingGradients(
        dx,
        weight_grad,
        grad_norm_weight,
        grad_norm_bias,
        *grads_coder,
        learner_bias=grad_learner_bias,
    )
    return grads.op_outputs(x) if op_outputs else grads
