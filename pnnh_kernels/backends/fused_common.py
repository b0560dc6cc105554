"""What the fused backends (Triton, CUDA) share below their autograd boundary: NHWC views and
weight layouts, output allocation (with NaN poisoning for tests) and the argument and result records
of the forward and backward launchers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from pnnh_kernels.observer import unobserved

_poison_outputs = False


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Fill every buffer a kernel is meant to overwrite with NaN before launching, so that an
    element the kernel forgets to write shows up in the result instead of passing as stale zeros."""
    global _poison_outputs
    previous, _poison_outputs = _poison_outputs, True
    try:
        yield
    finally:
        _poison_outputs = previous


def _poisoned(buffer: Tensor) -> Tensor:
    """``buffer`` filled with NaN, for :func:`poisoned_outputs` (a meta tensor has nothing to fill)."""
    if buffer.device.type != "meta":
        with unobserved():  # a check's fill, not part of the step the ledger counts
            buffer.fill_(float("nan"))
    return buffer


def output_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    buffer = torch.empty(shape, dtype=dtype, device=device)
    return _poisoned(buffer) if _poison_outputs else buffer  # no call on the hot path


# The weight gradient's float32 split partials (written, then read back by the reduction) may move
# at most this fraction of the bytes of the gradient rows the kernel reads.
WGRAD_PARTIAL_TRAFFIC = 0.5


