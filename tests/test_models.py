"""ResNets in three variants, deep_cnn, coder sharing and parameter counting."""

from __future__ import annotations

import pytest
import torch

from pnnh_kernels import FusedPNNHConv, PNNHCoder
from pnnh_kernels.models import (
    count_parameters,
    deep_cnn,
    parameter_breakdown,
    resnet18,
    resnet34,
    resnet50,
)

TORCHVISION_PARAMETERS = {resnet18: 11_689_512, resnet34: 21_797_672, resnet50: 25_557_032}


def coders_of(model: torch.nn.Module) -> list[PNNHCoder]:
    unique = {}
    for module in model.modules():
        if isinstance(module, FusedPNNHConv) and module.coder is not None:
            unique[id(module.coder)] = module.coder
    return list(unique.values())


@pytest.mark.parametrize("constructor", list(TORCHVISION_PARAMETERS), ids=lambda f: f.__name__)
def test_residual_resnets_have_torchvisions_parameter_counts(constructor):
    with torch.device("meta"):
        model = constructor(variant="residual", num_classes=1000)
    assert count_parameters(model) == TORCHVISION_PARAMETERS[constructor]


@pytest.mark.parametrize("constructor", list(TORCHVISION_PARAMETERS), ids=lambda f: f.__name__)
def test_plain_is_residual_without_shortcuts_and_pnnh_is_plain_plus_coders(constructor):
    with torch.device("meta"):
        residual = constructor(variant="residual")
        plain = constructor(variant="plain")
        pnnh = constructor(variant="pnnh")
    shortcut_parameters = sum(
        p.numel()
        for block in residual.stages.modules()
        if hasattr(block, "shortcut") and block.shortcut is not None
        for p in block.shortcut.parameters()
    )
    assert count_parameters(plain) == count_parameters(residual) - shortcut_parameters
    parts = parameter_breakdown(pnnh)
    assert parts["other"] == count_parameters(plain)
    assert parts["coder"] == sum(count_parameters(c) for c in coders_of(pnnh))
    # The default coders are fixed: a PNNH net trains exactly the plain net's parameters.
    assert parts["trainable"] == count_parameters(plain)
    with torch.device("meta"):
        trained = constructor(variant="pnnh", coder_trainable=True)
    assert parameter_breakdown(trained)["trainable"] == parts["total"]


def test_building_a_pnnh_resnet50_runs_no_coder_pretraining(monkeypatch):
    # The build cost was the coders' pretraining (21.7 s of 22 on 2 cores); the default coders are
    # closed form. Counted, not timed: any pretraining step fails the build here.
    def refuse(self):
        raise AssertionError("a default coder ran its pretraining")

    monkeypatch.setattr(PNNHCoder, "_pretrain_on_rectified_normal", refuse)
    model = resnet50(variant="pnnh")
    coders = coders_of(model)
    assert coders
    assert all(c.init == "rectified_isometry" and not c.trainable for c in coders)


def test_resnet18_pnnh_coder_sharing_layout():
    with torch.device("meta"):
        model = resnet18(variant="pnnh")
    coders = coders_of(model)
    # One tied coder per stage width, one untied coder per downsampling layer (stages 2-4).
    tied = sorted((c.in_channels, c.num_uses) for c in coders if c.tied)
    untied = sorted((c.in_channels, c.out_channels, c.num_uses) for c in coders if not c.tied)
    assert tied == [(64, 4), (128, 3), (256, 3), (512, 3)]
    assert untied == [(64, 128, 1), (128, 256, 1), (256, 512, 1)]
    assert all(c.code_channels == c.in_channels // 2 for c in coders)
    assert model.stem[0].coder is None


def test_resnet50_pnnh_has_one_coder_per_bottleneck_position_per_shape():
    with torch.device("meta"):
        model = resnet50(variant="pnnh")
    first_stage = model.stages[0]
    positions = [[block.layers[i].coder for block in first_stage] for i in range(3)]
    # Blocks 2 and 3 of a stage have identical shapes at each position: same coder.
    for coders in positions:
        assert coders[1] is coders[2]
    assert len({id(c) for c in positions[0] + positions[1] + positions[2]}) <= 6
    assert not positions[2][1].tied  # 64 -> 256 changes width


@pytest.mark.parametrize("variant", ["residual", "plain", "pnnh"])
@pytest.mark.parametrize("constructor", [resnet18, resnet50], ids=lambda f: f.__name__)
def test_resnet_forward_backward_on_small_input(variant, constructor):
    model = constructor(
        variant=variant, stem="cifar", num_classes=10, coder_init="he", coder_trainable=True
    )
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_imagenet_stem_shapes():
    model = resnet18(variant="plain", num_classes=7)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


@pytest.mark.parametrize("variant", ["residual", "plain", "pnnh"])
def test_deep_cnn_variants(variant):
    model = deep_cnn(12, 8, variant, coder_init="he", coder_trainable=True)
    out = model(torch.randn(3, 1, 8, 8))
    assert out.shape == (3, 10)
    coders = coders_of(model)
    if variant == "pnnh":
        assert len(coders) == 1
        assert coders[0].num_uses == 12
        assert coders[0].gradient_scale == pytest.approx(1 / 12)
    else:
        assert coders == []


def test_deep_cnn_per_layer_coders_and_summed_gradient_option():
    per_layer = deep_cnn(5, 8, "pnnh", coder_init="he", coder_trainable=True, coder_sharing="per_layer")
    assert len(coders_of(per_layer)) == 5
    summed = deep_cnn(5, 8, "pnnh", coder_init="he", coder_trainable=True, average_shared_gradient=False)
    assert coders_of(summed)[0].gradient_scale == 1.0


def test_deep_cnn_reaches_depth_128():
    model = deep_cnn(128, 4, "pnnh", coder_init="he", coder_trainable=True)
    assert len(model.layers) == 128
    assert torch.isfinite(model(torch.randn(2, 1, 8, 8))).all()


def test_invalid_model_arguments():
    with pytest.raises(ValueError, match="variant"):
        deep_cnn(4, 8, "densenet")
    with pytest.raises(ValueError, match="stem"):
        resnet18(stem="mnist")
    with pytest.raises(ValueError, match="coder_sharing"):
        deep_cnn(4, 8, "pnnh", coder_sharing="none")
    with pytest.raises(ValueError, match="depth"):
        deep_cnn(0, 8, "pnnh")


def test_coder_layers_start_with_a_depth_scaled_norm_scale():
    deep = deep_cnn(64, 4, "pnnh")
    # gamma^2 * L = 16: the branches add what a 16-layer net's add at gamma = 1.
    assert all(bool((layer.norm.weight == 0.5).all()) for layer in deep.layers)
    assert bool((deep.stem.norm.weight == 1).all())  # no coder: untouched
    shallow = deep_cnn(9, 4, "pnnh")
    assert all(bool((layer.norm.weight == 1).all()) for layer in shallow.layers)
    residual = deep_cnn(64, 4, "residual")
    assert all(bool((block.layer.norm.weight == 1).all()) for block in residual.layers)
    chosen = deep_cnn(64, 4, "pnnh", coder_layer_norm_scale=0.25)
    assert all(bool((layer.norm.weight == 0.25).all()) for layer in chosen.layers)
    with torch.device("meta"):
        model = resnet50(variant="pnnh")
    layers = [m for m in model.modules() if isinstance(m, FusedPNNHConv) and m.coder is not None]
    assert len(layers) == 48
