"""Launchers of the CUDA kernels: check, lay out, allocate, launch. No autograd here (the shared
ops in pnnh_kernels.ops.pnnh_conv have these as their implementations, as they have the Triton
launchers).

Tensors arrive as NCHW tensors (any layout; channels_last avoids a copy) and leave as NCHW views of
NHWC memory. The kernels take raw device pointers, so everything they read is made contiguous in the
layout they expect here, and every argument is checked before a pointer is handed over: a wrong
device, dtype or shape raises ValueError naming the argument, never an illegal memory access.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import weakref
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, Optional

import torch
from torch import Tensor

from pnnh_kernels.backends.fused_common import (
    ConvGradients,
    TrainingForward,
    TrainingGradients,
    TrainingNorm,
    capped_wgrad_splits,
    channels_last,
    decoder_rows,
    image_buffer,
    in_dtype,
    output_buffer,
    output_like,
)
from pnnh_kernels.conv_geometry import ConvGeometry, op_geometry
from pnnh_kernels.cuda.availability import SUPPORTED_DTYPES, extension, unavailable_reason
from pnnh_kernels.observer import Declared, launch, modelling, tensor_bytes

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
    extension's, or on a machine without one the constants of the kernels' headers that every
    install carries (:func:`declared_tiles`: no compiler, no pybind11)."""
    if _emulator is not None:
        return _emulator
    if x is not None and modelling(x) and extension() is None:
        return declared_tiles()
    module = extension()
    if module is None:
        raise RuntimeError(unavailable_reason(torch.device("cuda"), torch.float32, "conv2d"))
    return module


class DeclaredTiles:
    """What the launchers read from the extension when they only declare launches (meta tensors):
    the tile constants of csrc/pnnh_common.cuh and csrc/pnnh_kernels.h, and shapes that hold their
    sizes. Its kernel entry points refuse to run: nothing launches on meta tensors."""

    def __init__(self) -> None:
        constants = header_constants()
        self._sizes = {
            "block_m": constants["kBlockM"],
            "block_n": constants["kBlockN"],
            "block_k": constants["kBlockK"],
            "max_grid_yz": constants["kMaxGridYZ"],
        }

    def tile_sizes(self) -> dict[str, int]:
        return dict(self._sizes)

    def tile_rows(self) -> int:
        return self._sizes["block_m"]  # csrc/pnnh_backward.cu: tile_rows() is kBlockM

    class ConvShape:
        def __init__(self, *sizes: int) -> None:
            self.sizes = sizes

    def __getattr__(self, name: str) -> Callable[..., None]:  # a kernel entry point
        if name not in ENTRY_POINTS:
            raise AttributeError(name)

        def refuse(*args: Any) -> None:
            raise RuntimeError(f"{name}: the CUDA extension is not built; meta tensors launch nothing")

        return refuse


# The extension's kernel entry points the launchers hand to a launch (declared on meta tensors).
ENTRY_POINTS = frozenset(
    ("forward", "dgrad", "wgrad", "wgrad_reduce", "coder_backward", "bn_finalize_forward",
     "bn_running_update", "bn_backward_reduce", "bn_finalize_backward")
)  # fmt: skip


@functools.lru_cache(maxsize=1)
def declared_tiles() -> DeclaredTiles:
    return DeclaredTiles()


@functools.lru_cache(maxsize=1)
def header_constants() -> dict[str, int]:
    """The ``constexpr int k...`` tile constants of the installed CUDA headers."""
    from pnnh_kernels.cuda.build import source_dir

    constants: dict[str, int] = {}
    for header in ("csrc/pnnh_common.cuh", "csrc/pnnh_kernels.h"):
        path = source_dir() / header
        for match in re.finditer(r"constexpr int (k\w+) = (\d+);", path.read_text()):
            constants[match.group(1)] = int(match.group(2))
    missing = {"kBlockM", "kBlockN", "kBlockK", "kMaxGridYZ"} - set(constants)
    if missing:
        raise RuntimeError(f"{source_dir() / 'csrc'}: no constants {sorted(missing)} in the headers")
    return constants


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


