"""Functional entry points of the PNNH ops: validate once, then dispatch to a backend.

Each op has one entry point; the backend that runs it is a function table chosen by
:func:`pnnh_kernels.backends.resolve_backend`. Arguments are checked here, before any backend sees
them, so every backend gets the same clear errors and kernels never receive inputs they cannot handle.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from pnnh_kernels import profiling
from pnnh_kernels.backends import resolve_backend
from pnnh_kernels.backends.call import ACTIVATIONS, BatchNormParams, ConvCall, LinearCall
from pnnh_kernels.coder import CoderTensors
from pnnh_kernels.conv_geometry import ConvGeometry, IntOrPair, Padding

__all__ = ["BatchNormParams", "CoderTensors", "pnnh_conv2d", "pnnh_linear"]


_NOT_TRACING = contextlib.nullcontext()


def _tracer_warnings_silenced() -> contextlib.AbstractContextManager[Any]:
    """Under ``torch.jit.trace`` every shape the checks read as a Python int is a TracerWarning that
    the value is frozen into the trace. The checks only raise, and the geometry comes from the
    weight's shape, which a traced module cannot change, so the warnings would say nothing: they
    are silenced while tracing. A context manager, not a wrapper: no frame of its own on the path
    to the kernels. (``torch.jit.script`` is not supported: the entry points are plain Python with
    keyword defaults and dataclasses.)"""
    if not torch.jit.is_tracing():
        return _NOT_TRACING
    silenced = contextlib.ExitStack()
    silenced.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore", torch.jit.TracerWarning)
    return silenced


class RefusesTorchScript:
    """Mixin of the layers whose forward dispatches to Python kernel backends. torch.jit.script
    calls ``__prepare_scriptable__`` first: a clear refusal instead of TorchScript's error from deep
    inside nn.Module."""

    def __prepare_scriptable__(self) -> Any:
        raise RuntimeError(
            f"torch.jit.script: {type(self).__name__} cannot be scripted (its forward dispatches to "
            "Python kernel backends); use torch.jit.trace, torch.compile or torch.export"
        )


def autocast_enabled(device: torch.device) -> bool:
    if device.type == "meta":  # autocast has no meta device; shapes and the ledger run on meta
        return False
    return torch.is_autocast_enabled(device.type)


def _check_tensors(
    input: Tensor, named: list[tuple[str, Optional[Tensor]]], *, check_dtype: bool
) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input: expected a floating-point tensor, got dtype {input.dtype}")
    for name, tensor in named:
        if tensor is None:
            continue
        if not tensor.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {tensor.dtype}")
        if tensor.device != input.device:
            raise ValueError(
                f"{name}: expected a tensor on the input's device {input.device}, got {tensor.device}"
            )
        if check_dtype and tensor.dtype != input.dtype:
            raise TypeError(
                f"{name}: expected the input's dtype {input.dtype}, got {tensor.dtype} "
                "(mixed dtypes are only accepted under torch.autocast)"
            )


def _check_layer_tensors(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    encoder_weight: Optional[Tensor],
    encoder_bias: Optional[Tensor],
    decoder_weight: Optional[Tensor],
) -> None:
    """The learner's and the coder's tensors: floating point, on the input's device, in its dtype
    (other dtypes only under autocast)."""
    _check_tensors(
        input,
        [
            ("weight", weight),
            ("bias", bias),
            ("encoder_weight", encoder_weight),
            ("encoder_bias", encoder_bias),
            ("decoder_weight", decoder_weight),
        ],
        check_dtype=not autocast_enabled(input.device),
    )


def _check_vector(name: str, tensor: Optional[Tensor], length: int) -> None:
    if tensor is not None and tuple(tensor.shape) != (length,):
        raise ValueError(f"{name}: expected shape ({length},), got {tuple(tensor.shape)}")


def _check_coder(coder: CoderTensors, in_channels: int, out_channels: int) -> None:
    encoder = coder.encoder_weight
    if encoder.dim() != 2 or encoder.shape[1] != in_channels or encoder.shape[0] < 1:
        raise ValueError(
            f"encoder_weight: expected shape (C_B, {in_channels}) with C_B >= 1, got "
            f"{tuple(encoder.shape)}"
        )
    code_channels = encoder.shape[0]
    _check_vector("encoder_bias", coder.encoder_bias, code_channels)
    if coder.decoder_weight is None:
        if out_channels != in_channels:
            raise ValueError(
                f"decoder_weight: a tied coder (decoder_weight=None) needs out_channels == "
                f"in_channels, got {out_channels} and {in_channels}"
            )
    elif tuple(coder.decoder_weight.shape) != (out_channels, code_channels):
        raise ValueError(
            f"decoder_weight: expected shape ({out_channels}, {code_channels}), got "
            f"{tuple(coder.decoder_weight.shape)}"
        )


def _check_activation(activation: Optional[str]) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def _coder_or_none(
    encoder_weight: Optional[Tensor],
    encoder_bias: Optional[Tensor],
    decoder_weight: Optional[Tensor],
) -> Optional[CoderTensors]:
    if encoder_weight is None:
        if encoder_bias is not None or decoder_weight is not None:
            raise ValueError(
                "encoder_weight: required when encoder_bias or decoder_weight is given "
                "(a layer without a coder takes none of the three)"
            )
        return None
    return CoderTensors(encoder_weight, encoder_bias, decoder_weight)


def pnnh_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    encoder_weight: Optional[Tensor] = None,
    encoder_bias: Optional[Tensor] = None,
    decoder_weight: Optional[Tensor] = None,
    stride: IntOrPair = 1,
    padding: Padding = None,
    dilation: IntOrPair = 1,
    norm: Optional[BatchNormParams] = None,
    activation: Optional[str] = "relu",
    backend: str = "auto",
) -> Tensor:
    """``act(norm(conv2d(x, W_L, b_L)) + W_D relu(W_E x_s + b_E))`` with ``x_s`` the input at the
    output's strided positions.

    Args:
        input: (N, C_in, H, W) in either memory format (the output keeps it), or unbatched (C_in, H, W).
        weight: learner weight W_L, (C_out, C_in, kH, kW). ``bias``: b_L, (C_out,).
        encoder_weight: W_E, (C_B, C_in); None for a layer without a coder (plain conv + act).
        encoder_bias: b_E, (C_B,). decoder_weight: W_D, (C_out, C_B); None means tied, W_D = W_E^T.
        stride, padding, dilation: as nn.Conv2d; ``padding=None`` is "same"-like padding, the only one
            a coder accepts. An asymmetric "same" padding (``dilation * (kernel_size - 1)`` odd; the
            extra row/column at the bottom/right, as nn.Conv2d) is supported without a coder only.
        norm: batch-norm arguments for the learner branch, or None.
        activation: "relu" or None.
        backend: "auto", "torch", "triton" or "cuda".
    """
    with _tracer_warnings_silenced():
        coder, geometry = check_conv2d(
            input, weight, bias, encoder_weight, encoder_bias, decoder_weight, stride, padding,
            dilation, norm, activation,
        )  # fmt: skip
        return run_conv2d(input, weight, bias, coder, geometry, norm, activation, backend)


def check_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    encoder_weight: Optional[Tensor],
    encoder_bias: Optional[Tensor],
    decoder_weight: Optional[Tensor],
    stride: IntOrPair,
    padding: Padding,
    dilation: IntOrPair,
    norm: Optional[BatchNormParams],
    activation: Optional[str],
) -> tuple[Optional[CoderTensors], ConvGeometry]:
    """:func:`pnnh_conv2d`'s checks of its arguments: raises on anything a backend cannot run,
    else returns the coder's tensors (or None) and the normalised geometry."""
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(
            f"weight: expected a 4-D tensor (C_out, C_in, kH, kW), got "
            f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}"
        )
    coder = _coder_or_none(encoder_weight, encoder_bias, decoder_weight)
    geometry = ConvGeometry.from_args(
        # int(): under torch.jit.trace a shape's entries are tensors
        (int(weight.shape[2]), int(weight.shape[3])), stride, padding, dilation,
        with_coder=coder is not None,
    )  # fmt: skip
    _check_activation(activation)
    if not isinstance(input, Tensor) or input.dim() not in (3, 4):
        raise ValueError(
            "input: expected a 3-D (C, H, W) or 4-D (N, C, H, W) tensor, got "
            f"{tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__}"
        )
    out_channels, in_channels = weight.shape[:2]
    norm_tensors = (
        []
        if norm is None
        else [
            ("norm.running_mean", norm.running_mean),
            ("norm.running_var", norm.running_var),
            ("norm.weight", norm.weight),
            ("norm.bias", norm.bias),
        ]
    )
    _check_layer_tensors(input, weight, bias, encoder_weight, encoder_bias, decoder_weight)
    # BatchNorm may keep float32 parameters and statistics beside a bf16/fp16 input, as
    # F.batch_norm allows.
    _check_tensors(input, norm_tensors, check_dtype=False)
    channel_dim = input.dim() - 3
    if input.shape[channel_dim] != in_channels:
        raise ValueError(
            f"input: expected {in_channels} channels (dimension {channel_dim}) to match weight, got "
            f"shape {tuple(input.shape)}"
        )
    out_h, out_w = geometry.output_size(input.shape[-2], input.shape[-1])
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"input: spatial size {tuple(input.shape[-2:])} is too small for kernel_size "
            f"{geometry.kernel_size}, dilation {geometry.dilation} and padding (top, left, bottom, "
            f"right) {tuple(geometry.op_padding)}: the output would be {out_h}x{out_w}"
        )
    _check_vector("bias", bias, out_channels)
    if norm is not None:
        for name, tensor in norm_tensors:
            _check_vector(name, tensor, out_channels)
    if coder is not None:
        _check_coder(coder, in_channels, out_channels)
    return coder, geometry


