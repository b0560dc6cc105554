"""The converter (pnnh_kernels.convert) and torchvision's state_dict keys, on the tests' own
torchvision-compatible ResNets (tests/torchvision_like.py) and, where it imports, on torchvision."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from pnnh_kernels import FusedPNNHConv
from pnnh_kernels.convert import convert
from pnnh_kernels.models import count_parameters, resnet18, resnet34, resnet50
from tests import torchvision_like


def _torchvision():
    """torchvision.models where it imports (the GPU machine), else None."""
    try:
        return importlib.import_module("torchvision.models")
    except Exception:
        return None


SOURCES = [pytest.param(torchvision_like, id="torchvision_like")]
if _torchvision() is not None:
    SOURCES.append(pytest.param(_torchvision(), id="torchvision"))


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm state, so that a norm copied wrongly (or not at all) shows."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                shape = module.running_mean.shape
                module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(shape, generator=generator) * 0.1)
                module.num_batches_tracked.fill_(7)
    return model


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("depth", ["resnet18", "resnet50", "wide_resnet50_2"])
def test_the_identity_conversion_reproduces_the_original(source, depth):
    # Shortcuts kept, no coders: the converted model must compute what the original computes; the
    # test that every weight and BatchNorm entry was copied exactly.
    torch.manual_seed(0)
    original = _randomise_norms(getattr(source, depth)(num_classes=10)).double().eval()
    twin, summary = convert(original, "residual", backend="torch")
    twin.eval()
    x = torch.randn(2, 3, 48, 40, dtype=torch.float64)
    torch.testing.assert_close(twin(x), original(x), rtol=0, atol=1e-10)
    assert summary.count("kept") == 0
    assert summary.count("removed") == 0
    assert summary.parameters_after == summary.parameters_before == count_parameters(original)
    fused = [m for m in twin.modules() if isinstance(m, FusedPNNHConv)]
    norms = [m for m in twin.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == len(fused)  # every BatchNorm now lives inside a fused layer


def test_the_identity_check_fails_on_a_wrong_copy(monkeypatch):
    # The check above can fail: a conversion that forgets the BatchNorm's running variance.
    from pnnh_kernels import pnnh_conv

    def forgetful(source, target):
        target.load_state_dict(
            {**source.state_dict(), "running_var": torch.ones_like(source.running_var)}
        )

    monkeypatch.setattr(pnnh_conv, "_copy_batch_norm", forgetful)
    original = _randomise_norms(torchvision_like.resnet18(num_classes=10)).double().eval()
    twin, _ = convert(original, "residual", backend="torch")
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    assert (twin.eval()(x) - original(x)).abs().max() > 1e-3


def test_resnet50_converts_to_pnnh_and_plain_twins(capsys):
    original = torchvision_like.resnet50(num_classes=10)
    pnnh, summary = convert(original, "pnnh")
    plain, plain_summary = convert(original, "plain")
    print(summary)
    table = capsys.readouterr().out
    assert "Conversion to pnnh: 17 converted, 0 kept as they were, 16 shortcuts removed" in table
    assert "| layer1.0.downsample | removed | projection (1x1 conv + BN) shortcut |" in table
    assert (
        "| layer2.1 | converted | Bottleneck: conv1+bn1+relu: coder C_B=256 (untied, shared by 3); "
        "conv2+bn2+relu: coder C_B=64 (tied, shared by 3); conv3+bn3+relu: coder C_B=64 (untied, "
        "shared by 4) |" in table
    ), table
    assert "| conv1 | converted | stem conv1+bn1+relu: no coder |" in table
    layers = [m for m in pnnh.modules() if isinstance(m, FusedPNNHConv)]
    assert len(layers) == 1 + 16 * 3  # stem + three per bottleneck, no shortcuts
    assert all(layer.activation == "relu" for layer in layers)
    assert all(layer.coder is not None for layer in layers[1:])
    assert not any(m.coder for m in plain.modules() if isinstance(m, FusedPNNHConv))
    shortcuts = sum(
        m[0].weight.numel() + 2 * m[1].weight.numel()
        for m in original.modules()
        if isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[1], nn.BatchNorm2d)
    )
    assert plain_summary.parameters_after == plain_summary.parameters_before - shortcuts
    # The default coders are fixed: stored, not trained. The summary leads with what is trained.
    assert summary.parameters_after == plain_summary.parameters_after
    coders = {id(m.coder): m.coder for m in layers if m.coder is not None}
    assert summary.stored_after == plain_summary.stored_after + sum(
        count_parameters(c) for c in coders.values()
    )
    assert f"trained parameters {summary.parameters_before:,} -> {summary.parameters_after:,}" in (
        summary.table()
    )
    x = torch.randn(2, 3, 32, 32)
    assert pnnh.eval()(x).shape == plain.eval()(x).shape == (2, 10)
    # A converted layer's learner and norm are the original's.
    torch.testing.assert_close(layers[6].weight, original.layer1[1].conv3.weight)


def test_grouped_convolutions_are_kept_or_refused():
    original = torchvision_like.resnext50_32x4d(num_classes=10)
    twin, summary = convert(original, "pnnh")
    assert summary.count("kept") == 16
    assert "grouped convolution (groups=32)" in summary.rows[1].detail
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(twin.eval()(x), original.eval()(x))  # only the stem was fused
    with pytest.raises(NotImplementedError, match=r"layer1.0: cannot convert: grouped convolution"):
        convert(original, "pnnh", unsupported="refuse")


def test_a_vgg_like_stack_converts():
    stack = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=0), nn.BatchNorm2d(32),
        nn.Conv2d(32, 32, 3, padding=1, groups=32),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5),
    )  # fmt: skip
    _randomise_norms(stack).double().eval()
    identity, summary = convert(stack, "residual", backend="torch")
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(identity.eval()(x), stack(x), rtol=0, atol=1e-10)
    assert summary.count("converted") == 4
    assert summary.count("kept") == 1  # the depthwise conv
    pnnh, pnnh_summary = convert(stack, "pnnh")
    coders = [m.coder for m in pnnh.modules() if isinstance(m, FusedPNNHConv)]
    assert coders[0] is None  # the first conv reads the pixels: the stem, no coder
    assert "| 0 | converted | stem (reads the input) conv+bn+relu: no coder |" in pnnh_summary.table()
    assert coders[1] is not None
    assert coders[2] is not None
    assert coders[1] is not coders[2]  # 16 -> 16 and 16 -> 32 differ
    assert coders[3] is None  # padding 0 is not "same"-like: no coder
    assert "depthwise convolution (groups=32)" in pnnh_summary.table()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="variant"):
        convert(torchvision_like.resnet18(), "dense")
    with pytest.raises(ValueError, match="unsupported"):
        convert(torchvision_like.resnet18(), unsupported="skip")
    with pytest.raises(ValueError, match="model: nothing to convert"):
        convert(nn.Sequential(nn.Linear(3, 4)))


# -- torchvision keys ----------------------------------------------------------------------------

OURS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("depth", list(OURS))
def test_torchvision_state_dicts_load_into_our_residual_resnets(source, depth):
    torch.manual_seed(0)
    theirs = _randomise_norms(getattr(source, depth)(num_classes=10)).double().eval()
    ours = OURS[depth]("residual", num_classes=10).double()
    assert ours.load_torchvision_state_dict(theirs.state_dict()) == ([], [])
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(ours.eval()(x), theirs(x), rtol=0, atol=1e-10)
    # And back: our weights under torchvision's keys load into torchvision's model.
    fresh = getattr(source, depth)(num_classes=10).double().eval()
    fresh.load_state_dict(ours.torchvision_state_dict())
    torch.testing.assert_close(fresh(x), theirs(x), rtol=0, atol=1e-10)


def test_a_wrong_state_dict_is_refused_with_the_keys():
    ours = resnet18("residual", num_classes=10)
    theirs = torchvision_like.resnet34(num_classes=10).state_dict()
    with pytest.raises(ValueError, match=r"unexpected \d+ keys \(layer1.2.conv1.weight"):
        ours.load_torchvision_state_dict(theirs)
    wrong_classes = torchvision_like.resnet18(num_classes=100).state_dict()
    with pytest.raises(ValueError, match=r"shape mismatches \(fc.weight: \(100, 512\)"):
        ours.load_torchvision_state_dict(wrong_classes)


def test_a_pnnh_resnet_takes_the_learners_of_a_torchvision_checkpoint():
    pnnh = resnet18("pnnh", num_classes=10)
    theirs = torchvision_like.resnet18(num_classes=10)
    missing, unused = pnnh.load_torchvision_state_dict(theirs.state_dict(), strict=False)
    assert missing == []
    assert unused
    assert all(".downsample." in key for key in unused)
    deeper = resnet34("pnnh", num_classes=10)
    missing, _ = deeper.load_torchvision_state_dict(theirs.state_dict(), strict=False)
    assert "layer1.2.conv1.weight" in missing  # a shallower checkpoint: said, not hidden
    torch.testing.assert_close(pnnh.stages[1][0].layers[0].weight, theirs.layer2[0].conv1.weight)
    # Strict: the message names the real cause (no shortcuts here) and the fix.
    with pytest.raises(ValueError, match=r"no shortcut connections.*strict=False"):
        pnnh.load_torchvision_state_dict(theirs.state_dict())
    # Anything else wrong as well: the general message with the keys.
    with pytest.raises(ValueError, match=r"unexpected \d+ keys"):
        deeper.load_torchvision_state_dict(theirs.state_dict())


def test_an_eval_mode_model_converts_to_an_eval_mode_twin():
    original = _randomise_norms(torchvision_like.resnet18(num_classes=10)).double().eval()
    original.layer1[0].conv1.weight.requires_grad_(False)
    twin, _ = convert(original, "residual", backend="torch")
    assert not any(m.training for m in twin.modules())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(twin(x), original(x), rtol=0, atol=1e-10)  # no .eval() needed
    assert not twin.layer1[0].layers[0].weight.requires_grad
    assert twin.layer1[0].layers[1].weight.requires_grad
    # Training, with one BatchNorm frozen in eval mode (fine-tuning): it stays frozen.
    original.train()
    original.layer1[0].bn1.eval()
    twin, _ = convert(original, "residual", backend="torch")
    assert twin.layer1[0].training
    assert twin.layer1[0].layers[0].training
    assert not twin.layer1[0].layers[0].norm.training
    assert twin.layer1[0].layers[1].norm.training


class KuangliuBlock(nn.Module):
    """A CIFAR ResNet block of another common layout: ``shortcut``, not ``downsample``."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()  # kuangliu's identity
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def test_an_unrecognised_block_is_kept_whole_or_refused():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        KuangliuBlock(8, 16, 2),
    )  # fmt: skip
    twin, summary = convert(model, "pnnh")
    assert twin[1].shortcut[0].__class__ is nn.Conv2d  # its shortcut was not fused nor given a coder
    assert summary.count("kept") == 1
    assert "a residual block of a layout the converter does not recognise" in summary.table()
    with pytest.raises(NotImplementedError, match="3: cannot convert: KuangliuBlock"):
        convert(model, "pnnh", unsupported="refuse")