def _pointers(*tensors: Optional[Tensor]) -> list[int]:
    """The tensors' device addresses (0 for None) in one call: a launch passes up to 13."""
    return [0 if tensor is None else tensor.data_ptr() for tensor in tensors]


def _stream(device: torch.device) -> int:
    if _emulator is not None or device.type == "meta":
        return 0
    return torch.cuda.current_stream(device).cuda_stream


def _float_vector(tensor: Optional[Tensor]) -> Optional[Tensor]:
    return None if tensor is None else in_dtype(tensor, torch.float32).contiguous()


def _weight_rows(weight: Tensor) -> Tensor:
    """[C_out, KH, KW, C_in] storage: a channels_last weight's own memory (no copy, no view)."""
    return channels_last(weight)


# Layouts of a fixed (requires_grad=False) coder's tensors that the kernels need, made once per
# tensor version instead of once per call: a fixed coder never changes, so its transposes and casts
# cost nothing per step. A tensor that requires grad changes every step and is not cached.
_fixed_layouts: dict[int, tuple[weakref.ref, dict]] = {}  # id(tensor) -> (its weakref, layouts)


def _fixed_layout(
    tensor: Optional[Tensor], kind: str, make: Callable[[Tensor], Tensor]
) -> Optional[Tensor]:
    if tensor is None:
        return None
    if tensor.requires_grad or tensor.is_inference():  # inference tensors have no version counter
        return make(tensor)
    key = id(tensor)
    entry = _fixed_layouts.get(key)
    if entry is None or entry[0]() is not tensor:
        # Keyed by identity (a tensor's == is elementwise); dropped when the tensor dies.
        entry = (weakref.ref(tensor, lambda _, key=key: _fixed_layouts.pop(key, None)), {})
        _fixed_layouts[key] = entry
    layouts = entry[1]
    # Module.to() and .data assignments keep a parameter's id and version but change its storage,
    # dtype or device: all are part of the key.
    version = (kind, tensor._version, tensor.data_ptr(), tensor.dtype, tensor.device, tensor.shape)
    if version not in layouts:
        for stale in [k for k in layouts if k[0] == kind]:
            del layouts[stale]
        layouts[version] = make(tensor.detach())
    return layouts[version]


def _encoder_bias_rows(encoder_bias: Optional[Tensor]) -> Optional[Tensor]:
    return _fixed_layout(encoder_bias, "float", lambda t: t.float().contiguous())


def _transposed(tensor: Tensor) -> Tensor:
    result = _fixed_layout(tensor, "transposed", lambda t: t.t().contiguous())
    assert result is not None
    return result


def _shape(module: ModuleType, x: Tensor, weight: Tensor, geometry: ConvGeometry):
    """The kernels' ConvShape of a call, made once per module (extension or emulation) and shape:
    a ConvShape is never changed after it is made, and building one crosses pybind11 with 16 ints."""
    return _conv_shape(module, tuple(x.shape), tuple(weight.shape), geometry)


