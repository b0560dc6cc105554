"""ResNet-18/34/50 in three variants from one definition: residual, plain and PNNH.

Every conv + BatchNorm (+ ReLU) of torchvision's ResNet is one FusedPNNHConv with ``norm="batch"``
and ``bias=False``, so the three variants differ only in two things:

- ``"residual"``: the standard ResNet; the last layer of a block has no activation, the block adds
  its shortcut (identity, or 1x1 conv + BN when the shape changes) and applies the ReLU. With the
  ImageNet stem and 1000 classes the parameter counts equal torchvision's.
- ``"plain"``: the same network with the shortcuts removed (every layer ends in its own ReLU).
- ``"pnnh"``: plain + coders. Within a stage, layers of identical shape share one tied coder (in
  bottleneck blocks one per layer position); layers that change width or stride get untied coders.

The stem and the classifier have no coder: the stem sees raw pixels, not the rectified activations
the coder is initialised for.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from pnnh_kernels.coder import DEFAULT_CODER_INIT
from pnnh_kernels.models.coder_bank import CoderBank, check_variant, init_coder_layer_norms
from pnnh_kernels.pnnh_conv import FusedPNNHConv

STEMS = ("imagenet", "cifar")


def _conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int,
    *,
    activation: Optional[str],
    coder_bank: CoderBank,
    key: object = None,
) -> FusedPNNHConv:
    coder = coder_bank.coder(in_channels, out_channels, stride, key)
    return FusedPNNHConv(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=(kernel_size - 1) // 2,
        bias=False,
        coder_channels=None if coder is not None else 0,
        coder=coder,
        norm="batch",
        activation=activation,
    )


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return _conv_bn(
        in_channels, out_channels, 1, stride, activation=None, coder_bank=CoderBank(enabled=False)
    )


class _Block(nn.Module):
    expansion = 1

    def __init__(self, layers: list[FusedPNNHConv], shortcut: Optional[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.shortcut = shortcut
        # A module, not torch.relu, so that analysis hooks (dissipation_report) see this ReLU.
        self.relu = nn.ReLU() if shortcut is not None else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(x)
        if self.shortcut is None:
            return out
        return self.relu(out + self.shortcut(x))


class BasicBlock(_Block):
    """Two 3x3 layers. All 3x3 layers of one shape in a stage share one coder."""

    expansion = 1

    def __init__(
        self, in_channels: int, width: int, stride: int, variant: str, coder_bank: CoderBank
    ) -> None:
        residual = variant == "residual"
        layers = [
            _conv_bn(in_channels, width, 3, stride, activation="relu", coder_bank=coder_bank),
            _conv_bn(width, width, 3, 1, activation=None if residual else "relu", coder_bank=coder_bank),
        ]
        super().__init__(layers, _shortcut(in_channels, width, stride) if residual else None)


class Bottleneck(_Block):
    """1x1 -> 3x3 (stride) -> 1x1 (x4 width), torchvision's v1.5 layout. One coder per position."""

    expansion = 4

    def __init__(
        self, in_channels: int, width: int, stride: int, variant: str, coder_bank: CoderBank
    ) -> None:
        residual = variant == "residual"
        out_channels = width * self.expansion
        layers = [
            _conv_bn(in_channels, width, 1, 1, activation="relu", coder_bank=coder_bank, key=0),
            _conv_bn(width, width, 3, stride, activation="relu", coder_bank=coder_bank, key=1),
            _conv_bn(
                width,
                out_channels,
                1,
                1,
                activation=None if residual else "relu",
                coder_bank=coder_bank,
                key=2,
            ),
        ]
        super().__init__(layers, _shortcut(in_channels, out_channels, stride) if residual else None)