def run_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    coder: Optional[CoderTensors],
    geometry: ConvGeometry,
    norm: Optional[BatchNormParams],
    activation: Optional[str],
    backend: str,
) -> Tensor:
    """:func:`pnnh_conv2d` on arguments :func:`check_conv2d` has passed: the backend's conv2d."""
    unbatched = input.dim() == 3
    batched = input.unsqueeze(0) if unbatched else input
    chosen = resolve_backend(backend, input.device, input.dtype, "conv2d")
    call = ConvCall(batched, weight, bias, coder, geometry, norm, activation)
    if profiling.nvtx_enabled():
        label = (
            f"pnnh_conv2d[{chosen.name}] {'x'.join(map(str, batched.shape))} -> {weight.shape[0]} "
            f"k{geometry.kernel_size[0]} s{geometry.stride[0]}"
        )
        with profiling.op_range(label):
            out = chosen.conv2d(call)
    else:
        out = chosen.conv2d(call)
    return out.squeeze(0) if unbatched else out


def pnnh_linear(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    encoder_weight: Optional[Tensor] = None,
    encoder_bias: Optional[Tensor] = None,
    decoder_weight: Optional[Tensor] = None,
    activation: Optional[str] = "relu",
    backend: str = "auto",
) -> Tensor:
    """``act(x W_L^T + b_L + relu(x W_E^T + b_E) W_D^T)`` over the last dimension of ``input``.

    Args:
        input: (..., C_in), any number of leading dimensions (none included).
        weight: W_L, (C_out, C_in). ``bias``: (C_out,).
        encoder_weight: W_E, (C_B, C_in), or None for no coder. ``encoder_bias``: (C_B,).
        decoder_weight: W_D, (C_out, C_B); None means tied, W_D = W_E^T.
        activation: "relu" or None. backend: "auto", "torch", "triton" or "cuda".
    """
    with _tracer_warnings_silenced():
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(
                f"weight: expected a 2-D tensor (C_out, C_in), got "
                f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}"
            )
        coder = _coder_or_none(encoder_weight, encoder_bias, decoder_weight)
        _check_activation(activation)
        if not isinstance(input, Tensor) or input.dim() < 1:
            raise ValueError(
                "input: expected a tensor with at least 1 dimension (..., C_in), got "
                f"{tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__}"
            )
        _check_layer_tensors(input, weight, bias, encoder_weight, encoder_bias, decoder_weight)
        out_features, in_features = weight.shape
        if input.shape[-1] != in_features:
            raise ValueError(
                f"input: expected {in_features} features in the last dimension to match weight, got "
                f"shape {tuple(input.shape)}"
            )
        _check_vector("bias", bias, out_features)
        if coder is not None:
            _check_coder(coder, in_features, out_features)
        chosen = resolve_backend(backend, input.device, input.dtype, "linear")
        call = LinearCall(input, weight, bias, coder, activation)
        if profiling.nvtx_enabled():
            label = f"pnnh_linear[{chosen.name}] {'x'.join(map(str, input.shape))} -> {weight.shape[0]}"
            with profiling.op_range(label):
                return chosen.linear(call)
        return chosen.linear(call)
