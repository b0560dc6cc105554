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
