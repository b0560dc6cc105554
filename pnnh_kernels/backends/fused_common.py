"""What the fused backends (Triton, CUDA) share below their autograd boundary: NHWC views and
weight layouts, output allocation (with NaN poisoning for tests), the training-BatchNorm statistics
merge and the result records of the forward and backward launchers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from pnnh_kernels.ledger.record import unrecorded

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


def output_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    buffer = torch.empty(shape, dtype=dtype, device=device)
    if _poison_outputs and device.type != "meta":
        with unrecorded():  # a check's fill, not part of the step the ledger counts
            buffer.fill_(float("nan"))
    return buffer


def nhwc(tensor: Tensor) -> Tensor:
    """The NHWC view of an NCHW tensor, copying into channels_last memory only if it is not."""
    return tensor.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


def permuted_weight(weight: Tensor) -> Tensor:
    """[C_out, C_in, KH, KW] -> [KH, KW, C_in, C_out], contiguous."""
    return weight.permute(2, 3, 1, 0).contiguous()


def decoder_rows(encoder_weight: Tensor, decoder_weight: Optional[Tensor]) -> Tensor:
    """W_D^T as [C_B, C_out]: W_E itself for a tied coder (no copy)."""
    if decoder_weight is None:
        return encoder_weight.contiguous()
    return decoder_weight.t().contiguous()


@dataclass
class TrainingForward:
    """Outputs of the training-mode BatchNorm forward (all NCHW views of NHWC memory)."""

    output: Tensor
    learner: Tensor  # z = conv(x) + bias, before the normalisation, in the input dtype
    mean: Tensor  # [C_out] float32 batch mean of z
    variance: Tensor  # [C_out] float32 biased batch variance of z


def merge_tile_statistics(counts: Tensor, means: Tensor, m2: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, biased variance) per channel from per-tile (count, mean, sum of squared deviations).

    Chan et al.'s pairwise formula, all tiles at once: M2 = sum M2_t + sum n_t (mean_t - mean)^2.
    No sum of squares of raw values is ever formed, so a large mean does not cancel the variance
    away; the order is fixed, so the result is deterministic.
    """
    total = counts.sum()
    mean = (counts[:, None] * means).sum(0) / total
    m2_total = m2.sum(0) + (counts[:, None] * (means - mean).square()).sum(0)
    return mean, m2_total / total


def batch_norm_from_tiles(
    means: Tensor,
    m2: Tensor,
    tile_rows: int,
    pixels: int,
    eps: float,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, biased variance, scale, shift) of training-mode BatchNorm from the statistics pass's
    per-tile partials (every tile holds ``tile_rows`` pixels but the last): ``scale`` and ``shift``
    are what the apply pass multiplies and adds to z."""
    tiles = means.shape[0]
    counts = torch.full((tiles,), float(tile_rows), device=means.device)
    counts[-1:].fill_(pixels - (tiles - 1) * tile_rows)  # the same ops on every device
    mean, variance = merge_tile_statistics(counts, means, m2)
    scale = torch.rsqrt(variance + eps)
    if norm_weight is not None:
        scale = scale * norm_weight.float()
    shift = -mean * scale
    if norm_bias is not None:
        shift = shift + norm_bias.float()
    return mean, variance, scale, shift


@dataclass
class ConvGradients:
    """Gradients of the fused op's inputs; the learner's are unscaled (see :func:`conv_backward`)."""

    input: Tensor
    weight_unscaled: Tensor  # [KH, KW, C_in, C_out] float32: sum over pixels of x_tap * dp
    shift: Tensor  # [C_out] float32: sum over pixels of dp
    encoder_weight: Optional[Tensor]  # [C_B, C_in] float32 (both uses when tied)
    encoder_bias: Optional[Tensor]  # [C_B] float32
    decoder_weight: Optional[Tensor]  # [C_out, C_B] float32, untied only