class ResNet(nn.Module):
    """A ResNet whose variant is chosen at construction (see the module docstring)."""

    def __init__(
        self,
        block: type[_Block],
        blocks_per_stage: list[int],
        variant: str = "residual",
        stem: str = "imagenet",
        num_classes: int = 1000,
        in_channels: int = 3,
        coder_init: str = DEFAULT_CODER_INIT,
        coder_trainable: bool = False,
        average_shared_gradient: bool = True,
        coder_layer_norm_scale: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.variant = check_variant(variant)
        if stem not in STEMS:
            raise ValueError(f"stem: expected one of {STEMS}, got {stem!r}")
        no_coder = CoderBank(enabled=False)
        if stem == "imagenet":
            self.stem = nn.Sequential(
                _conv_bn(in_channels, 64, 7, 2, activation="relu", coder_bank=no_coder),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        else:
            self.stem = _conv_bn(in_channels, 64, 3, 1, activation="relu", coder_bank=no_coder)
        stages = []
        channels = 64
        for index, (width, count) in enumerate(zip((64, 128, 256, 512), blocks_per_stage)):
            bank = CoderBank(
                enabled=variant == "pnnh",
                init=coder_init,
                trainable=coder_trainable,
                average_shared_gradient=average_shared_gradient,
            )
            blocks = []
            for position in range(count):
                stride = 2 if index > 0 and position == 0 else 1
                blocks.append(block(channels, width, stride, variant, bank))
                channels = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, FusedPNNHConv):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        init_coder_layer_norms(self, coder_layer_norm_scale)

    def load_torchvision_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True):
        """Load a torchvision ResNet's state_dict (see pnnh_kernels.models.torchvision_keys)."""
        from pnnh_kernels.models.torchvision_keys import load_torchvision_state_dict

        return load_torchvision_state_dict(self, state_dict, strict)

    def torchvision_state_dict(self) -> dict[str, Tensor]:
        """The weights under torchvision's keys (coders left out)."""
        from pnnh_kernels.models.torchvision_keys import to_torchvision_state_dict

        return to_torchvision_state_dict(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18(
    variant: str = "residual", stem: str = "imagenet", num_classes: int = 1000, **kwargs
) -> ResNet:
    """ResNet-18 (basic blocks 2-2-2-2; 11,689,512 parameters as torchvision's with the ImageNet
    stem, 1000 classes and ``variant="residual"``).

    ``variant``: ``"residual"`` (torchvision's), ``"plain"`` (shortcuts removed) or ``"pnnh"``
    (plain + coders shared within a stage); ``stem``: ``"imagenet"`` (7x7 stride 2 + max-pool) or
    ``"cifar"`` (3x3 stride 1, no pool); ``num_classes``: the classifier's width. Keyword arguments
    go to :class:`ResNet`: ``in_channels``, ``coder_init`` and ``coder_trainable`` (the coders'
    initialisation, fixed by default), ``average_shared_gradient``, ``coder_layer_norm_scale`` (the
    initial BatchNorm scale of the layers with a coder; None: depth-scaled). Every layer is a
    FusedPNNHConv with ``backend="auto"``; ``model.load_torchvision_state_dict`` loads torchvision's
    weights.
    """
    return ResNet(BasicBlock, [2, 2, 2, 2], variant, stem, num_classes, **kwargs)


def resnet34(
    variant: str = "residual", stem: str = "imagenet", num_classes: int = 1000, **kwargs
) -> ResNet:
    """ResNet-34 (basic blocks 3-4-6-3; 21,797,672 parameters as torchvision's with the ImageNet
    stem, 1000 classes and ``variant="residual"``).


    Arguments as :func:`resnet18`.
    """
    return ResNet(BasicBlock, [3, 4, 6, 3], variant, stem, num_classes, **kwargs)


def resnet50(
    variant: str = "residual", stem: str = "imagenet", num_classes: int = 1000, **kwargs
) -> ResNet:
    """ResNet-50 (bottleneck blocks 3-4-6-3; 25,557,032 parameters as torchvision's with the
    ImageNet stem, 1000 classes and ``variant="residual"``).


    Arguments as :func:`resnet18`.
    """
    return ResNet(Bottleneck, [3, 4, 6, 3], variant, stem, num_classes, **kwargs)
