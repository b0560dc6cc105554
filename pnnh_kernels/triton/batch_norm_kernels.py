"""Triton kernels of training-mode BatchNorm around the fused PNNH convolution.

The convolution kernels reduce per tile of ``BLOCK_M`` pixels (the forward's statistics pass writes
each tile's mean and sum of squared deviations of z; the backward's reduction writes each tile's
sums of dp and dp * (z - mean)). These kernels finish the job in a fixed order (deterministic):

- :func:`_bn_finalize_forward_kernel`: the batch mean and variance (Chan's merge of the tiles) and
  the scale and shift the apply pass uses (cuDNN's "BN finalize" node);
- :func:`_bn_running_update_kernel`: the running statistics, updated in place;
- :func:`_bn_finalize_backward_kernel`: the gradients of gamma and beta and the three per-channel
  coefficients of ``dz = a * dp + b * z + c``;
- :func:`_bn_dz_kernel`: dz stored once, which the input- and weight-gradient kernels read (one
  tile per tap; forming dz where they loaded dy had them load dy, y and z per tap, three times the
  L2 traffic of their mainloops, which the static model finds L2-bound).

With ``dp = dy * (y > 0)``, ``x_hat = (z - mean) * rstd``, ``gain = gamma * rstd`` and N pixels:
``dz = gain * (dp - sum(dp) / N - x_hat * sum(dp * x_hat) / N)``, i.e. ``a = gain``,
``b = -gain * rstd^2 * S2 / N`` and ``c = -gain * S1 / N - b * mean`` with ``S1 = sum(dp)`` and
``S2 = sum(dp * (z - mean))``. Forming S2 around the batch mean (not as ``sum(dp * z) - mean * S1``)
keeps a large mean from cancelling it away.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pnnh_kernels.triton.kernels import _relu_grad


@triton.jit
def _bn_finalize_forward_kernel(
    mean_part_ptr,  # [T, C] fp32: per-tile means of z
    m2_part_ptr,  # [T, C] fp32: per-tile sums of squared deviations
    weight_ptr,  # [C] gamma, if HAS_WEIGHT
    bias_ptr,  # [C] beta, if HAS_BIAS
    mean_ptr,  # out: [C] fp32 batch mean
    variance_ptr,  # out: [C] fp32 biased batch variance
    rstd_ptr,  # out: [C] fp32 1 / sqrt(biased variance + eps)
    scale_ptr,  # out: [C] fp32 gamma * rstd
    shift_ptr,  # out: [C] fp32 beta - mean * scale
    T,
    C,
    tile_rows,
    pixels,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One ``BLOCK_C`` slice of channels over all T tiles (every tile holds ``tile_rows`` pixels but
    the last). Two passes over the partials: the mean, then ``M2 = sum M2_t + n_t (mean_t - mean)^2``."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    last_rows = pixels - (T - 1) * tile_rows
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        mask = (ts < T)[:, None] & mask_c[None, :]
        rows = tl.where(ts == T - 1, last_rows, tile_rows).to(tl.float32)
        means = tl.load(mean_part_ptr + ts[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
        total += tl.sum(rows[:, None] * means, axis=0)
    mean = total / pixels
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        mask = (ts < T)[:, None] & mask_c[None, :]
        rows = tl.where(ts == T - 1, last_rows, tile_rows).to(tl.float32)
        offsets = ts[:, None] * C + offs_c[None, :]
        means = tl.load(mean_part_ptr + offsets, mask=mask, other=0.0)
        deviation = tl.where(mask, means - mean[None, :], 0.0)
        m2 += tl.sum(tl.load(m2_part_ptr + offsets, mask=mask, other=0.0), axis=0)
        m2 += tl.sum(rows[:, None] * deviation * deviation, axis=0)
    variance = m2 / pixels
    rstd = 1.0 / tl.sqrt(variance + eps)
    scale = rstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    shift = -mean * scale
    if HAS_BIAS:
        shift = shift + tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    tl.store(mean_ptr + offs_c, mean, mask=mask_c)
    tl.store(variance_ptr + offs_c, variance, mask=mask_c)
    tl.store(rstd_ptr + offs_c, rstd, mask=mask_c)
    tl.store(scale_ptr + offs_c, scale, mask=mask_c)
    tl.store(shift_ptr + offs_c, shift, mask=mask_c)


@triton.jit
def _bn_running_update_kernel(
    running_mean_ptr,  # [C], updated in place
    running_var_ptr,  # [C], updated in place
    mean_ptr,  # [C] fp32 batch mean
    variance_ptr,  # [C] fp32 biased batch variance
    C,
    momentum,
    unbiased_factor,  # N / (N - 1)
    BLOCK_C: tl.constexpr,
):
    """As nn.BatchNorm2d: exponential averages of the batch mean and the unbiased batch variance,
    computed in fp32 and stored in the buffers' dtype. (Its own launch: an op that mutates its
    inputs cannot carry an autograd formula, so the statistics' update is a separate op.)"""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    running_mean = tl.load(running_mean_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    running_var = tl.load(running_var_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    variance = tl.load(variance_ptr + offs_c, mask=mask_c, other=0.0)
    running_mean = (1.0 - momentum) * running_mean + momentum * mean
    running_var = (1.0 - momentum) * running_var + momentum * (variance * unbiased_factor)
    tl.store(running_mean_ptr + offs_c, running_mean.to(running_mean_ptr.dtype.element_ty), mask=mask_c)
    tl.store(running_var_ptr + offs_c, running_var.to(running_var_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _bn_finalize_backward_kernel(
    sum_dp_part_ptr,  # [T, C] fp32: per-tile sums of dp
    sum_dpz_part_ptr,  # [T, C] fp32: per-tile sums of dp * (z - mean)
    mean_ptr,  # [C] fp32
    rstd_ptr,  # [C] fp32
    weight_ptr,  # [C] gamma, if HAS_WEIGHT
    grad_weight_ptr,  # out: [C] d gamma (in gamma's dtype), if HAS_WEIGHT
    grad_bias_ptr,  # out: [C] d beta (in beta's dtype), if HAS_BIAS
    coefficients_ptr,  # out: [3, C] fp32: a, b, c of dz = a * dp + b * z + c
    grad_learner_bias_ptr,  # out: [C] fp32: the learner bias's gradient
    T,
    C,
    pixels,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    s1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        mask = (ts < T)[:, None] & mask_c[None, :]
        offsets = ts[:, None] * C + offs_c[None, :]
        s1 += tl.sum(tl.load(sum_dp_part_ptr + offsets, mask=mask, other=0.0), axis=0)
        s2 += tl.sum(tl.load(sum_dpz_part_ptr + offsets, mask=mask, other=0.0), axis=0)
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    rstd = tl.load(rstd_ptr + offs_c, mask=mask_c, other=0.0)
    gain = rstd
    if HAS_WEIGHT:
        gain = gain * tl.load(weight_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        grad_weight = s2 * rstd
        tl.store(grad_weight_ptr + offs_c, grad_weight.to(grad_weight_ptr.dtype.element_ty), mask=mask_c)
    if HAS_BIAS:
        tl.store(grad_bias_ptr + offs_c, s1.to(grad_bias_ptr.dtype.element_ty), mask=mask_c)
    a = gain
    b = -gain * rstd * rstd * s2 / pixels
    c = -gain * s1 / pixels - b * mean
    tl.store(coefficients_ptr + offs_c, a, mask=mask_c)
    tl.store(coefficients_ptr + C + offs_c, b, mask=mask_c)
    tl.store(coefficients_ptr + 2 * C + offs_c, c, mask=mask_c)
    # The learner bias's gradient sum(dz): 0 exactly in theory (the batch mean cancels any
    # per-channel constant before it), NaN wherever dz is not finite, as PyTorch's sum(dz) would be.
    tl.store(grad_learner_bias_ptr + offs_c, 0.0 * (a + b + c), mask=mask_c)


@triton.jit
def _batch_norm_grad(g, z_ptr, coefficients_ptr, offsets, tile, cs, mask_c, C):
    """dz = a * g + b * z + c on a loaded tile of the masked output gradient g (training-mode
    BatchNorm's backward, coefficients from _bn_finalize_backward_kernel), zero outside ``tile``."""
    z = tl.load(z_ptr + offsets, mask=tile, other=0.0).to(tl.float32)
    a = tl.load(coefficients_ptr + cs, mask=mask_c, other=0.0)
    b = tl.load(coefficients_ptr + C + cs, mask=mask_c, other=0.0)
    c = tl.load(coefficients_ptr + 2 * C + cs, mask=mask_c, other=0.0)
    return tl.where(tile, a[None, :] * g.to(tl.float32) + b[None, :] * z + c[None, :], 0.0)


@triton.jit
def _bn_dz_kernel(
    dy_ptr,  # [M, C] the output gradient (NHWC rows)
    y_ptr,  # [M, C] the output, for the ReLU mask, if RELU
    z_ptr,  # [M, C] the learner output before BatchNorm
    coefficients_ptr,  # [3, C] fp32 from _bn_finalize_backward_kernel
    dz_ptr,  # out: [M, C] dz in the data dtype
    M,
    C,
    RELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dz = a * dp + b * z + c with dp = dy masked by y > 0, stored once in the data dtype: the
    input- and weight-gradient kernels then load one tile per tap (dz) instead of three (dy, y, z).
    Rounded to the data dtype once, as the gradient kernels round what they feed their dots."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    tile = (offs_m < M)[:, None] & mask_c[None, :]
    offsets = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
    g = tl.load(dy_ptr + offsets, mask=tile, other=0.0)
    if RELU:
        g = _relu_grad(g, tl.load(y_ptr + offsets, mask=tile, other=0.0))
    dz = _batch_norm_grad(g, z_ptr, coefficients_ptr, offsets, tile, offs_c, mask_c, C)
    tl.store(dz_ptr + offsets, dz.to(dz_ptr.dtype.element_ty), mask=tile)
