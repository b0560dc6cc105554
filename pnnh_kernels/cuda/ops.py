"""The CUDA backend's autograd boundary: the shared fused ops (pnnh_kernels.backends.fused_ops) over
the CUDA launchers, registered as ``pnnh_cuda::conv2d_fused``, ``pnnh_cuda::conv2d_fused_backward``
and ``pnnh_cuda::conv2d_fused_train``."""

from __future__ import annotations

from pnnh_kernels.backends.fused_ops import define_fused_ops
from pnnh_kernels.cuda import launch

_OPS = define_fused_ops("pnnh_cuda", launch)
conv2d = _OPS.conv2d
linear = _OPS.linear
conv2d_fused = _OPS.conv2d_fused
conv2d_fused_backward = _OPS.conv2d_fused_backward
conv2d_fused_train = _OPS.conv2d_fused_train

__all__ = ["conv2d", "conv2d_fused", "conv2d_fused_backward", "conv2d_fused_train", "linear"]
