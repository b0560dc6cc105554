"""deep_cnn: a stack of ``depth`` identical 3x3 layers, for depth sweeps of the three variants."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from pnnh_kernels.coder import DEFAULT_CODER_INIT
from pnnh_kernels.models.coder_bank import CoderBank, check_variant, init_coder_layer_norms
from pnnh_kernels.pnnh_conv import FusedPNNHConv
from pnnh_kernels.validation import check_positive_int

CODER_SHARINGS = ("shared", "per_layer")


class ResidualLayer(nn.Module):
    """``relu(bn(conv(x)) + x)``: one 3x3 layer with an identity shortcut."""

    def __init__(self, layer: FusedPNNHConv) -> None:
        super().__init__()
        self.layer = layer
        # A module, not torch.relu, so that analysis hooks (dissipation_report) see this ReLU.
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.layer(x) + x)


class DeepCNN(nn.Module):
    """stem (3x3 conv + BN + ReLU, no coder) -> ``depth`` 3x3 width->width layers -> pool -> linear.

    ``variant`` "plain": conv + BN + ReLU; "residual": each layer adds its input before the ReLU;
    "pnnh": plain + coders, one shared by all layers (``coder_sharing="shared"``) or one per layer,
    tied (default) or untied (``coder_tied=False``); ``coder_layer_norm_scale`` is the initial
    BatchNorm scale of the layers with a coder (None: min(1, 4 / sqrt(depth)), see coder_bank).
    """

    def __init__(
        self,
        depth: int,
        width: int = 16,
        variant: str = "pnnh",
        in_channels: int = 1,
        num_classes: int = 10,
        coder_channels: Optional[int] = None,
        coder_init: str = DEFAULT_CODER_INIT,
        coder_sharing: str = "shared",
        average_shared_gradient: bool = True,
        norm: Optional[str] = "batch",
        coder_tied: bool = True,
        coder_trainable: bool = False,
        coder_layer_norm_scale: Optional[float] = None,
    ) -> None:
        super().__init__()
        check_variant(variant)
        check_positive_int("depth", depth)
        if coder_sharing not in CODER_SHARINGS:
            raise ValueError(f"coder_sharing: expected one of {CODER_SHARINGS}, got {coder_sharing!r}")
        self.variant = variant
        self.depth = depth
        bank = CoderBank(
            enabled=variant == "pnnh",
            init=coder_init,
            shared=coder_sharing == "shared",
            average_shared_gradient=average_shared_gradient,
            code_channels=coder_channels,
            tied=coder_tied,
            trainable=coder_trainable,
        )
        self.stem = FusedPNNHConv(in_channels, width, 3, bias=norm is None, coder_channels=0, norm=norm)
        layers: list[nn.Module] = []
        for _ in range(depth):
            coder = bank.coder(width, width, 1)
            layer = FusedPNNHConv(
                width,
                width,
                3,
                bias=norm is None,
                coder_channels=None if coder is not None else 0,
                coder=coder,
                norm=norm,
                activation=None if variant == "residual" else "relu",
            )
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            layers.append(ResidualLayer(layer) if variant == "residual" else layer)
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
        init_coder_layer_norms(self, coder_layer_norm_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(self.stem(x)))


def deep_cnn(depth: int, width: int = 16, variant: str = "pnnh", **kwargs) -> DeepCNN:
    """A deep plain, residual or PNNH CNN of ``depth`` 3x3 layers of ``width`` channels (the nets of
    the demo and the depth studies, docs/analysis.md): see :class:`DeepCNN` for the keyword
    arguments (``in_channels=1``, ``num_classes=10``, the coder's width, init, sharing and
    tying, ``norm``). ``deep_cnn(64, 16, "pnnh")`` is the demo's PNNH net."""
    return DeepCNN(depth, width, variant, **kwargs)
