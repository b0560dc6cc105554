"""The autograd boundary of the Triton backend: torch.library ops and the backend function.

``pnnh::conv2d_fused`` computes ``act(conv(x, W) * scale + shift + W_D relu(W_E x_s + b_E))`` and
``pnnh::conv2d_fused_backward`` its gradients. Both are ``torch.library.custom_op``s with fake
implementations, so ``torch.compile(fullgraph=True)`` traces a model built from the modules without
graph breaks and without looking inside the kernels (which also makes the CPU interpreter work
under torch.compile, where ``triton_op`` would try to trace the kernel with fake tensors).

The learner's bias and an eval-mode BatchNorm are folded, in PyTorch and with autograd, into the
per-channel ``scale`` and ``shift`` the kernel applies to the learner branch:
``scale = gamma / sqrt(running_var + eps)``, ``shift = beta + (b_L - running_mean) * scale``. The op
returns the gradients of ``scale`` and ``shift``; autograd carries them on to gamma, beta and b_L.

What the op keeps alive for the backward: x, the output y (whose sign is the output ReLU's mask, and
which the next layer keeps alive anyway as its own input), the weights and a few per-channel vectors.
The unfused torch backend also keeps the conv output and the code: for a C -> C layer with
C_B = C / 2 and eval BatchNorm, 3.5x the input's bytes against the fused op's 2x (measured by
counting saved tensors in tests/test_triton_conv.py).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from pnnh_kernels.backends.call import ConvCall, LinearCall
from pnnh_kernels.backends.reference import memory_format_of
from pnnh_kernels.conv_geometry import ConvGeometry
from pnnh_kernels.triton import pnnh_conv
from pnnh_kernels.triton.pnnh_conv import conv_backward, conv_forward, permuted_weight


def _geometry(
    weight: Tensor, stride: list[int], padding: list[int], dilation: list[int]
) -> ConvGeometry:
    """The op's geometry; the functional entry point has already validated it."""
    kernel = (weight.shape[2], weight.shape[3])
    return ConvGeometry(
        kernel, (stride[0], stride[1]), (padding[0], padding[1]), (dilation[0], dilation[1])
    )


