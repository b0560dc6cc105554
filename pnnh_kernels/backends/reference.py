"""The ``"torch"`` backend: the PNNH layer written with PyTorch ops, autograd by PyTorch.

It is the reference every kernel is checked against and runs on any device and floating dtype.
It follows the layer's definition (docs/pnnh.md) literally::

    z    = conv2d(x, W_L, b_L, stride, padding, dilation)  # padding may be asymmetric
    z    = batch_norm(z)                        # when a norm is given
    code = relu(conv1x1(x[:, :, ::sh, ::sw], W_E) + b_E)
    y    = act(z + conv1x1(code, W_D))
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pnnh_kernels.backends import Backend, register_backend
from pnnh_kernels.backends.call import ConvCall, LinearCall
from pnnh_kernels.conv_geometry import ConvGeometry


def _activate(tensor: Tensor, activation: Optional[str]) -> Tensor:
    return F.relu(tensor) if activation == "relu" else tensor


def memory_format_of(tensor: Tensor) -> torch.memory_format:
    """channels_last when ``tensor`` is unambiguously in it, else contiguous: an output's layout."""
    if tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def learner_conv2d(
    input: Tensor, weight: Tensor, bias: Optional[Tensor], geometry: ConvGeometry
) -> Tensor:
    """F.conv2d with the geometry's padding. An asymmetric padding pads the input with zeros first,
    as nn.Conv2d does for an asymmetric "same" padding (this is the reference, not a fused kernel)."""
    if geometry.is_symmetric:
        return F.conv2d(input, weight, bias, geometry.stride, geometry.padding, geometry.dilation)
    (top, left), (bottom, right) = geometry.padding, geometry.padding_end
    padded = F.pad(input, (left, right, top, bottom))
    return F.conv2d(padded, weight, bias, geometry.stride, 0, geometry.dilation)


def conv2d(call: ConvCall) -> Tensor:
    geometry = call.geometry
    z = learner_conv2d(call.input, call.weight, call.bias, geometry)
    if call.norm is not None:
        norm = call.norm
        z = F.batch_norm(
            z,
            norm.running_mean,
            norm.running_var,
            norm.weight,
            norm.bias,
            norm.training,
            norm.momentum,
            norm.eps,
        )
    if call.coder is not None:
        stride_h, stride_w = geometry.stride
        # A unit-stride slice is a no-op whose backward still allocates and scatters a full copy.
        sampled = call.input if geometry.stride == (1, 1) else call.input[:, :, ::stride_h, ::stride_w]
        code = F.relu(
            F.conv2d(sampled, call.coder.encoder_weight[:, :, None, None], call.coder.encoder_bias)
        )
        z = z + F.conv2d(code, call.coder.decoder()[:, :, None, None])
    # Elementwise ops may pick either layout when their operands disagree; the caller's layout wins.
    return _activate(z, call.activation).contiguous(memory_format=memory_format_of(call.input))


def linear(call: LinearCall) -> Tensor:
    out = F.linear(call.input, call.weight, call.bias)
    if call.coder is not None:
        code = F.relu(F.linear(call.input, call.coder.encoder_weight, call.coder.encoder_bias))
        out = out + F.linear(code, call.coder.decoder())
    return _activate(out, call.activation)


def unavailable_reason(device: torch.device, dtype: torch.dtype, op: str) -> Optional[str]:
    return None  # PyTorch ops run everywhere; dtype problems surface from the ops themselves.


BACKEND = Backend("torch", conv2d, linear, unavailable_reason)

register_backend(BACKEND)
