"""An independent float64 re-derivation of the PNNH layer, written from the formula in docs/pnnh.md.

It shares no code with pnnh_kernels: the convolution is a sum over kernel taps of einsums on a padded
input, the coder is two einsums, BatchNorm is written out. Tests compare every backend with it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _relu(t: Tensor) -> Tensor:
    # PyTorch's ReLU: NaN stays NaN, -Inf gives 0; the gradient is dropped where t <= 0 (at exactly
    # 0 too: torch.clamp would pass it through) and passed on elsewhere, NaN t included. A where,
    # not t * (t > 0): that turns -Inf into NaN and blocks the gradient of a NaN t.
    return torch.where(t <= 0, torch.zeros_like(t), t)


def conv2d_by_taps(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    padding_end: Optional[tuple[int, int]] = None,
) -> Tensor:
    """``padding``: zeros before the image (top, left); ``padding_end``: after it (bottom, right),
    the same as ``padding`` when None."""
    n, _, h, w = x.shape
    out_channels, _, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ph_end, pw_end = padding if padding_end is None else padding_end
    out_h = (h + ph + ph_end - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + pw + pw_end - dw * (kw - 1) - 1) // sw + 1
    padded = F.pad(x, (pw, pw_end, ph, ph_end))
    out = x.new_zeros(n, out_channels, out_h, out_w)
    for i in range(kh):
        for j in range(kw):
            patch = padded[
                :,
                :,
                i * dh : i * dh + sh * (out_h - 1) + 1 : sh,
                j * dw : j * dw + sw * (out_w - 1) + 1 : sw,
            ]
            out = out + torch.einsum("nchw,oc->nohw", patch, weight[:, :, i, j])
    if bias is not None:
        out = out + bias[None, :, None, None]
    return out


def batch_norm_by_formula(
    z: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor,
    bias: Tensor,
    training: bool,
    eps: float,
) -> Tensor:
    if training:
        mean = z.mean(dim=(0, 2, 3))
        var = z.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = running_mean, running_var
    normalised = (z - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + eps)
    return normalised * weight[None, :, None, None] + bias[None, :, None, None]


def pnnh_conv2d_reference(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    encoder_weight: Optional[Tensor],
    encoder_bias: Optional[Tensor],
    decoder_weight: Optional[Tensor],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    activation: Optional[str],
    norm: Optional[dict] = None,
) -> Tensor:
    z = conv2d_by_taps(x, weight, bias, stride, padding, dilation)
    if norm is not None:
        z = batch_norm_by_formula(z, **norm)
    if encoder_weight is not None:
        sampled = x[:, :, :: stride[0], :: stride[1]]
        code = torch.einsum("nchw,bc->nbhw", sampled, encoder_weight)
        if encoder_bias is not None:
            code = code + encoder_bias[None, :, None, None]
        code = _relu(code)
        decoder = encoder_weight.t() if decoder_weight is None else decoder_weight
        z = z + torch.einsum("nbhw,ob->nohw", code, decoder)
    return _relu(z) if activation == "relu" else z


def pnnh_linear_reference(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    encoder_weight: Optional[Tensor],
    encoder_bias: Optional[Tensor],
    decoder_weight: Optional[Tensor],
    activation: Optional[str],
) -> Tensor:
    out = torch.einsum("...c,oc->...o", x, weight)
    if bias is not None:
        out = out + bias
    if encoder_weight is not None:
        code = torch.einsum("...c,bc->...b", x, encoder_weight)
        if encoder_bias is not None:
            code = code + encoder_bias
        decoder = encoder_weight.t() if decoder_weight is None else decoder_weight
        out = out + torch.einsum("...b,ob->...o", _relu(code), decoder)
    return _relu(out) if activation == "relu" else out


def random_layer_tensors(
    c_in: int,
    c_out: int,
    c_b: int,
    tied: bool,
    dtype: torch.dtype,
    kernel: Optional[int] = None,
) -> dict[str, Optional[Tensor]]:
    """Random weights of a PNNH layer, scaled to keep activations O(1): a conv learner when
    ``kernel`` is given, a linear one otherwise; no coder when ``c_b == 0``."""
    learner_shape = (c_out, c_in) if kernel is None else (c_out, c_in, kernel, kernel)
    fan_in = c_in * (1 if kernel is None else kernel**2)
    tensors: dict[str, Optional[Tensor]] = {
        "weight": torch.randn(learner_shape, dtype=dtype) / fan_in**0.5,
        "bias": torch.randn(c_out, dtype=dtype),
        "encoder_weight": None,
        "encoder_bias": None,
        "decoder_weight": None,
    }
    if c_b:
        tensors["encoder_weight"] = torch.randn(c_b, c_in, dtype=dtype) / c_in**0.5
        tensors["encoder_bias"] = torch.randn(c_b, dtype=dtype) * 0.1
        if not tied:
            tensors["decoder_weight"] = torch.randn(c_out, c_b, dtype=dtype) / c_b**0.5
    return tensors


def relu_deciding_like(pre: Tensor, tested_output: Tensor, dtype: torch.dtype) -> Tensor:
    """The reference's output ReLU, deciding on/off itself except within rounding of zero.

    Where a pre-activation lies within the dtype's rounding band of zero (``TOLERANCES[dtype]``
    times the largest reference output after the ReLU: the scale assert_matches gives the output's
    tolerance, so the band never exceeds what the comparison already allows), a low-precision
    op may decide either way, and the gradient then differs by a whole term; there, and only there,
    the decision is taken from the op under test. Everywhere else the reference decides, so an
    epilogue that switches outputs on or off wrongly fails on the output itself.
    """
    reference = pre.detach()
    largest_output = float(reference.clamp(min=0).max()) if reference.numel() else 0.0
    band = TOLERANCES[dtype] * max(largest_output, 1.0)
    tested_on = tested_output.detach().to(pre.dtype) > 0
    on = torch.where(reference.abs() <= band, tested_on, reference > 0)
    return pre * on


TOLERANCES = {
    # dtype: error allowed against the float64 reference, relative to the reference's largest
    # magnitude. fp32: sums of a few hundred products accumulate ~1e-7 relative error per term, far
    # below 1e-5. bf16/fp16: the inputs are rounded before the reference sees them, so what remains
    # is the op's own rounding of intermediates, each up to one unit in the last place (2^-8 for
    # bf16, 2^-11 for fp16): a gradient of the fused op passes through up to four roundings (the
    # code or its gradient before an MMA, the masked output gradient, the result), hence
    # 4 * 2^-8 ~ 1.6e-2 for bf16 and 4 * 2^-11 ~ 2e-3, rounded up to 5e-3, for fp16.
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 1.6e-2,
}


def backends_for(dtype: torch.dtype, op: str = "conv2d", device: str = "cpu") -> list[str]:
    """The registered backends that can run ``op`` on ``device`` in ``dtype`` (Triton runs in its
    interpreter on the CPU: conftest turns it on)."""
    from pnnh_kernels.backends import backend_named, registered_backends

    return [
        name
        for name in registered_backends()
        if backend_named(name).unavailable_reason(torch.device(device), dtype, op) is None
    ]


def assert_matches(
    actual: Tensor,
    expected: Tensor,
    dtype: torch.dtype,
    what: str,
    baseline: Optional[Tensor] = None,
) -> None:
    """Compare with a tolerance relative to the reference's largest magnitude; on failure say where.

    ``baseline``: PyTorch's own result in ``dtype``. Then, FlashAttention's rule for low precision,
    the error may also reach twice PyTorch's own error against the reference. NaN or inf in
    ``actual`` always fails, even where the reference has them.
    """
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    actual64 = actual.detach().to(torch.float64)
    bad = ~torch.isfinite(actual64)
    if bad.any():
        positions = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} non-finite values, first at {positions}")
    scale = max(float(expected.abs().max()), 1.0)
    tolerance = TOLERANCES[dtype] * scale
    if baseline is not None:
        tolerance = max(tolerance, 2 * float((baseline.detach().double() - expected).abs().max()))
    error = (actual64 - expected).abs()
    mismatched = error > tolerance
    if mismatched.any():
        positions = mismatched.nonzero()[:5].tolist()
        raise AssertionError(
            f"{what}: {int(mismatched.sum())}/{error.numel()} elements off by more than "
            f"{tolerance:.3g} (max error {float(error.max()):.3g}), first at {positions}"
        )