def test_a_registered_block_layout_converts_kuangliu_resnets(monkeypatch):
    from pnnh_kernels import convert as convert_module
    from pnnh_kernels.convert import KUANGLIU_BASIC, BlockLayout, register_block_layout

    monkeypatch.setattr(convert_module, "_registered_layouts", {})
    register_block_layout(KuangliuBlock, KUANGLIU_BASIC)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        KuangliuBlock(8, 8, 1), KuangliuBlock(8, 16, 2), KuangliuBlock(16, 16, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3),
    )  # fmt: skip
    _randomise_norms(model).double().eval()
    twin, summary = convert(model, "residual", backend="torch")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(twin.eval()(x), model(x), rtol=0, atol=1e-10)  # copied exactly
    assert summary.count("kept") == 0
    pnnh, pnnh_summary = convert(model, "pnnh")
    assert pnnh_summary.count("removed") == 3  # two identity shortcuts and one projection
    assert "| 4.shortcut | removed | projection (1x1 conv + BN) shortcut |" in pnnh_summary.table()
    layers = [m for m in pnnh.modules() if isinstance(m, FusedPNNHConv)]
    assert len(layers) == 1 + 3 * 2
    assert layers[1].coder is layers[2].coder  # 8 -> 8 within a block and across
    assert pnnh(x).shape == (2, 3)
    with pytest.raises(TypeError, match="layout: expected a BlockLayout"):
        register_block_layout(KuangliuBlock, "shortcut")
    with pytest.raises(ValueError, match="as many norms as convs"):
        BlockLayout(("conv1", "conv2"), ("bn1",))