@functools.lru_cache(maxsize=1024)
def _conv_shape(
    module: ModuleType, x_shape: tuple[int, ...], weight_shape: tuple[int, ...], geometry: ConvGeometry
):
    n, c_in, height, width = x_shape
    c_out, _, kh, kw = weight_shape
    oh, ow = geometry.output_size(height, width)
    return module.ConvShape(
        n, height, width, c_in, oh, ow, c_out, kh, kw,
        *geometry.stride, *geometry.padding, *geometry.dilation,
    )  # fmt: skip


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
    code: Optional[Tensor] = None,
) -> None:
    """One launch of the forward kernel. ``code`` (training BatchNorm with a coder): the statistics
    pass stores the code there once per pixel tile, and the apply pass reads it instead of
    recomputing it from x."""
    module = _module(x)
    c_out = weight.shape[0]
    c_in, kh, kw = weight.shape[1], weight.shape[2], weight.shape[3]
    c_b = 0 if encoder_weight is None else encoder_weight.shape[0]
    if mode == APPLY and c_b and code is None:
        raise ValueError("code: the apply pass of a layer with a coder reads the statistics pass's code")
    # The encoder runs in the fused pass and in the statistics pass (which stores the code).
    encodes = c_b > 0 and (mode == FUSED or (mode == STATISTICS and code is not None))
    decodes = c_b > 0 and mode != STATISTICS
    reads_x = mode != APPLY
    x_rows = channels_last(x) if reads_x else None
    # [C_out, KH, KW, C_in] (a no-op for a channels_last weight); no weight in the apply pass.
    weight_rows = _weight_rows(weight) if mode != APPLY else None
    scale_f, shift_f = _float_vector(scale), _float_vector(shift)
    for name, vector in (("scale", scale_f), ("shift", shift_f)):
        _check(name, vector, x.device, torch.float32, (c_out,))
    encoder = encoder_weight.contiguous() if encodes else None
    encoder_bias_f = _encoder_bias_rows(encoder_bias) if encodes else None
    # The decoder as [C_out, C_B] rows: W_E^T for a tied coder (made once for a fixed coder).
    decoder = None
    if decodes:
        decoder = _transposed(encoder_weight) if decoder_weight is None else decoder_weight.contiguous()
    shape = _shape(module, x, weight, geometry)
    arguments = (
        shape, c_b if (encodes or decodes) else 0, mode, relu, DTYPE_CODES[x.dtype], *_pointers(
            x_rows, weight_rows, scale_f, shift_f, encoder, encoder_bias_f, decoder, y, z,
            partials[0] if partials else None, partials[1] if partials else None,
            code if c_b else None,
        ),
        _stream(x.device),
    )  # fmt: skip

    def declare() -> Declared:
        sizes = module.tile_sizes()
        oh, ow = geometry.output_size(x.shape[2], x.shape[3])
        m = x.shape[0] * oh * ow
        tiles_m, tiles_n = math.ceil(m / sizes["block_m"]), math.ceil(c_out / sizes["block_n"])
        flops = 0 if mode == APPLY else 2 * m * c_out * c_in * kh * kw
        if encodes:  # the fused pass's every output-channel tile recomputes the code; statistics once
            flops += 2 * m * c_b * c_in * (1 if mode == STATISTICS else tiles_n)
        if decodes:
            flops += 2 * m * c_b * c_out
        cached = 0
        if mode != APPLY:  # every channel tile re-reads x per tap; every pixel tile the weight
            cached += (tiles_n * kh * kw - 1) * tensor_bytes(x_rows)
            cached += (tiles_m - 1) * tensor_bytes(weight_rows)
        return Declared(
            reads=[
                x_rows, weight_rows, scale_f, shift_f, encoder, encoder_bias_f, decoder,
                z if mode == APPLY else None, code if mode == APPLY and c_b else None,
            ],
            writes=[
                y, z if mode == STATISTICS else None, *(partials or ()),
                code if mode == STATISTICS and encodes else None,
            ],
            flops=flops,
            cached_read=cached,
        )  # fmt: skip

    launch(_FORWARD_NAMES[mode], "cuda", module.forward, arguments, declare)


