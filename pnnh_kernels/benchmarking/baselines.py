"""The cuDNN ResNet layer and block that a PNNH layer and block replace, as the benchmarks and the
traffic ledger build them."""

from __future__ import annotations

import torch
from torch import nn


class ResNetLayer(nn.Module):
    """What a PNNH layer replaces in a ResNet: relu(bn(conv3x3(x)) + x), cuDNN through PyTorch."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)) + x)


class ResNetBasicBlock(nn.Module):
    """relu(bn(conv(relu(bn(conv(x))))) + x)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class _EagerBasicBlock(nn.Module):
    """torchvision's BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != width:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, width, 1, stride, bias=False), nn.BatchNorm2d(width)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class EagerResNet18(nn.Module):
    """torchvision's ResNet-18 with the CIFAR stem (a 3x3 convolution, no max-pool), cuDNN through
    PyTorch: the residual net a PNNH ResNet-18 training step is compared with. ``width`` scales every
    stage (64 is torchvision's); the op sequence, and so the host cost of a step, does not depend
    on it."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        blocks: list[nn.Module] = []
        channels = width
        for index, stage_width in enumerate((width, 2 * width, 4 * width, 8 * width)):
            for position in range(2):
                stride = 2 if index > 0 and position == 0 else 1
                blocks.append(_EagerBasicBlock(channels, stage_width, stride))
                channels = stage_width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))
