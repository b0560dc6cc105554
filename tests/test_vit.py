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