_FORWARD_NAMES = {
    FUSED: "pnnh_conv_forward_kernel (fused)",
    STATISTICS: "pnnh_conv_forward_kernel (statistics)",
    APPLY: "pnnh_conv_forward_kernel (apply)",
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
    _check_call(x, weight, encoder_weight, encoder_bias, decoder_weight)
    n, _, height, width = x.shape
    c_out = weight.shape[0]
    oh, ow = geometry.output_size(height, width)
    y = image_buffer((n, c_out, oh, ow), x.dtype, x.device)
    if y.numel():
        _launch_forward(
            x, weight, scale, shift, encoder_weight, encoder_bias, decoder_weight, geometry, relu,
            mode=FUSED, y=y,
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
    """Training-mode BatchNorm in three launches: convolution + per-tile statistics (mean, M2 per
    64-pixel tile), their merge into mean, variance, rstd, scale and shift, then normalisation +
    coder + activation from z. The running statistics are the caller's (update_running_statistics)."""
    geometry = op_geometry(weight, stride, padding, dilation)
    norm = TrainingNorm(norm_weight, norm_bias, eps)
    _check_call(x, weight, encoder_weight, encoder_bias, decoder_weight)
    module = _module(x)
    n, _, height, width = x.shape
    c_out = weight.shape[0]
    oh, ow = geometry.output_size(height, width)
    m = n * oh * ow
    rows = module.tile_rows()
    tiles = math.ceil(m / rows)
    z = image_buffer((n, c_out, oh, ow), x.dtype, x.device)
    # One allocation for both per-tile partials (each allocation is a host cost of its own).
    partials = tuple(output_buffer((2, tiles, c_out), torch.float32, x.device).unbind(0))
    c_b = 0 if encoder_weight is None else encoder_weight.shape[0]
    code = image_buffer((n, c_b, oh, ow), x.dtype, x.device) if c_b else None
    _launch_forward(
        x, weight, None, bias, encoder_weight, encoder_bias, None, geometry, False,
        mode=STATISTICS, z=z, partials=partials, code=code,
    )  # fmt: skip
    # mean, variance and rstd leave the op (outputs of an op may not share memory); scale and shift
    # are the apply pass's and share one allocation.
    mean, variance, rstd = (output_buffer((c_out,), torch.float32, x.device) for _ in range(3))
    scale, shift = output_buffer((2, c_out), torch.float32, x.device).unbind(0)
    param_dtype = _param_dtype(norm.weight, norm.bias)
    arguments = (
        tiles, c_out, rows, m, norm.eps, DTYPE_CODES[param_dtype],
        *_pointers(*partials, norm.weight, norm.bias, mean, variance, rstd, scale, shift),
        _stream(x.device),
    )  # fmt: skip
    launch(
        "bn_finalize_forward_kernel",
        "cuda",
        module.bn_finalize_forward,
        arguments,
        lambda: Declared(
            reads=[*partials, norm.weight, norm.bias],
            writes=[mean, variance, rstd, scale, shift],
            flops=8 * tiles * c_out,
        ),
    )
    y = image_buffer((n, c_out, oh, ow), x.dtype, x.device)
    _launch_forward(
        x, weight, scale, shift, encoder_weight, encoder_bias, decoder_weight, geometry, relu,
        mode=APPLY, y=y, z=z, code=code,
    )  # fmt: skip
    return TrainingForward(y, z, mean, variance, rstd)


def _param_dtype(weight: Optional[Tensor], bias: Optional[Tensor]) -> torch.dtype:
    """The dtype of BatchNorm's gamma and beta (float32 where there are none): one dtype, which the
    kernels are compiled for."""
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise ValueError(
            f"norm_bias: expected BatchNorm's bias in its weight's dtype {weight.dtype}, "
            f"got {bias.dtype}"
        )
    for tensor in (weight, bias):
        if tensor is not None:
            return tensor.dtype
    return torch.float32


def update_running_statistics(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, variance: Tensor, momentum: float,
    pixels: int,
) -> None:  # fmt: skip
    """nn.BatchNorm2d's running-statistics update, in place, in one launch."""
    # What an ADInplaceOrView kernel does for an in-place op: a saved copy sees the change.
    torch.autograd.graph.increment_version((running_mean, running_var))
    _check(
        "running_var", running_var, running_mean.device, running_mean.dtype, tuple(running_mean.shape)
    )
    module = _module(running_mean)
    channels = running_mean.shape[0]
    arguments = (
        channels, momentum, pixels / (pixels - 1), DTYPE_CODES[running_mean.dtype],
        *_pointers(running_mean, running_var, mean, variance),
        _stream(running_mean.device),
    )  # fmt: skip
    launch(
        "bn_running_update_kernel",
        "cuda",
        module.bn_running_update,
        arguments,
        lambda: Declared(
            reads=[running_mean, running_var, mean, variance],
            writes=[running_mean, running_var],
            flops=6 * channels,
        ),
    )


def _wgrad(
    module: ModuleType,
    image: Tensor,
    grad: Tensor,
    out_hw: tuple[int, int],
    kernel: tuple[int, int],
    geometry: ConvGeometry,
    out: Optional[Tensor] = None,
    batch_norm: Optional[tuple[Tensor, Tensor]] = None,
) -> Tensor:
    """The weight gradient, sum over output pixels of image_tap^T @ grad, from per-split partial sums
    added in a fixed order (deterministic): into ``out`` (shaped as the weight [C_g, C_x, KH, KW], any
    strides, the image's dtype) when given, else as a new ``[KH, KW, C_x, C_g]`` float32 tensor.
    ``image`` [N, C_x, H, W] and ``grad`` [N, C_g, OH, OW] in channels_last memory (NHWC storage).
    ``batch_norm`` = (z, coefficients): grad is dp, turned into training BatchNorm's dz on load."""
    n, c_x, height, width = image.shape
    c_g = grad.shape[1]
    m = n * out_hw[0] * out_hw[1]
    if m == 0:
        zeros = torch.zeros((*kernel, c_x, c_g), dtype=torch.float32, device=image.device)
        return zeros if out is None else out.copy_(zeros.permute(3, 2, 0, 1))
    taps = kernel[0] * kernel[1]
    sizes = module.tile_sizes()  # image channels x gradient channels per CTA, pixels per step
    tiles = math.ceil(c_x / sizes["block_m"]) * math.ceil(c_g / sizes["block_n"]) * taps
    # Enough CTAs to fill the GPU, each still reducing at least WGRAD_MIN_STEPS steps of pixels, and
    # no more splits than grid.z holds.
    steps = math.ceil(m / (WGRAD_MIN_STEPS * sizes["block_k"]))
    splits = max(1, min(math.ceil(WGRAD_TARGET_CTAS / tiles), steps, sizes["max_grid_yz"] // taps))
    if out is not None:
        splits = capped_wgrad_splits(splits, tensor_bytes(grad), taps, c_x, c_g)
    per_split = math.ceil(math.ceil(m / splits) / sizes["block_k"]) * sizes["block_k"]
    splits = math.ceil(m / per_split)
    direct = out is not None and splits == 1
    partial = None if direct else output_buffer((splits, *kernel, c_x, c_g), torch.float32, image.device)
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
    out_strides = list(out.stride()) if out is not None else [0, 0, 0, 0]
    learner, coefficients = batch_norm if batch_norm is not None else (None, None)
    arguments = (
        shape, c_g, per_split, splits, DTYPE_CODES[image.dtype],
        *_pointers(image, grad, partial, out if direct else None), out_strides,
        *_pointers(learner, coefficients), _stream(image.device),
    )  # fmt: skip
    tiles_x, tiles_g = math.ceil(c_x / sizes["block_m"]), math.ceil(c_g / sizes["block_n"])
    launch(
        "pnnh_conv_wgrad_kernel",
        "cuda",
        module.wgrad,
        arguments,
        lambda: Declared(
            reads=[image, grad, learner, coefficients],
            writes=[out if direct else partial],
            flops=2 * m * c_x * c_g * taps,
            # every (image tile, gradient tile, tap) CTA reads its rows of both
            cached_read=(tiles_g * taps - 1) * tensor_bytes(image)
            + (tiles_x * taps - 1) * tensor_bytes(grad),
        ),
    )
    if out is None:
        assert partial is not None
        return partial.sum(0) if splits > 1 else partial[0]
    if not direct:
        reduce_arguments = (
            splits, *kernel, c_x, c_g, DTYPE_CODES[out.dtype], *_pointers(partial, out),
            out_strides, _stream(image.device),
        )  # fmt: skip
        launch(
            "wgrad_reduce_kernel",
            "cuda",
            module.wgrad_reduce,
            reduce_arguments,
            lambda: Declared(reads=[partial], writes=[out], flops=partial.numel()),
        )
    return out


def _coder_backward(
    module: ModuleType,
    shape: Any,
    x_rows: Tensor,
    dp: Tensor,
    encoder_weight: Tensor,
    encoder_bias: Optional[Tensor],
    decoder_weight: Optional[Tensor],
    geometry: ConvGeometry,
    out_hw: tuple[int, int],
    coder_grads: bool,
) -> tuple[Tensor, Optional[Tensor], tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]]:
    """(grad_pre, code or None, (dW_E, db_E, dW_D)): the coder's recomputed code and pre-activation
    gradient from x and the masked dp; its weight gradients only with ``coder_grads``."""
    n, c_out, oh, ow = dp.shape
    c_b, c_in = encoder_weight.shape
    dtype, device = x_rows.dtype, x_rows.device
    encoder = encoder_weight.contiguous()
    code = image_buffer((n, c_b, oh, ow), dtype, device) if coder_grads else None
    grad_pre = image_buffer((n, c_b, oh, ow), dtype, device)
    # Bound to names so that they outlive the launch: a temporary freed before the call returns
    # could hand its memory to the next allocation while its pointer is in flight.
    encoder_bias_f = _encoder_bias_rows(encoder_bias)
    decoder_t = decoder_rows(encoder_weight, decoder_weight)  # [C_B, C_out]
    arguments = (
        shape, c_b, DTYPE_CODES[dtype],
        *_pointers(x_rows, encoder, encoder_bias_f, decoder_t, dp, code, grad_pre), _stream(device),
    )  # fmt: skip
    launch(
        "pnnh_coder_backward_kernel",
        "cuda",
        module.coder_backward,
        arguments,
        lambda: Declared(
            reads=[x_rows, encoder, encoder_bias_f, decoder_t, dp],
            writes=[code, grad_pre],
            flops=2 * n * oh * ow * c_b * (c_in + c_out),
        ),
    )
    if not coder_grads:
        return grad_pre, None, (None, None, None)
    assert code is not None
    strided = ConvGeometry((1, 1), geometry.stride, (0, 0), (1, 1))
    unit = ConvGeometry((1, 1), (1, 1), (0, 0), (1, 1))
    encoder_grad = _wgrad(module, x_rows, grad_pre, out_hw, (1, 1), strided)[0, 0].t()
    decoder_grad_t = _wgrad(module, code, dp, out_hw, (1, 1), unit)[0, 0]
    bias_grad = grad_pre.float().sum((0, 2, 3)) if encoder_bias is not None else None
    if decoder_weight is None:
        return grad_pre, code, (encoder_grad + decoder_grad_t, bias_grad, None)
    return grad_pre, code, (encoder_grad, bias_grad, decoder_grad_t.t())


def _dgrad(
    module: ModuleType,
    shape: Any,
    c_b: int,
    grad: Tensor,
    weight: Tensor,
    grad_pre: Optional[Tensor],
    encoder_t_rows: Optional[Tensor],
    dx: Tensor,
    batch_norm: Optional[tuple[Tensor, Tensor]] = None,
) -> None:
    """dX [N, H, W, C_in] into ``dx``: the learner's transposed convolution of ``grad`` (NHWC; with
    ``batch_norm`` = (z, coefficients) training BatchNorm's dz, formed as grad is loaded) and the
    coder's ``grad_pre @ W_E``. The kernel reads the weight as the forward does, [C_out, KH, KW,
    C_in] (a channels_last weight as it is: no copy)."""
    if dx.numel() == 0:
        return
    n, c_in, height, width = dx.shape
    c_out, _, kh, kw = weight.shape
    oh, ow = grad.shape[2], grad.shape[3]
    weight_rows = _weight_rows(weight)
    learner, coefficients = batch_norm if batch_norm is not None else (None, None)
    arguments = (
        shape, c_b, DTYPE_CODES[dx.dtype],
        *_pointers(grad, weight_rows, grad_pre, encoder_t_rows, dx, learner, coefficients),
        _stream(dx.device),
    )  # fmt: skip
    sizes = module.tile_sizes()
    tiles_m = math.ceil(n * height * width / sizes["block_m"])
    tiles_n = math.ceil(c_in / sizes["block_n"])
    gradient_bytes = tensor_bytes(grad) + (tensor_bytes(learner) if learner is not None else 0)
    launch(
        "pnnh_conv_dgrad_kernel",
        "cuda",
        module.dgrad,
        arguments,
        lambda: Declared(
            reads=[grad, weight_rows, grad_pre, encoder_t_rows, learner, coefficients],
            writes=[dx],
            flops=2 * n * height * width * c_in * c_out * kh * kw + 2 * n * oh * ow * c_b * c_in,
            cached_read=(tiles_n * kh * kw - 1) * gradient_bytes
            + (tiles_m - 1) * tensor_bytes(weight_rows),
        ),
    )


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
    """All gradients of the fused op (the same contract as the Triton backend's conv_backward: the
    learner's weight gradient unscaled; ``coder_grads=False`` skips the coder's weight gradients)."""
    geometry = op_geometry(weight, stride, padding, dilation)
    _check_call(x, weight, encoder_weight, encoder_bias, decoder_weight)
    _check("grad_output", grad_output, x.device, None, tuple(y.shape))
    module = _module(x)
    n, c_in, height, width = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    oh, ow = y.shape[2], y.shape[3]
    x_rows = channels_last(x)
    dy = channels_last(in_dtype(grad_output, x.dtype))
    # The output ReLU's mask, applied once here (the Triton kernels apply it while loading).
    # y <= 0, not y > 0: a NaN y passes its gradient on, as PyTorch's ReLU backward.
    dp = channels_last(torch.where(y <= 0, 0, dy)) if relu else dy
    learner_for_input = dp
    if scale is not None:
        learner_for_input = channels_last((dp.float() * scale.view(-1, 1, 1)).to(x.dtype))
    shape = _shape(module, x, weight, geometry)
    grads_coder: tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]] = (None, None, None)
    grad_pre = encoder_t_rows = None
    c_b = 0
    if encoder_weight is not None:
        c_b = encoder_weight.shape[0]
        grad_pre, _, grads_coder = _coder_backward(
            module, shape, x_rows, dp, encoder_weight, encoder_bias, decoder_weight, geometry,
            (oh, ow), coder_grads,
        )  # fmt: skip
        encoder_t_rows = _transposed(encoder_weight)  # [C_in, C_B]
    dx = image_buffer((n, c_in, height, width), x.dtype, x.device)
    _dgrad(module, shape, c_b, learner_for_input, weight, grad_pre, encoder_t_rows, dx)
    weight_unscaled = _wgrad(module, x_rows, dp, (oh, ow), (kh, kw), geometry)
    grads = ConvGradients(dx, weight_unscaled, dp.float().sum((0, 2, 3)), *grads_coder)
    return grads.op_outputs(x) if op_outputs else grads


def _batch_norm_backward(
    module: ModuleType,
    dy: Tensor,
    mask: Optional[Tensor],
    z_rows: Tensor,
    mean: Tensor,
    rstd: Tensor,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    relu: bool,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Tensor, Tensor]:
    """Training BatchNorm's backward reductions in two launches: (dp or None, d gamma, d beta, the
    coefficients of dz = a * dp + b * z + c, d b_L)."""
    n, c_out, oh, ow = dy.shape
    m = n * oh * ow
    dtype_code = DTYPE_CODES[dy.dtype]
    stream = _stream(dy.device)
    rows = module.tile_rows()
    tiles = math.ceil(m / rows)
    sums = tuple(output_buffer((2, tiles, c_out), torch.float32, dy.device).unbind(0))
    # dp = dy * (y > 0), written once: the coder and the two gradient kernels read it (without an
    # output ReLU dp is dy itself).
    dp = image_buffer((n, c_out, oh, ow), dy.dtype, dy.device) if relu else None
    reduce_arguments = (
        m, c_out, rows, dtype_code, *_pointers(dy, mask, z_rows, mean, *sums, dp),
        stream,
    )  # fmt: skip
    launch(
        "bn_backward_reduce_kernel",
        "cuda",
        module.bn_backward_reduce,
        reduce_arguments,
        lambda: Declared(reads=[dy, mask, z_rows, mean], writes=[*sums, dp], flops=4 * m * c_out),
    )
    grad_norm_weight = (
        output_buffer((c_out,), norm_weight.dtype, dy.device) if norm_weight is not None else None
    )
    grad_norm_bias = (
        output_buffer((c_out,), norm_bias.dtype, dy.device) if norm_bias is not None else None
    )
    coefficients = output_buffer((3, c_out), torch.float32, dy.device)
    # The learner bias's gradient (4 bytes a channel; the op returns it whether or not there is one).
    grad_learner_bias = output_buffer((c_out,), torch.float32, dy.device)
    finalize_arguments = (
        tiles, c_out, m, DTYPE_CODES[_param_dtype(norm_weight, norm_bias)],
        *_pointers(
            *sums, mean, rstd, norm_weight, grad_norm_weight, grad_norm_bias, coefficients,
            grad_learner_bias,
        ),
        stream,
    )  # fmt: skip
    launch(
        "bn_finalize_backward_kernel",
        "cuda",
        module.bn_finalize_backward,
        finalize_arguments,
        lambda: Declared(
            reads=[*sums, mean, rstd, norm_weight],
            writes=[grad_norm_weight, grad_norm_bias, coefficients, grad_learner_bias],
            flops=4 * tiles * c_out,
        ),
    )
    return dp, grad_norm_weight, grad_norm_bias, coefficients, grad_learner_bias


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
    """All gradients of the training-mode op (``z``, ``mean``, ``rstd`` saved by the forward).

    (1) One pass over dy, y and z: the per-tile sums BatchNorm needs, and dp written once;
    (2) the sums finished into the gradients of gamma and beta and the coefficients of
    dz = a * dp + b * z + c; (3) the coder's dpre from x and dp; (4) dX of both paths and (5) dW
    into the weight's own layout and dtype, both forming dz from dp and z as they load them. For a
    trainable coder, also its weight gradients.
    dz = gamma * rstd * (dp - mean(dp) - x_hat * mean(dp * x_hat)), dp = dy * (y > 0).
    """
    geometry = op_geometry(weight, stride, padding, dilation)
    _check_call(x, weight, encoder_weight, encoder_bias, decoder_weight)
    _check("grad_output", grad_output, x.device, None, tuple(y.shape))
    module = _module(x)
    n, c_in, height, width = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    oh, ow = y.shape[2], y.shape[3]
    x_rows = channels_last(x)
    dy = channels_last(in_dtype(grad_output, x.dtype))
    y_rows, z_rows = channels_last(y), channels_last(z)
    mask = y_rows if relu else None
    has_coder = encoder_weight is not None
    dp, grad_norm_weight, grad_norm_bias, coefficients, grad_learner_bias = _batch_norm_backward(
        module, dy, mask, z_rows, mean, rstd, norm_weight, norm_bias, relu
    )
    shape = _shape(module, x, weight, geometry)
    grads_coder: tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]] = (None, None, None)
    grad_pre = encoder_t_rows = None
    c_b = 0
    masked = dp if dp is not None else dy
    if has_coder:
        c_b = encoder_weight.shape[0]
        grad_pre, _, grads_coder = _coder_backward(
            module, shape, x_rows, masked, encoder_weight, encoder_bias, decoder_weight, geometry,
            (oh, ow), coder_grads,
        )  # fmt: skip
        encoder_t_rows = _transposed(encoder_weight)  # [C_in, C_B]
    # dz = a * dp + b * z + c is formed where the two gradient kernels load dp: never stored.
    batch_norm = (z_rows, coefficients)
    dx = image_buffer((n, c_in, height, width), x.dtype, x.device)
    _dgrad(module, shape, c_b, masked, weight, grad_pre, encoder_t_rows, dx, batch_norm)
    weight_grad = _wgrad(
        module, x_rows, masked, (oh, ow), (kh, kw), geometry, out=output_like(weight),
        batch_norm=batch_norm,
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