@torch.library.custom_op("pnnh::conv2d_fused", mutates_args=())
def conv2d_fused(
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
    return conv_forward(
        x,
        weight,
        scale,
        shift,
        encoder_weight,
        encoder_bias,
        decoder_weight,
        _geometry(weight, stride, padding, dilation),
        relu,
    )


@conv2d_fused.register_fake
def _conv2d_fused_fake(
    x,
    weight,
    scale,
    shift,
    encoder_weight,
    encoder_bias,
    decoder_weight,
    stride,
    padding,
    dilation,
    relu,
):
    oh, ow = _geometry(weight, stride, padding, dilation).output_size(x.shape[2], x.shape[3])
    return x.new_empty((x.shape[0], oh, ow, weight.shape[0])).permute(0, 3, 1, 2)


@torch.library.custom_op("pnnh::conv2d_fused_backward", mutates_args=())
def conv2d_fused_backward(
    grad_output: Tensor,
    x: Tensor,
    output: Tensor,
    weight: Tensor,
    scale: Optional[Tensor],
    encoder_weight: Optional[Tensor],
    encoder_bias: Optional[Tensor],
    decoder_weight: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    relu: bool,
) -> list[Tensor]:
    """[dx, dW_unscaled [KH, KW, C_in, C_out] fp32, dshift, dW_E, db_E, dW_D]; absent ones are empty."""
    grads = conv_backward(
        grad_output,
        x,
        output,
        weight,
        scale,
        encoder_weight,
        encoder_bias,
        decoder_weight,
        _geometry(weight, stride, padding, dilation),
        relu,
    )

    def or_empty(grad: Optional[Tensor]) -> Tensor:
        # A distinct empty tensor each time: outputs of a custom op may not alias each other.
        return x.new_empty((0,), dtype=torch.float32) if grad is None else grad.contiguous()

    return [
        grads.input,
        grads.weight_unscaled,
        grads.shift,
        or_empty(grads.encoder_weight),
        or_empty(grads.encoder_bias),
        or_empty(grads.decoder_weight),
    ]


@conv2d_fused_backward.register_fake
def _conv2d_fused_backward_fake(
    grad_output,
    x,
    output,
    weight,
    scale,
    encoder_weight,
    encoder_bias,
    decoder_weight,
    stride,
    padding,
    dilation,
    relu,
):
    n, c_in, height, width = x.shape
    c_out, _, kh, kw = weight.shape

    def like(tensor: Optional[Tensor]) -> Tensor:
        shape = (0,) if tensor is None else tuple(tensor.shape)
        return x.new_empty(shape, dtype=torch.float32)

    return [
        x.new_empty((n, height, width, c_in)).permute(0, 3, 1, 2),
        x.new_empty((kh, kw, c_in, c_out), dtype=torch.float32),
        x.new_empty((c_out,), dtype=torch.float32),
        like(encoder_weight),
        like(encoder_bias),
        like(decoder_weight),
    ]


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    (
        x,
        weight,
        scale,
        shift,
        encoder_weight,
        encoder_bias,
        decoder_weight,
        stride,
        padding,
        dilation,
        relu,
    ) = inputs
    ctx.save_for_backward(x, output, weight, scale, encoder_weight, encoder_bias, decoder_weight)
    ctx.arguments = (stride, padding, dilation, relu)
    ctx.has_shift = shift is not None


def _backward(ctx: Any, grad_output: Tensor) -> tuple:
    x, output, weight, scale, encoder_weight, encoder_bias, decoder_weight = ctx.saved_tensors
    stride, padding, dilation, relu = ctx.arguments
    (
        grad_x,
        grad_weight_unscaled,
        grad_shift,
        grad_encoder_weight,
        grad_encoder_bias,
        grad_decoder_weight,
    ) = conv2d_fused_backward(
        grad_output,
        x,
        output,
        weight,
        scale,
        encoder_weight,
        encoder_bias,
        decoder_weight,
        stride,
        padding,
        dilation,
        relu,
    )
    grad_scale = None
    if scale is not None:
        # d(scale)[c] = sum_pixels dp * conv(x)[c] = <W[c], dW_unscaled[c]> (no division by scale).
        grad_scale = (grad_weight_unscaled * permuted_weight(weight).float()).sum((0, 1, 2))
        grad_weight_unscaled = grad_weight_unscaled * scale
    grad_weight = grad_weight_unscaled.permute(3, 2, 0, 1).to(weight.dtype)
    return (
        grad_x,
        grad_weight,
        grad_scale,
        grad_shift if ctx.has_shift else None,
        None if encoder_weight is None else grad_encoder_weight.to(encoder_weight.dtype),
        None if encoder_bias is None else grad_encoder_bias.to(encoder_bias.dtype),
        None if decoder_weight is None else grad_decoder_weight.to(decoder_weight.dtype),
        None,
        None,
        None,
        None,
    )


conv2d_fused.register_autograd(_backward, setup_context=_setup_context)


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def conv2d(call: ConvCall) -> Tensor:
    """The Triton backend's conv2d: fold bias and eval BatchNorm, apply autocast, run the op."""
    norm = call.norm
    if norm is not None and norm.training:
        raise RuntimeError(
            "training-mode BatchNorm reached the Triton backend; resolve_backend reroutes it"
        )
    compute_dtype = _autocast_dtype(call.input.device) or call.input.dtype
    scale: Optional[Tensor] = None
    shift = None if call.bias is None else call.bias.float()
    if norm is not None:
        inv_std = torch.rsqrt(norm.running_var.float() + norm.eps)
        scale = inv_std if norm.weight is None else norm.weight.float() * inv_std
        shift_bn = -norm.running_mean.float() * scale
        if norm.bias is not None:
            shift_bn = shift_bn + norm.bias.float()
        shift = shift_bn if shift is None else shift_bn + shift * scale
    coder = call.coder

    def cast(tensor: Optional[Tensor]) -> Optional[Tensor]:
        return None if tensor is None else tensor.to(compute_dtype)

    out = conv2d_fused(
        call.input.to(compute_dtype),
        call.weight.to(compute_dtype),
        scale,
        shift,
        cast(coder.encoder_weight) if coder is not None else None,
        cast(coder.encoder_bias) if coder is not None else None,
        cast(coder.decoder_weight) if coder is not None else None,
        list(call.geometry.stride),
        list(call.geometry.padding),
        list(call.geometry.dilation),
        call.activation == "relu",
    )
    return out.contiguous(memory_format=memory_format_of(call.input))


def linear(call: LinearCall) -> Tensor:
    """The Triton backend's linear layer: the fused conv op on a 1 x 1 image per row.

    A linear layer over rows is a 1x1 convolution of an [M, C_in, 1, 1] image whose channels_last
    memory is the [M, C_in] matrix itself, so the same fused kernels (GEMM, code on chip, one store;
    the code recomputed in the backward) serve it with no copy of the activations. The 1x1 kernel
    has a centre tap, so the encoder runs in the learner's main loop on the same x tiles.
    """
    compute_dtype = _autocast_dtype(call.input.device) or call.input.dtype
    in_features = call.weight.shape[1]
    rows = call.input.reshape(-1, in_features).to(compute_dtype)
    coder = call.coder

    def cast(tensor: Optional[Tensor]) -> Optional[Tensor]:
        return None if tensor is None else tensor.to(compute_dtype)

    out = conv2d_fused(
        rows.view(rows.shape[0], in_features, 1, 1),
        call.weight.to(compute_dtype).view(call.weight.shape[0], in_features, 1, 1),
        None,
        None if call.bias is None else call.bias.float(),
        cast(coder.encoder_weight) if coder is not None else None,
        cast(coder.encoder_bias) if coder is not None else None,
        cast(coder.decoder_weight) if coder is not None else None,
        [1, 1],
        [0, 0],
        [1, 1],
        call.activation == "relu",
    )
    return out.reshape(*call.input.shape[:-1], call.weight.shape[0])


__all__ = ["conv2d", "conv2d_fused", "conv2d_fused_backward", "linear", "pnnh_conv"]
