"""Triton kernels of the fused PNNH convolution, forward and backward.

Layouts (all row-major, i.e. the memory of channels_last NCHW tensors):

- ``x``: the input image, NHWC, ``[N, H, W, C_in]``.
- ``w``: the learner weight ``[C_out, C_in, KH, KW]`` as the module holds it, read through its four
  strides (no permuted copy per call; a channels_last weight has C_in contiguous).
- ``we``: the encoder W_E, ``[C_B, C_in]``. ``wd``: the decoder as ``[C_B, C_out]``, i.e. W_D^T; for a
  tied coder that is W_E itself (C_out == C_in), so no copy is made.
- ``y``, ``dy``: the output and its gradient, NHWC ``[N, OH, OW, C_out]``; a row ``m`` of the flattened
  ``[M = N * OH * OW, C_out]`` matrix is one output pixel.

Every pixel offset is computed in int64: an activation tensor may exceed 2^31 elements, the weights
never do. All accumulation is in float32; ``tl.dot`` operands stay in the input dtype (bf16/fp16 use
tensor cores), and fp32 operands use ``INPUT_PRECISION`` ("ieee", or "tf32" when the caller allows it).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mma(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``acc + a @ b``. ``UPCAST_DOT`` computes in fp32 instead: Triton 3.9's CPU interpreter returns
    garbage for bf16 ``tl.dot`` (seen on 2026-11-26), so the launcher sets it there for bf16 only."""
    if UPCAST_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _relu(v):
    """max(v, 0) as torch.relu computes it: NaN stays NaN (tl.maximum(nan, 0) is 0, which would turn
    a diverged layer's output into zeros)."""
    return tl.where(v < 0, 0.0, v)


@triton.jit
def _relu_grad(g, v):
    """The gradient g through a ReLU whose output (or input) is v, as PyTorch's threshold_backward:
    zero where v <= 0, g elsewhere, so a NaN v passes g on and a NaN g where v <= 0 is dropped."""
    return tl.where(v <= 0, tl.zeros_like(g), g)


@triton.jit
def _next_step(tap, chunk, chunks):
    """(tap, chunk) of the next step of a flat loop over taps x ``chunks`` channel chunks, carried
    from step to step: dividing them out of the step number with ``chunks`` known only at run time
    was an integer division (~25 instructions per thread) every iteration."""
    chunk += 1
    next_tap = chunk == chunks
    return tap + next_tap.to(tl.int32), tl.where(next_tap, 0, chunk)


