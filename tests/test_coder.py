"""PNNHCoder: initialisations, tying, gradient averaging."""

from __future__ import annotations

import pytest
import torch

from pnnh_kernels import PNNHCoder
from pnnh_kernels.coder import scale_gradient


def reconstruction_error(coder: PNNHCoder, samples: int = 4096) -> float:
    x = torch.randn(samples, coder.in_channels).relu()
    target = coder.reconstruction_target(x)
    with torch.no_grad():
        return float((coder(x) - target).pow(2).sum() / target.pow(2).sum())


def test_identity_init_passes_the_first_code_channels_exactly():
    coder = PNNHCoder(8, 3, init="identity")
    x = torch.rand(5, 8)  # non-negative, like a post-ReLU input
    out = coder(x)
    torch.testing.assert_close(out[:, :3], x[:, :3], rtol=0, atol=0)
    assert torch.equal(out[:, 3:], torch.zeros(5, 5))
    assert coder.init_reconstruction_error is None


def test_identity_init_untied_embeds_input_in_wider_output():
    coder = PNNHCoder(4, 4, out_channels=6, tied=False, init="identity")
    x = torch.rand(3, 4)
    torch.testing.assert_close(coder(x), coder.reconstruction_target(x), rtol=0, atol=0)


@pytest.mark.parametrize(("c_in", "c_b", "c_out", "tied"), [(16, 8, 16, True), (12, 6, 20, False)])
def test_rectified_normal_init_beats_identity_and_he_and_reports_its_error(c_in, c_b, c_out, tied):
    coder = PNNHCoder(c_in, c_b, out_channels=c_out, tied=tied, init="rectified_normal")
    reported = coder.init_reconstruction_error
    measured = reconstruction_error(coder)
    identity = reconstruction_error(PNNHCoder(c_in, c_b, out_channels=c_out, tied=tied, init="identity"))
    he = reconstruction_error(PNNHCoder(c_in, c_b, out_channels=c_out, tied=tied, init="he"))
    assert reported is not None
    assert abs(reported - measured) < 0.05  # the held-out report agrees with a fresh sample
    assert measured < identity
    assert measured < he


def test_rectified_normal_init_is_reproducible_under_manual_seed():
    torch.manual_seed(3)
    first = PNNHCoder(10, 5, init="rectified_normal")
    torch.manual_seed(3)
    second = PNNHCoder(10, 5, init="rectified_normal")
    torch.testing.assert_close(first.encoder_weight, second.encoder_weight, rtol=0, atol=0)
    assert first.init_reconstruction_error == second.init_reconstruction_error


def test_meta_device_skips_pretraining():
    coder = PNNHCoder(64, 32, device="meta", init="rectified_normal")
    assert coder.encoder_weight.is_meta
    assert coder.init_reconstruction_error is None


def test_he_init_statistics():
    coder = PNNHCoder(256, 128, init="he")
    std = float(coder.encoder_weight.detach().std())
    assert abs(std - (2 / 256) ** 0.5) < 0.1 * (2 / 256) ** 0.5
    assert torch.equal(coder.encoder_bias, torch.zeros(128))


def test_tied_coder_has_no_decoder_parameter_and_untied_has_one():
    tied = PNNHCoder(6, 3, init="he")
    untied = PNNHCoder(6, 3, out_channels=9, tied=False, init="he")
    assert [name for name, _ in tied.named_parameters()] == ["encoder_weight", "encoder_bias"]
    assert tuple(untied.decoder_weight.shape) == (9, 3)
    torch.testing.assert_close(tied.decoder(), tied.encoder_weight.t())


def test_gradient_scale_follows_uses_and_switch():
    coder = PNNHCoder(4, 2, init="he")
    assert coder.gradient_scale == 1.0
    for _ in range(4):
        coder.attach()
    assert coder.gradient_scale == 0.25
    coder.average_shared_gradient = False
    assert coder.gradient_scale == 1.0


def test_scale_gradient_is_identity_forward_and_scales_backward():
    weight = torch.randn(3, 4, requires_grad=True)
    scaled = scale_gradient(weight, 0.125)
    assert torch.equal(scaled, weight)
    scaled.sum().backward()
    torch.testing.assert_close(weight.grad, torch.full((3, 4), 0.125))


@pytest.mark.parametrize(
    ("c_in", "c_b", "c_out", "tied"),
    [(16, 8, 16, True), (12, 5, 12, True), (12, 6, 20, False), (20, 6, 12, False)],
)
def test_rectified_isometry_is_the_fixed_default_with_gain_one(c_in, c_b, c_out, tied):
    coder = PNNHCoder(c_in, c_b, out_channels=c_out, tied=tied)
    assert coder.init == "rectified_isometry"
    assert not coder.trainable
    assert all(not p.requires_grad for p in coder.parameters())
    encoder = coder.encoder_weight.detach()
    # Independent of the implementation: non-negative, orthonormal rows, each input channel in one.
    assert bool((encoder >= 0).all())
    torch.testing.assert_close(encoder @ encoder.t(), torch.eye(c_b), rtol=0, atol=1e-6)
    assert bool(((encoder > 0).sum(0) == 1).all())
    # On non-negative inputs the tied path is an orthogonal projection: idempotent, never longer.
    x = torch.rand(64, c_in)
    with torch.no_grad():
        path = coder.decoder().detach() @ encoder
        assert float(torch.linalg.matrix_norm(path, 2)) == pytest.approx(1.0, abs=1e-6)
        if tied:
            out = coder(x)
            torch.testing.assert_close(coder(out), out, rtol=0, atol=1e-5)
            assert bool((out.norm(dim=1) <= x.norm(dim=1) + 1e-5).all())
        shared = min(c_in, c_out)
        assert torch.equal(coder.decoder()[shared:], torch.zeros(c_out - shared, c_b))
    # Half width: pair means of rectified Gaussians lose (x1 - x2)^2 / 2 per pair, in expectation
    # Var(relu(N)) = 1/2 - 1/(2 pi), against E[x1^2 + x2^2] = 1: a relative error of 0.341.
    if c_b * 2 == c_in and tied:
        expected = (1 - 1 / torch.pi) / 2
        assert coder.reconstruction_error(samples=20000) == pytest.approx(expected, abs=0.01)


def test_rectified_isometry_full_width_is_an_identity_on_rectified_inputs():
    coder = PNNHCoder(6, 6)
    x = torch.rand(9, 6)
    torch.testing.assert_close(coder(x), x, rtol=0, atol=0)
    wide = PNNHCoder(6, 9)  # code units beyond C_in stay zero
    torch.testing.assert_close(wide(x), x, rtol=0, atol=0)
    assert torch.equal(wide.encoder_weight[6:], torch.zeros(3, 6))


def test_rectified_isometry_builds_on_meta_and_is_cheap_at_resnet_widths():
    meta = PNNHCoder(2048, 1024, device="meta")
    assert meta.encoder_weight.is_meta
    # Closed form, no pretraining: the widest ResNet-50 coder is one scatter.
    coder = PNNHCoder(2048, 1024, out_channels=512, tied=False)
    assert coder.init_reconstruction_error is None
    assert torch.count_nonzero(coder.encoder_weight) == 2048


def test_trainable_coder_learns_and_fixed_coder_gets_no_gradient():
    trained = PNNHCoder(8, 4, trainable=True)
    assert trained.trainable
    assert all(p.requires_grad for p in trained.parameters())
    trained(torch.rand(5, 8)).sum().backward()
    assert trained.encoder_weight.grad is not None
    fixed = PNNHCoder(8, 4)
    tensors = fixed.tensors()
    assert not tensors.encoder_weight.requires_grad
    assert tensors.encoder_weight is fixed.encoder_weight  # no gradient hook on a fixed coder