class KuangliuNet(nn.Module):
    """kuangliu's CIFAR ResNet shape: the stem is a direct attribute, not in a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(KuangliuBlock(8, 8, 1), KuangliuBlock(8, 8, 1))
        self.linear = nn.Linear(8, 3)

    def forward(self, x):
        out = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return self.linear(out.mean((2, 3)))


def test_the_stem_is_the_first_conv_wherever_it_sits(monkeypatch):
    from pnnh_kernels import convert as convert_module
    from pnnh_kernels.convert import KUANGLIU_BASIC

    monkeypatch.setattr(convert_module, "_registered_layouts", {KuangliuBlock: KUANGLIU_BASIC})
    pnnh, _ = convert(KuangliuNet(), "pnnh")
    assert type(pnnh.conv1) is nn.Conv2d  # the stem: not in a Sequential, left as it was
    layers = [m for m in pnnh.modules() if isinstance(m, FusedPNNHConv)]
    assert len(layers) == 4
    assert all(layer.coder is not None for layer in layers)  # none mistaken for the stem
    # Converting part of a network: its first conv does not read pixels.
    part, _ = convert(KuangliuNet().layer1, "pnnh", first_conv_is_stem=False)
    assert all(m.coder is not None for m in part.modules() if isinstance(m, FusedPNNHConv))
    whole, _ = convert(KuangliuNet().layer1, "pnnh")
    assert next(m.coder is None for m in whole.modules() if isinstance(m, FusedPNNHConv))


def test_a_torchvision_block_with_other_parts_is_kept():
    model = torchvision_like.resnet18(num_classes=10)
    model.layer1[0].relu = nn.SiLU()
    model.layer2[0].bn1 = nn.BatchNorm2d(128, affine=False)
    twin, summary = convert(model, "residual")
    kept = {row.path: row.detail for row in summary.rows if row.action == "kept"}
    assert kept["layer1.0"] == "BasicBlock.relu is SiLU, not nn.ReLU"
    assert "affine=False" in kept["layer2.0"]
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(twin.eval()(x), model.eval()(x))


def test_inplace_converts_a_top_level_sequential_itself():
    stack = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    twin, _ = convert(stack, "plain", inplace=True)
    assert twin is stack
    assert isinstance(stack[0], FusedPNNHConv)
    with pytest.raises(ValueError, match="coder_channels: 4 given with variant='residual'"):
        convert(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), "residual", coder_channels=4)