def capped_wgrad_splits(splits: int, gradient_bytes: int, taps: int, c_x: int, c_g: int) -> int:
    """At most ``splits`` splits of a weight gradient's pixel reduction, and no more than keep its
    float32 partials' traffic (each written and read back) within WGRAD_PARTIAL_TRAFFIC of the
    bytes of the gradient rows: the one rule of both fused backends. The Triton launcher may then
    raise the count to fill the GPU (pnnh_conv_config.wgrad_fill_target), beyond this traffic."""
    partial_bytes = 2 * taps * c_x * c_g * 4
    return max(1, min(splits, int(WGRAD_PARTIAL_TRAFFIC * gradient_bytes // partial_bytes)))


def output_like(tensor: Tensor) -> Tensor:
    """An output buffer with ``tensor``'s shape, dtype and memory layout (NaN-poisoned under
    :func:`poisoned_outputs`)."""
    buffer = torch.empty_like(tensor)
    return _poisoned(buffer) if _poison_outputs else buffer


def image_buffer(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An [N, C, H, W] output buffer in channels_last memory (its storage is NHWC, the kernels'
    layout), NaN-poisoned under :func:`poisoned_outputs`. The kernels take its pointer: no NHWC view
    is made of it (each view is a dispatch of its own on the host, ~2.5 µs)."""
    buffer = torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)
    return _poisoned(buffer) if _poison_outputs else buffer


def channels_last(tensor: Tensor) -> Tensor:
    """``tensor`` (NCHW) in channels_last memory, whose storage is the NHWC layout the kernels read;
    a copy only if it is not already."""
    return tensor.contiguous(memory_format=torch.channels_last)


def in_dtype(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)`` without the call where it is already in ``dtype`` (a no-op ``to`` still
    costs a dispatch, ~2.5 µs)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def permuted_weight(weight: Tensor) -> Tensor:
    """[C_out, C_in, KH, KW] -> [KH, KW, C_in, C_out], contiguous."""
    return weight.permute(2, 3, 1, 0).contiguous()


def decoder_rows(encoder_weight: Tensor, decoder_weight: Optional[Tensor]) -> Tensor:
    """W_D^T as [C_B, C_out]: W_E itself for a tied coder (no copy)."""
    if decoder_weight is None:
        return encoder_weight.contiguous()
    return decoder_weight.t().contiguous()


class TrainingNorm(NamedTuple):
    """Training-mode BatchNorm's arguments below the op: gamma and beta (each optional) and eps."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    eps: float


class TrainingForward(NamedTuple):
    """Outputs of the training-mode BatchNorm forward, as the op returns them (images NCHW in
    channels_last memory)."""

    output: Tensor
    learner: Tensor  # z = conv(x) + bias, before the normalisation, in the input dtype
    mean: Tensor  # [C_out] float32 batch mean of z
    variance: Tensor  # [C_out] float32 biased batch variance of z
    rstd: Tensor  # [C_out] float32 1 / sqrt(variance + eps)


def or_empty(like: Tensor, grad: Optional[Tensor]) -> Tensor:
    """``grad``, or an empty float32 tensor where it is absent: a distinct one each time (outputs of
    an op may not alias each other); contiguous, as the fakes say (the coder's gradients come out as
    transposes)."""
    return like.new_empty((0,), dtype=torch.float32) if grad is None else grad.contiguous()


def present(grad: Tensor) -> Optional[Tensor]:
    """None for the empty tensor an op returns for an absent gradient."""
    return None if grad.numel() == 0 else grad


@dataclass
class TrainingGradients:
    """Gradients of the training-mode op's inputs."""

    input: Tensor
    weight: Tensor  # the weight's shape, dtype and memory layout
    norm_weight: Optional[Tensor]  # [C_out] in gamma's dtype
    norm_bias: Optional[Tensor]  # [C_out] in beta's dtype
    encoder_weight: Optional[Tensor]  # [C_B, C_in] float32 (both uses when tied)
    encoder_bias: Optional[Tensor]  # [C_B] float32
    decoder_weight: Optional[Tensor]  # [C_out, C_B] float32, untied only
    # [C_out] float32: the learner bias's gradient, sum(dz): zero exactly in theory (training
    # BatchNorm subtracts the batch mean, which cancels any per-channel constant before it), NaN
    # where dz is not finite, as PyTorch's would be (the op returns it with or without a bias).
    learner_bias: Optional[Tensor] = None

    def op_outputs(self, like: Tensor) -> list[Tensor]:
        """As ``conv2d_fused_train_backward`` returns them: [dx, dW, d gamma, d beta, dW_E, db_E,
        dW_D, d b_L], absent ones empty."""
        return [
            self.input, self.weight, or_empty(like, self.norm_weight),
            or_empty(like, self.norm_bias), or_empty(like, self.encoder_weight),
            or_empty(like, self.encoder_bias), or_empty(like, self.decoder_weight),
            or_empty(like, self.learner_bias),
        ]  # fmt: skip

    @classmethod
    def from_op_outputs(cls, grads: list[Tensor]) -> TrainingGradients:
        """The inverse of :meth:`op_outputs` (empty tensors -> None)."""
        return cls(grads[0], grads[1], *(present(g) for g in grads[2:7]), present(grads[7]))


@dataclass
class ConvGradients:
    """Gradients of the fused op's inputs; the learner's are unscaled (see :func:`conv_backward`)."""

    input: Tensor
    weight_unscaled: Tensor  # [KH, KW, C_in, C_out] float32: sum over pixels of x_tap * dp
    shift: Tensor  # [C_out] float32: sum over pixels of dp
    encoder_weight: Optional[Tensor]  # [C_B, C_in] float32 (both uses when tied)
    encoder_bias: Optional[Tensor]  # [C_B] float32
    decoder_weight: Optional[Tensor]  # [C_out, C_B] float32, untied only

    def op_outputs(self, like: Tensor) -> list[Tensor]:
        """As ``conv2d_fused_backward`` returns them: [dx, dW_unscaled, d shift, dW_E, db_E, dW_D],
        absent ones empty."""
        return [
            self.input, self.weight_unscaled, self.shift, or_empty(like, self.encoder_weight),
            or_empty(like, self.encoder_bias), or_empty(like, self.decoder_weight),
        ]  # fmt: skip

    @classmethod
    def from_op_outputs(cls, grads: list[Tensor]) -> ConvGradients:
        """The inverse of :meth:`op_outputs` (empty coder gradients -> None)."""
        return cls(grads[0], grads[1], grads[2], *(present(g) for g in grads[3:6]))
