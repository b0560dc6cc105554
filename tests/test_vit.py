"""The ViT in three variants (pnnh_kernels.models.vit), its training and its study."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from pnnh_kernels.analysis.probes import dissipation_report
from pnnh_kernels.commands import main as pnnh_main
from pnnh_kernels.models import count_parameters, vit, vit_small, vit_tiny
from pnnh_kernels.models.vit import Sublayer
from tests.test_training import write_folder


def _small(variant: str, **kwargs):
    return vit(variant, image_size=8, patch_size=2, in_channels=1, dim=16, depth=3, heads=2, **kwargs)


def _silence_bodies(model) -> None:
    """Zero the attention and MLP output projections: every sublayer body then returns 0."""
    with torch.no_grad():
        for block in model.blocks:
            for linear in (block.attention.body.proj, block.mlp.body.fc2):
                linear.weight.zero_()
                linear.bias.zero_()


def test_the_three_variants_differ_only_in_the_connection():
    torch.manual_seed(0)
    tokens = torch.randn(2, 16, 16)  # [batch, tokens, dim]
    outputs = {}
    for variant in ("residual", "plain", "pnnh"):
        model = _small(variant)
        _silence_bodies(model)
        sublayer = model.blocks[0].attention
        outputs[variant] = sublayer(tokens)
        if variant == "pnnh":
            encoder = sublayer.coder.encoder_weight.detach()  # tied: W_D = W_E^T
            bias = sublayer.coder.encoder_bias.detach()
            expected = torch.relu(tokens @ encoder.t() + bias) @ encoder  # of x, not LN(x)
            torch.testing.assert_close(outputs[variant], expected)
    torch.testing.assert_close(outputs["residual"], tokens)  # x + 0
    assert torch.count_nonzero(outputs["plain"]) == 0  # 0: nothing carries x


def test_parameters_and_coder_sharing():
    residual, plain, pnnh = (_small(v) for v in ("residual", "plain", "pnnh"))
    assert count_parameters(residual) == count_parameters(plain)
    coders = {id(m.coder) for m in pnnh.modules() if isinstance(m, Sublayer)}
    assert len(coders) == 2  # one for the attention sublayers, one for the MLP sublayers
    assert pnnh.blocks[0].attention.coder.num_uses == 3
    assert count_parameters(pnnh) - count_parameters(plain) == 2 * (8 * 16 + 8)  # C_B = 8, tied
    assert not any(p.requires_grad for p in pnnh.blocks[0].attention.coder.parameters())
    assert copy.deepcopy(pnnh.blocks[1].mlp).coder.num_uses == 1


@pytest.mark.parametrize("variant", ["residual", "plain", "pnnh"])
def test_forward_backward_and_presets(variant):
    model = _small(variant, num_classes=7)
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    out = model(x)
    assert out.shape == (4, 7)
    F.cross_entropy(out, torch.arange(4)).backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    tiny = vit_tiny(variant)
    assert (tiny.blocks[0].attention.body.heads, len(tiny.blocks)) == (3, 12)
    assert len(vit_small(variant, depth=2).blocks) == 2
    with pytest.raises(ValueError, match="patch_size: 3 must divide image_size 8"):
        vit(variant, image_size=8, patch_size=3)
    with pytest.raises(ValueError, match="input: expected 8x8 images"):
        model(torch.randn(1, 1, 16, 16))


def test_dissipation_report_sees_the_gelus():
    stats = dissipation_report(_small("pnnh"), torch.randn(8, 1, 8, 8))
    assert [s.nonlinearity for s in stats] == ["gelu"] * 3
    assert all(0 < s.survival < 1 for s in stats)


def test_pnnh_train_runs_a_vit_on_cifar_shapes_and_image_folders(tmp_path):
    common = ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--precision", "fp32",
              "--synthetic-train-size", "16", "--synthetic-test-size", "8"]  # fmt: skip
    pnnh_main(["train", "--model", "vit_tiny", "--data", "synthetic", "--image-size", "32",
               "--out", str(tmp_path / "cifar"), *common])  # fmt: skip
    summary = json.loads((tmp_path / "cifar" / "summary.json").read_text())
    assert summary["model"] == "vit_tiny"
    assert summary["epochs_completed"] == 1
    write_folder(tmp_path / "data", classes=2, per_class=4)
    pnnh_main(["train", "--model", "vit_tiny", "--variant", "plain", "--data", "folder",
               "--data-dir", str(tmp_path / "data"), "--image-size", "32",
               "--out", str(tmp_path / "folder"), *common])  # fmt: skip
    assert json.loads((tmp_path / "folder" / "summary.json").read_text())["num_classes"] == 2


def test_the_study_runs_end_to_end(tmp_path):
    from pnnh_kernels.analysis import vit_study

    vit_study.main(["--tiny", "--out", str(tmp_path)])
    table = json.loads((tmp_path / "results.json").read_text())["table"]
    assert {(row["depth"], row["variant"]) for row in table} == {
        (d, v) for d in (1, 2) for v in ("residual", "plain", "pnnh")
    }
    assert "| 2 | pnnh |" in (tmp_path / "README.md").read_text()
    # A second invocation reuses the finished runs.
    before = (tmp_path / "runs" / "pnnh_d2_s0.json").read_text()
    vit_study.main(["--tiny", "--out", str(tmp_path)])
    assert (tmp_path / "runs" / "pnnh_d2_s0.json").read_text() == before


# Coders for a signed stream (issue #26).
def test_the_signed_coder_passes_both_signs_as_a_gain_one_projection():
    from pnnh_kernels.models.vit import SignedCoder

    torch.manual_seed(0)
    coder = SignedCoder(16, 8)
    p = coder.projection.detach()
    torch.testing.assert_close(p @ p.t(), torch.eye(8), atol=1e-5, rtol=0)  # orthonormal rows
    x = torch.randn(64, 16)
    out = coder(x)
    torch.testing.assert_close(out, x @ p.t() @ p, atol=1e-5, rtol=1e-5)  # P^T P x, no sign lost
    torch.testing.assert_close(coder(out), out, atol=1e-5, rtol=1e-5)  # a projection
    assert (out.norm(dim=1) <= x.norm(dim=1) + 1e-5).all()  # gain at most 1
    assert not coder.projection.requires_grad
    assert SignedCoder(16, 8, trainable=True).projection.requires_grad
    identity = SignedCoder(16, 16, identity=True)
    assert torch.equal(identity(x), x)
    with pytest.raises(ValueError, match="rank: at most dim 16"):
        SignedCoder(16, 17)


def test_the_identity_control_is_the_residual_vit():
    kwargs = {"image_size": 8, "patch_size": 2, "in_channels": 1, "dim": 16, "depth": 3, "heads": 2}
    torch.manual_seed(1)
    control = vit("pnnh", coder_kind="identity", **kwargs)
    residual = vit("residual", **kwargs)
    weights = {k: v for k, v in control.state_dict().items() if "projection" not in k}
    residual.load_state_dict(weights)
    images = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(control(images), residual(images), atol=1e-5, rtol=1e-5)


def test_coders_on_the_mlp_sublayers_only_and_layer_scale():
    from pnnh_kernels.analysis.vit_study import SETTINGS, model_kwargs

    kwargs = {"image_size": 8, "patch_size": 2, "in_channels": 1, "dim": 16, "depth": 2, "heads": 2}
    model = vit("pnnh", coder_kind="signed", coder_sublayers="mlp", layer_scale=0.25, **kwargs)
    for block in model.blocks:
        assert block.attention.residual
        assert block.attention.signed is None
        assert not block.mlp.residual
        assert block.mlp.signed is not None
        assert torch.equal(block.mlp.scale.detach(), torch.full((16,), 0.25))
    # the depth-scaled rule of the CNN's BatchNorm scale over the sublayers with a coder
    assert model_kwargs("pnnh, signed, depth-scaled", 24)[1]["layer_scale"] == pytest.approx(
        (16 / 48) ** 0.5
    )
    assert model_kwargs("pnnh, signed, depth-scaled", 4)[1]["layer_scale"] == 1.0
    for setting in SETTINGS:  # every setting builds and runs
        variant, settings_kwargs = model_kwargs(setting, 2)
        assert vit(variant, **kwargs, **settings_kwargs)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="coder_kind: expected"):
        vit("pnnh", coder_kind="absolute", **kwargs)
    with pytest.raises(ValueError, match="coder_sublayers: expected"):
        vit("pnnh", coder_sublayers="attention", **kwargs)
    with pytest.raises(ValueError, match="setting: expected one of"):
        model_kwargs("pnnh, unsigned", 2)
