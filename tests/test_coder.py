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
    coder = PNNHCoder(c_in, c_b, out_channels=c_out, tied=tied)
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
    first = PNNHCoder(10, 5)
    torch.manual_seed(3)
    second = PNNHCoder(10, 5)
    torch.testing.assert_close(first.encoder_weight, second.encoder_weight, rtol=0, atol=0)
    assert first.init_reconstruction_error == second.init_reconstruction_error


def test_meta_device_skips_pretraining():
    coder = PNNHCoder(64, 32, device="meta")
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