@triton.jit
def _pnnh_conv_fwd_kernel(
    x_ptr,  # [N, H, W, C_in]
    w_ptr,  # the weight [C_out, C_in, KH, KW], read through its strides (w_stride_*)
    scale_ptr,  # [C_out] fp32, learner-branch scale (folded eval BatchNorm), if HAS_SCALE
    shift_ptr,  # [C_out] fp32, learner-branch shift (bias and folded BatchNorm), if HAS_SHIFT
    we_ptr,  # [C_B, C_in]
    be_ptr,  # [C_B], if HAS_ENCODER_BIAS
    wd_ptr,  # [C_B, C_out] (W_D^T)
    y_ptr,  # [N, OH, OW, C_out]
    z_ptr,  # [N, OH, OW, C_out]: the learner output, written if WRITE_STATS, read if Z_INPUT
    mean_part_ptr,  # [M tiles, C_out] fp32 per-tile means, if WRITE_STATS
    m2_part_ptr,  # [M tiles, C_out] fp32 per-tile sums of squared deviations, if WRITE_STATS
    M,
    H,
    W,
    C_in,
    OH,
    OW,
    C_out,
    C_B,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    w_stride_co,
    w_stride_ci,
    w_stride_kh,
    w_stride_kw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_CODER: tl.constexpr,
    HAS_ENCODER_BIAS: tl.constexpr,
    CODE_IN_MAIN_LOOP: tl.constexpr,
    WRITE_STATS: tl.constexpr,
    Z_INPUT: tl.constexpr,
    RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """``y = act((conv(x, w) * scale + shift) + relu(x_s @ we^T + be) @ wd)`` for one
    ``[BLOCK_M pixels, BLOCK_N output channels]`` tile, in one pass and one store.

    Learner: implicit GEMM, K = KH * KW * C_in, looping over the taps and BLOCK_K channel chunks.
    Coder: the input at the output's strided position, ``x_s``, is exactly the centre tap of the
    "same"-padded window, for any stride. When the whole code fits in one BLOCK_B chunk
    (``C_B <= BLOCK_B``), the encoder GEMM runs inside the main loop on the centre tap's tile, so
    x is read once. Otherwise the epilogue walks C_B in BLOCK_B chunks and re-reads x_s (from L1/L2:
    the main loop just touched it) once per chunk. The code never leaves registers.

    Training-mode BatchNorm runs this kernel twice. ``WRITE_STATS``: the learner alone, storing
    ``z = conv + bias`` and, per tile and channel, the mean and the sum of squared deviations of the
    tile's fp32 values (merged by the launcher with Chan's parallel formula: no cancellation at
    large means, deterministic order). ``Z_INPUT``: instead of the convolution the tile of z is
    loaded, then the usual epilogue applies the batch statistics as scale/shift, the coder and the
    activation, and stores y.

    Redundant work, on purpose: every output-channel tile (``program_id(1)``) recomputes the code
    of its pixels, ``C_out / BLOCK_N`` times in all. Sharing it would need the code in global memory
    or a cross-CTA exchange; with C_B <= C_in / 2 the encoder GEMM is at most 1 / (2 * KH * KW) of
    the learner's work per tile, so recomputing is the cheaper side.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < C_out
    n = offs_m // (OH * OW)
    pixel = offs_m % (OH * OW)
    oh = pixel // OW
    ow = pixel % OW
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_B)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    code = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    image = n.to(tl.int64) * H
    out_rows = offs_m.to(tl.int64) * C_out
    out_tile = mask_m[:, None] & mask_n[None, :]
    if Z_INPUT:
        acc = tl.load(z_ptr + out_rows[:, None] + offs_n[None, :], mask=out_tile, other=0.0).to(
            tl.float32
        )
    else:
        if CODE_IN_MAIN_LOOP:
            # The centre tap first: its x tiles are x_s and also feed the encoder (x is read once).
            CENTRE: tl.constexpr = (KH // 2) * KW + KW // 2
            row_s = ((image + oh * stride_h) * W + ow * stride_w) * C_in
            for k0 in range(0, C_in, BLOCK_K):
                ks = k0 + offs_k
                mask_k = ks < C_in
                a = tl.load(
                    x_ptr + row_s[:, None] + ks[None, :],
                    mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0,
                )
                b = tl.load(
                    w_ptr
                    + ks[:, None] * w_stride_ci
                    + offs_n[None, :] * w_stride_co
                    + (KH // 2) * w_stride_kh
                    + (KW // 2) * w_stride_kw,
                    mask=mask_k[:, None] & mask_n[None, :],
                    other=0.0,
                )
                acc = _mma(a, b, acc, INPUT_PRECISION, UPCAST_DOT)
                e = tl.load(
                    we_ptr + offs_b[None, :] * C_in + ks[:, None],
                    mask=mask_k[:, None] & (offs_b[None, :] < C_B),
                    other=0.0,
                )
                code = _mma(a, e, code, INPUT_PRECISION, UPCAST_DOT)
            LOOP_TAPS: tl.constexpr = KH * KW - 1
        else:
            CENTRE: tl.constexpr = KH * KW  # no tap is skipped
            LOOP_TAPS: tl.constexpr = KH * KW
        # One flat loop over (tap, channel chunk): a loop Triton can software-pipeline, and one set of
        # pointer tiles live at a time (unrolling the taps statically spilled at 255 registers).
        # The im2col addressing is hoisted: tap (kh, kw) reads, for output row m, the input pixel
        # (oh * s + dh, ow * s + dw) with dh = kh * dil - pad, whose offset is the row's own base
        # plus the scalar (dh * W + dw) * C_in, and whose padding test compares the row's
        # (oh * s, ow * s) with scalar bounds. Per row and step that is one 64-bit add and four
        # compares, where forming the pixel's offset afresh took 64-bit multiplies (87% of the
        # forward's mainloop was integer work in the sm_90 SASS). C_in stays the last factor of
        # every offset, so its divisibility by 16 still lets the loads vectorise.
        ih0 = oh * stride_h
        iw0 = ow * stride_w
        x_rows = x_ptr + ((image + ih0) * W + iw0) * C_in
        w_tile = w_ptr + offs_k[:, None] * w_stride_ci + offs_n[None, :] * w_stride_co
        k_chunks = tl.cdiv(C_in, BLOCK_K)
        loop_tap = pid_m * 0
        chunk = pid_m * 0
        for _ in range(0, LOOP_TAPS * k_chunks):
            tap = loop_tap + (loop_tap >= CENTRE).to(tl.int32)
            k0 = chunk * BLOCK_K
            kh = tap // KW
            kw = tap % KW
            dh = kh * dil_h - pad_h
            dw = kw * dil_w - pad_w
            inside = mask_m & (ih0 >= -dh) & (ih0 < H - dh) & (iw0 >= -dw) & (iw0 < W - dw)
            shift = (dh * W + dw).to(tl.int64) * C_in + k0
            ks = k0 + offs_k
            mask_k = ks < C_in
            a = tl.load(
                x_rows[:, None] + shift + offs_k[None, :],
                mask=inside[:, None] & mask_k[None, :],
                other=0.0,
            )
            b = tl.load(
                w_tile + (k0 * w_stride_ci + kh * w_stride_kh + kw * w_stride_kw),
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            acc = _mma(a, b, acc, INPUT_PRECISION, UPCAST_DOT)
            loop_tap, chunk = _next_step(loop_tap, chunk, k_chunks)

    if WRITE_STATS:
        if HAS_SHIFT:
            acc = acc + tl.load(shift_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        tl.store(
            z_ptr + out_rows[:, None] + offs_n[None, :], acc.to(z_ptr.dtype.element_ty), mask=out_tile
        )
        rows_here = tl.sum(mask_m.to(tl.float32), axis=0)
        tile_mean = tl.sum(tl.where(out_tile, acc, 0.0), axis=0) / rows_here
        deviation = tl.where(out_tile, acc - tile_mean[None, :], 0.0)
        stats = pid_m * C_out + offs_n
        tl.store(mean_part_ptr + stats, tile_mean, mask=mask_n)
        tl.store(m2_part_ptr + stats, tl.sum(deviation * deviation, axis=0), mask=mask_n)
    else:
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        if HAS_SHIFT:
            acc = acc + tl.load(shift_ptr + offs_n, mask=mask_n, other=0.0)[None, :]

        if HAS_CODER:
            row_s = ((image + oh * stride_h) * W + ow * stride_w) * C_in
            for b0 in range(0, C_B, BLOCK_B):
                bs = b0 + offs_b
                mask_b = bs < C_B
                if not CODE_IN_MAIN_LOOP:
                    code = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
                    for k0 in range(0, C_in, BLOCK_K):
                        ks = k0 + offs_k
                        mask_k = ks < C_in
                        a = tl.load(
                            x_ptr + row_s[:, None] + ks[None, :],
                            mask=mask_m[:, None] & mask_k[None, :],
                            other=0.0,
                        )
                        e = tl.load(
                            we_ptr + bs[None, :] * C_in + ks[:, None],
                            mask=mask_k[:, None] & mask_b[None, :],
                            other=0.0,
                        )
                        code = _mma(a, e, code, INPUT_PRECISION, UPCAST_DOT)
                if HAS_ENCODER_BIAS:
                    code_b = code + tl.load(be_ptr + bs, mask=mask_b, other=0.0).to(tl.float32)[None, :]
                else:
                    code_b = code
                # Code channels past C_B are zero: their encoder columns load as zeros, and an
                # Inf input times them is NaN, which the (NaN-keeping) ReLU would pass to the decode.
                code_b = tl.where(mask_b[None, :], _relu(code_b), 0.0)
                d = tl.load(
                    wd_ptr + bs[:, None] * C_out + offs_n[None, :],
                    mask=mask_b[:, None] & mask_n[None, :],
                    other=0.0,
                )
                acc = _mma(code_b.to(d.dtype), d, acc, INPUT_PRECISION, UPCAST_DOT)

        if RELU:
            acc = _relu(acc)
        tl.store(
            y_ptr + out_rows[:, None] + offs_n[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_n[None, :],
        )


@triton.jit
def _pnnh_coder_bwd_kernel(
    x_ptr,  # [N, H, W, C_in], if HAS_CODER
    we_ptr,  # [C_B, C_in], if HAS_CODER
    be_ptr,  # [C_B], if HAS_ENCODER_BIAS
    wd_ptr,  # [C_B, C_out] (W_D^T), if HAS_CODER
    dy_ptr,  # [M, C_out]
    y_ptr,  # [M, C_out], read for the output ReLU's mask when RELU
    z_ptr,  # [M, C_out] the learner's output before BatchNorm, if BN_REDUCE
    mean_ptr,  # [C_out] fp32 batch mean of z, if BN_REDUCE
    code_ptr,  # out: [M, C_B], relu(x_s @ we^T + be), if WRITE_CODE
    dpre_ptr,  # out: [M, C_B], gradient at the code's pre-activation, if HAS_CODER
    sum_dp_part_ptr,  # out: [M tiles, C_out] fp32 per-tile sums of dp, if BN_REDUCE
    sum_dpz_part_ptr,  # out: [M tiles, C_out] fp32 per-tile sums of dp * (z - mean), if BN_REDUCE
    M,
    H,
    W,
    C_in,
    OH,
    OW,
    C_out,
    C_B,
    stride_h,
    stride_w,
    HAS_CODER: tl.constexpr,
    HAS_ENCODER_BIAS: tl.constexpr,
    WRITE_CODE: tl.constexpr,
    BN_REDUCE: tl.constexpr,
    RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The first pass of the backward over the output pixels: what needs ``dp = dy * (y > 0)``
    before the convolution's gradients can run, in one read of dy and y.

    Coder (``HAS_CODER``): recompute the code of a ``[BLOCK_M, BLOCK_B]`` tile from x (it was never
    stored) and the gradient that reaches it, ``dpre = (dp @ wd^T) * (pre > 0)``, into a ``[M, C_B]``
    scratch that the input gradient reads (and, with ``WRITE_CODE``, the code itself for the
    decoder's weight gradient: only a trainable coder needs it).
    BatchNorm (``BN_REDUCE``, training mode): per tile and channel, the sums of dp and of
    ``dp * (z - mean)`` that BatchNorm's backward needs (finished by _bn_finalize_backward_kernel).
    Only the first code-channel tile (``program_id(1) == 0``) writes them.
    """
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_b = offs_b < C_B

    pre = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    if HAS_CODER:
        n = offs_m // (OH * OW)
        pixel = offs_m % (OH * OW)
        oh = pixel // OW
        ow = pixel % OW
        row_s = ((n.to(tl.int64) * H + oh * stride_h) * W + ow * stride_w) * C_in
        for k0 in range(0, C_in, BLOCK_K):
            ks = k0 + offs_k
            mask_k = ks < C_in
            a = tl.load(
                x_ptr + row_s[:, None] + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0
            )
            e = tl.load(
                we_ptr + offs_b[None, :] * C_in + ks[:, None],
                mask=mask_k[:, None] & mask_b[None, :],
                other=0.0,
            )
            pre = _mma(a, e, pre, INPUT_PRECISION, UPCAST_DOT)
        if HAS_ENCODER_BIAS:
            pre = pre + tl.load(be_ptr + offs_b, mask=mask_b, other=0.0).to(tl.float32)[None, :]

    dcode = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    out_rows = offs_m.to(tl.int64) * C_out
    for c0 in range(0, C_out, BLOCK_K):
        cs = c0 + offs_k
        mask_c = cs < C_out
        tile = mask_m[:, None] & mask_c[None, :]
        g = tl.load(dy_ptr + out_rows[:, None] + cs[None, :], mask=tile, other=0.0)
        if RELU:
            y = tl.load(y_ptr + out_rows[:, None] + cs[None, :], mask=tile, other=0.0)
            g = _relu_grad(g, y)
        if HAS_CODER:
            d = tl.load(
                wd_ptr + offs_b[None, :] * C_out + cs[:, None],
                mask=mask_c[:, None] & mask_b[None, :],
                other=0.0,
            )
            dcode = _mma(g, d, dcode, INPUT_PRECISION, UPCAST_DOT)
        if BN_REDUCE:  # noqa: SIM102 (a compile-time flag, then a runtime test: Triton keeps them apart)
            if pid_b == 0:
                z = tl.load(z_ptr + out_rows[:, None] + cs[None, :], mask=tile, other=0.0)
                mean = tl.load(mean_ptr + cs, mask=mask_c, other=0.0)
                dp = g.to(tl.float32)
                centred = tl.where(tile, z.to(tl.float32) - mean[None, :], 0.0)
                partial = pid_m * C_out + cs
                tl.store(sum_dp_part_ptr + partial, tl.sum(dp, axis=0), mask=mask_c)
                tl.store(sum_dpz_part_ptr + partial, tl.sum(dp * centred, axis=0), mask=mask_c)

    if HAS_CODER:
        scratch = offs_m.to(tl.int64)[:, None] * C_B + offs_b[None, :]
        tile_b = mask_m[:, None] & mask_b[None, :]
        if WRITE_CODE:
            code = _relu(pre).to(code_ptr.dtype.element_ty)
            tl.store(code_ptr + scratch, code, mask=tile_b)
        dpre = _relu_grad(dcode, pre)
        tl.store(dpre_ptr + scratch, dpre.to(dpre_ptr.dtype.element_ty), mask=tile_b)


@triton.jit
def _conv_wgrad_kernel(
    x_ptr,  # [N, H, W, C_x]: the image whose taps are reduced
    g_ptr,  # [M, C_g]: the gradient rows
    y_ptr,  # [M, C_g]: read for the output ReLU's mask when RELU
    out_ptr,  # out: [splits, KH, KW, C_x, C_g] float32 partial sums, unless STRIDED_OUT
    weight_grad_ptr,  # out if STRIDED_OUT: the gradient as the weight [C_g, C_x, KH, KW], its dtype
    M,
    m_per_split,
    H,
    W,
    C_x,
    OH,
    OW,
    C_g,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    out_stride_g,  # with STRIDED_OUT: strides of weight_grad
    out_stride_x,
    out_stride_kh,
    out_stride_kw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    RELU: tl.constexpr,
    STRIDED_OUT: tl.constexpr,
    DIRECT_ROWS: tl.constexpr,  # image pixel m is output pixel m's only tap (see below)
    SAME_ROWS: tl.constexpr,  # stride 1, the image as large as the output (see below)
    ROW_TAPS: tl.constexpr,  # a program reduces a whole kernel row's three taps (SAME_ROWS, KW 3)
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_X: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``out[kh, kw] = X_tap^T @ G``: a weight gradient as a reduction over all M output pixels.

    ``X_tap`` row m is the image pixel that tap (kh, kw) of output pixel m reads (zero in the
    padding). One kernel serves three gradients:

    - the learner's ``dW`` (X = x, G = dy masked by the output ReLU),
    - the encoder's ``dW_E^T`` (X = x through a 1x1 tap at the coder's stride, G = dpre),
    - the decoder's ``dW_D^T`` (X = the code scratch viewed as an OH x OW image, G = masked dy).

    Grid: (C_x tiles, C_g tiles, splits * KH * KW). Few channel tiles times nine taps is far too
    few programs for a GPU (a 64 -> 64 layer has nine), so M is split into ``m_per_split`` ranges,
    each program writes its partial sum, and _wgrad_reduce_kernel adds the partials in a fixed
    order: deterministic, no atomics. With one split (``STRIDED_OUT``) the program stores the
    gradient itself, in the weight's own layout and dtype: no partials, no copy.

    ``ROW_TAPS`` (SAME_ROWS, KW = 3): a program reduces the three taps of one kernel row, grid
    (C_x tiles, C_g tiles, splits * KH), with a gradient tile loaded (and masked) once for three
    image tiles one dilation apart: at 64 channels 48 FLOP per byte loaded instead of 32.
    """
    pid_x = tl.program_id(0)
    pid_g = tl.program_id(1)
    if ROW_TAPS:
        tl.static_assert(SAME_ROWS and KW == 3, "ROW_TAPS needs SAME_ROWS and three taps a row")
        split = tl.program_id(2) // KH
        kh = tl.program_id(2) % KH
        kw = 1  # the row's middle tap: its shift is the row's
    else:
        split = tl.program_id(2) // (KH * KW)
        tap = tl.program_id(2) % (KH * KW)
        kh = tap // KW
        kw = tap % KW
    offs_x = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    offs_g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    mask_x = offs_x < C_x
    mask_g = offs_g < C_g
    acc = tl.zeros((BLOCK_X, BLOCK_G), dtype=tl.float32)
    if ROW_TAPS:  # the row's first and last taps (acc holds the middle one)
        acc_first = tl.zeros((BLOCK_X, BLOCK_G), dtype=tl.float32)
        acc_last = tl.zeros((BLOCK_X, BLOCK_G), dtype=tl.float32)
    m_start = split * m_per_split
    m_end = tl.minimum(M, m_start + m_per_split)
    # Each row's (image, output row, output column) is divided out of its pixel index once and then
    # advanced by BLOCK_M pixels a step with one carry per coordinate (the step's own coordinates
    # are below OW and OH), not divided afresh: two run-time divisions per row and step were most
    # of this mainloop's integer work in the sm_90 SASS.
    # DIRECT_ROWS (a 1x1 tap, stride 1, no padding, the image as large as the output): output pixel
    # m reads image pixel m, and none of this is needed. SAME_ROWS (stride 1, the image as large as
    # the output): tap (kh, kw) of pixel m reads image pixel m + (dh * W + dw), and the coordinates
    # serve the padding test alone.
    offs_r = tl.arange(0, BLOCK_M)
    if not DIRECT_ROWS:
        first = m_start + offs_r
        image_row = (first // (OH * OW)).to(tl.int64) * H  # the image's first input row
        oh = (first % (OH * OW)) // OW
        ow = first % OW
        step_n = BLOCK_M // (OH * OW)
        step_oh = (BLOCK_M % (OH * OW)) // OW
        step_ow = BLOCK_M % OW
    # Where a step's rows are consecutive pixels (DIRECT_ROWS, SAME_ROWS, and always the gradient's),
    # a tile's addresses are one 64-bit offset per step (its first pixel, carried) plus 32-bit
    # offsets fixed for the whole loop (a 64-bit multiply per row and step was a fifth of this
    # mainloop's SASS).
    x_offsets = offs_x[:, None] + (offs_r * C_x)[None, :]
    g_offsets = (offs_r * C_g)[:, None] + offs_g[None, :]
    step_row = m_start.to(tl.int64)  # the step's first pixel
    shift = 0
    if SAME_ROWS:
        dh = kh * dil_h - pad_h
        dw = kw * dil_w - pad_w
        shift = dh * W + dw  # tap (kh, kw) of pixel m is image pixel m + shift
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + offs_r
        mask_m = offs_m < m_end
        if DIRECT_ROWS:
            a_tile = x_ptr + step_row * C_x + x_offsets
            inside = mask_m
        elif SAME_ROWS:
            a_tile = x_ptr + (step_row + shift) * C_x + x_offsets
            rows_inside = mask_m & (oh >= -dh) & (oh < H - dh)
            inside = rows_inside & (ow >= -dw) & (ow < W - dw)
        else:
            ih = oh * stride_h - pad_h + kh * dil_h
            iw = ow * stride_w - pad_w + kw * dil_w
            inside = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            row = ((image_row + ih) * W + iw) * C_x
            a_tile = x_ptr + row[None, :] + offs_x[:, None]
        a = tl.load(a_tile, mask=mask_x[:, None] & inside[None, :], other=0.0)
        tile = mask_m[:, None] & mask_g[None, :]
        rows_g = step_row * C_g
        g = tl.load(g_ptr + rows_g + g_offsets, mask=tile, other=0.0)
        if RELU:
            y = tl.load(y_ptr + rows_g + g_offsets, mask=tile, other=0.0)
            g = _relu_grad(g, y)
        acc = _mma(a, g.to(a.dtype), acc, INPUT_PRECISION, UPCAST_DOT)
        if ROW_TAPS:  # the same gradient tile against the image one pixel to each side
            a = _row_neighbour(a_tile - dil_w * C_x, mask_x, rows_inside, ow, dw - dil_w, W)
            acc_first = _mma(a, g.to(a.dtype), acc_first, INPUT_PRECISION, UPCAST_DOT)
            a = _row_neighbour(a_tile + dil_w * C_x, mask_x, rows_inside, ow, dw + dil_w, W)
            acc_last = _mma(a, g.to(a.dtype), acc_last, INPUT_PRECISION, UPCAST_DOT)
        step_row += BLOCK_M
        if not DIRECT_ROWS:
            ow += step_ow
            carry = (ow >= OW).to(tl.int32)
            ow -= carry * OW
            oh += step_oh + carry
            carry = (oh >= OH).to(tl.int32)
            oh -= carry * OH
            if not SAME_ROWS:
                image_row += (step_n + carry) * H
    if ROW_TAPS:
        _store_wgrad_tap(acc_first, out_ptr, weight_grad_ptr, split, kh, 0, offs_x, offs_g, mask_x,
                         mask_g, C_x, C_g, out_stride_g, out_stride_x, out_stride_kh, out_stride_kw,
                         KH, KW, STRIDED_OUT)  # fmt: skip
        _store_wgrad_tap(acc_last, out_ptr, weight_grad_ptr, split, kh, 2, offs_x, offs_g, mask_x,
                         mask_g, C_x, C_g, out_stride_g, out_stride_x, out_stride_kh, out_stride_kw,
                         KH, KW, STRIDED_OUT)  # fmt: skip
    _store_wgrad_tap(acc, out_ptr, weight_grad_ptr, split, kh, kw, offs_x, offs_g, mask_x, mask_g,
                     C_x, C_g, out_stride_g, out_stride_x, out_stride_kh, out_stride_kw, KH, KW,
                     STRIDED_OUT)  # fmt: skip


@triton.jit
def _row_neighbour(a_tile, mask_x, rows_inside, ow, dw, W):
    """The image tile of a tap ``dw`` columns from the pixels (``a_tile``: its addresses), zero
    where that column is padding."""
    inside = rows_inside & (ow >= -dw) & (ow < W - dw)
    return tl.load(a_tile, mask=mask_x[:, None] & inside[None, :], other=0.0)


@triton.jit
def _store_wgrad_tap(
    acc,
    out_ptr,
    weight_grad_ptr,
    split,
    kh,
    kw,
    offs_x,
    offs_g,
    mask_x,
    mask_g,
    C_x,
    C_g,
    out_stride_g,
    out_stride_x,
    out_stride_kh,
    out_stride_kw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDED_OUT: tl.constexpr,
):
    """One tap's sum: into the weight's gradient in its own layout and dtype (``STRIDED_OUT``), or
    into the split's float32 partials."""
    if STRIDED_OUT:
        out = (
            weight_grad_ptr
            + offs_g[None, :] * out_stride_g
            + offs_x[:, None] * out_stride_x
            + kh * out_stride_kh
            + kw * out_stride_kw
        )
        grad = acc.to(weight_grad_ptr.dtype.element_ty)
        tl.store(out, grad, mask=mask_x[:, None] & mask_g[None, :])
    else:
        tap = kh * KW + kw
        out = out_ptr + ((split * KH * KW + tap) * C_x + offs_x)[:, None] * C_g + offs_g[None, :]
        tl.store(out, acc, mask=mask_x[:, None] & mask_g[None, :])


@triton.jit
def _wgrad_reduce_kernel(
    out_ptr,  # [splits, KH, KW, C_x, C_g] float32 partials
    weight_grad_ptr,  # out: the gradient, as the weight [C_g, C_x, KH, KW] with the strides below
    splits,
    C_x,
    C_g,
    out_stride_g,
    out_stride_x,
    out_stride_kh,
    out_stride_kw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The weight gradient from _conv_wgrad_kernel's partials: summed over the splits in a fixed
    order (deterministic) and stored once, in the weight's own layout and dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    elements = KH * KW * C_x * C_g
    mask = offs < elements
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(0, splits):
        acc += tl.load(out_ptr + split * elements + offs, mask=mask, other=0.0)
    g = offs % C_g
    x = (offs // C_g) % C_x
    tap = offs // (C_g * C_x)
    target = (
        g * out_stride_g + x * out_stride_x + (tap // KW) * out_stride_kh + (tap % KW) * out_stride_kw
    )
    tl.store(weight_grad_ptr + target, acc.to(weight_grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pnnh_conv_dgrad_kernel(
    dy_ptr,  # [N, OH, OW, C_out]
    y_ptr,  # [N, OH, OW, C_out], read for the output ReLU's mask when RELU
    scale_ptr,  # [C_out] fp32, if HAS_SCALE
    w_ptr,  # the weight [C_out, C_in, KH, KW], read through its strides (w_stride_*)
    dpre_ptr,  # [M, C_B] coder scratch, if HAS_CODER
    we_ptr,  # [C_B, C_in]
    dx_ptr,  # out: [N, H, W, C_in]
    NHW,
    H,
    W,
    C_in,
    OH,
    OW,
    C_out,
    C_B,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    w_stride_co,
    w_stride_ci,
    w_stride_kh,
    w_stride_kw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_CODER: tl.constexpr,
    RELU: tl.constexpr,
    UNIT_STRIDE: tl.constexpr,  # stride 1 both ways: the gradient's addressing hoisted
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dX for a ``[BLOCK_M input pixels, BLOCK_N input channels]`` tile, both paths, one store.

    Learner: the transposed convolution of ``dz = dy * (y > 0) * scale`` (eval; training BatchNorm
    passes its dz, stored by _bn_dz_kernel, with no mask and no scale) as an implicit GEMM over taps
    and C_out chunks; a tap contributes to input pixel (ih, iw) only where ``ih + pad - kh * dil``
    is a non-negative multiple of the stride (masked loads skip the rest, so a stride-2 layer spends
    3/4 of its tap iterations on masked tiles: simple, not optimal).
    Coder: an input pixel on the stride grid is x_s of output pixel (ih / s, iw / s) and receives
    ``dpre @ we`` from the scratch the coder kernel wrote.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < NHW
    mask_n = offs_n < C_in
    n = offs_m // (H * W)
    pixel = offs_m % (H * W)
    ih = pixel // W
    iw = pixel % W
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    image = n.to(tl.int64) * OH
    # One flat, pipelinable loop over (tap, output-channel chunk), as in the forward kernel, with
    # (tap, chunk) carried from step to step (_next_step).
    c_chunks = tl.cdiv(C_out, BLOCK_K)
    if UNIT_STRIDE:
        # Tap (kh, kw) reads the gradient at (ih + sh, iw + sw), sh = pad - kh * dil: the row's own
        # offset plus a scalar, bounded by scalar compares (the forward's hoisting).
        g_rows = ((image + ih) * OW + iw) * C_out
    tap = pid_m * 0
    chunk = pid_m * 0
    for step in range(0, KH * KW * c_chunks):
        if KH * KW == 1:  # one tap: the step is the chunk (nothing carried; it spilled on sm_80)
            chunk = step
        c0 = chunk * BLOCK_K
        kh = tap // KW
        kw = tap % KW
        if UNIT_STRIDE:
            sh = pad_h - kh * dil_h
            sw = pad_w - kw * dil_w
            ok = mask_m & (ih >= -sh) & (ih < OH - sh) & (iw >= -sw) & (iw < OW - sw)
            shift = (sh * OW + sw).to(tl.int64) * C_out + c0
            g_offsets = g_rows[:, None] + shift + offs_k[None, :]
        else:
            num_h = ih + pad_h - kh * dil_h
            num_w = iw + pad_w - kw * dil_w
            # Clamp before dividing: the interpreter (numpy) floors negative quotients, GPUs truncate.
            num_h_safe = tl.maximum(num_h, 0)
            num_w_safe = tl.maximum(num_w, 0)
            oh = num_h_safe // stride_h
            ow = num_w_safe // stride_w
            ok = mask_m & (num_h >= 0) & (num_w >= 0) & (oh < OH) & (ow < OW)
            ok = ok & (num_h_safe % stride_h == 0) & (num_w_safe % stride_w == 0)
            row = ((image + oh) * OW + ow) * C_out
            g_offsets = row[:, None] + (c0 + offs_k)[None, :]
        cs = c0 + offs_k
        mask_c = cs < C_out
        tile = ok[:, None] & mask_c[None, :]
        g = tl.load(dy_ptr + g_offsets, mask=tile, other=0.0)
        if RELU:
            y = tl.load(y_ptr + g_offsets, mask=tile, other=0.0)
            g = _relu_grad(g, y)
        if HAS_SCALE:
            g = g * tl.load(scale_ptr + cs, mask=mask_c, other=0.0)[None, :]
        b = tl.load(
            w_ptr
            + offs_n[None, :] * w_stride_ci
            + cs[:, None] * w_stride_co
            + kh * w_stride_kh
            + kw * w_stride_kw,
            mask=mask_c[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = _mma(g.to(b.dtype), b, acc, INPUT_PRECISION, UPCAST_DOT)
        if KH * KW > 1:
            tap, chunk = _next_step(tap, chunk, c_chunks)
    if HAS_CODER:
        on_grid = mask_m & (ih % stride_h == 0) & (iw % stride_w == 0)
        row_s = (image + ih // stride_h) * OW + iw // stride_w
        for b0 in range(0, C_B, BLOCK_K):
            bs = b0 + offs_k
            mask_b = bs < C_B
            dpre = tl.load(
                dpre_ptr + row_s[:, None] * C_B + bs[None, :],
                mask=on_grid[:, None] & mask_b[None, :],
                other=0.0,
            )
            e = tl.load(
                we_ptr + bs[:, None] * C_in + offs_n[None, :],
                mask=mask_b[:, None] & mask_n[None, :],
                other=0.0,
            )
            acc = _mma(dpre.to(e.dtype), e, acc, INPUT_PRECISION, UPCAST_DOT)
    tl.store(
        dx_ptr + (offs_m.to(tl.int64) * C_in)[:, None] + offs_n[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )
