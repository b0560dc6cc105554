"""The fused linear layer: the fused convolution op (pnnh_kernels.ops.pnnh_conv) on a 1 x 1 image
per row.

A linear layer over rows is a 1x1 convolution of an [M, C_in, 1, 1] image whose channels_last memory
is the [M, C_in] matrix itself, so the same fused kernels (GEMM, code on chip, one store; the code
recomputed in the backward) serve it with no copy of the activations. The 1x1 kernel has a centre
tap, so the encoder runs in the learner's main loop on the same x tiles.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pnnh_kernels.backends.call import LinearCall
from pnnh_kernels.backends.fused_common import in_dtype
from pnnh_kernels.ops.pnnh_conv import (
    OPS,
    apply_fused,
    autocast_dtype,
    coder_in,
    enters_function,
)

_UNIT = [1, 1]
_NO_PADDING = [0, 0, 0, 0]


def linear(library: str, call: LinearCall) -> Tensor:
    compute_dtype = autocast_dtype(call.input.device) or call.input.dtype
    in_features = call.weight.shape[1]
    rows = in_dtype(call.input.reshape(-1, in_features), compute_dtype)
    ops = OPS[library]
    args = (
        rows.view(rows.shape[0], in_features, 1, 1),
        in_dtype(call.weight, compute_dtype).view(call.weight.shape[0], in_features, 1, 1),
        None,
        None if call.bias is None else in_dtype(call.bias, torch.float32),
        *coder_in(call.coder, compute_dtype),
        _UNIT,
        _NO_PADDING,
        _UNIT,
        call.activation == "relu",
    )
    out = apply_fused(ops, *args) if enters_function(args) else ops.conv2d_fused(*args)
    return out.reshape(*call.input.shape[:-1], call.weight.shape[0])
