"""Coder sharing inside a PNNH model: one coder per group of identically shaped layers."""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Optional

import torch
from torch import nn

from pnnh_kernels.coder import DEFAULT_CODER_INIT, PNNHCoder, default_code_channels
from pnnh_kernels.pnnh_conv import FusedPNNHConv

VARIANTS = ("residual", "plain", "pnnh")

# The initial BatchNorm scale (gamma) of the layers that have a coder, unless the model is told
# otherwise: min(1, 4 / sqrt(L)) for a net with L such layers. Why: each layer adds its learner
# branch, gamma times a unit-variance BatchNorm output, to the stream its coder carries; over L layers
# that is gamma^2 L of variance on top of the input. Scaled so that gamma^2 L <= 16, a deep net starts
# with the input's share of the stream that a 16-layer net has at gamma = 1 (16 layers train at
# gamma = 1: 0.96-0.98 on digits). Measured on digits, width 16, the fixed isometric coder: at depth
# 128, gamma = 1 gave 0.21 / 0.52 / 0.96 test accuracy (seeds 0-2), this default (0.354) 0.94 / 0.93
# / 0.95; gamma = 0 (the branches start silent) under-fitted at every depth tried (0.67-0.72 at depth
# 16). docs/analysis.md.
DEPTH_SCALED_NORM_BUDGET = 16.0


def default_coder_layer_norm_scale(coder_layers: int) -> float:
    """min(1, sqrt(DEPTH_SCALED_NORM_BUDGET / coder_layers)): 1 up to 16 layers, 0.35 at 128."""
    return min(1.0, math.sqrt(DEPTH_SCALED_NORM_BUDGET / max(coder_layers, 1)))


def init_coder_layer_norms(model: nn.Module, scale: Optional[float]) -> None:
    """Set the BatchNorm scale of every fused layer of ``model`` that has a coder (None: the
    depth-scaled default, :func:`default_coder_layer_norm_scale` of their number); layers without a
    coder (stems, plain and residual nets) keep theirs."""
    layers = [
        module
        for module in model.modules()
        if isinstance(module, FusedPNNHConv) and module.coder is not None and module.norm is not None
    ]
    if scale is None:
        scale = default_coder_layer_norm_scale(len(layers))
    with torch.no_grad():
        for layer in layers:
            layer.norm.weight.fill_(float(scale))


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    return variant


class CoderBank:
    """Hands out coders for the layers of one stage (or one stack).

    Layers that ask with the same key get the same coder: the paper's weight sharing. A layer that
    keeps its width and stride gets a tied coder; one that changes width or stride gets an untied
    one (W_D: C_out x C_B, like ResNet's projection shortcut). ``enabled=False`` (the plain and
    residual variants) hands out None, i.e. no coder. ``shared=False`` gives every layer its own;
    ``tied=False`` makes every coder untied.
    """

    def __init__(
        self,
        enabled: bool,
        init: str = DEFAULT_CODER_INIT,
        shared: bool = True,
        average_shared_gradient: bool = True,
        code_channels: Optional[int] = None,
        tied: bool = True,
        trainable: bool = False,
    ) -> None:
        self.trainable = trainable
        self.enabled = enabled
        self.tied = tied
        self.init = init
        self.shared = shared
        self.average_shared_gradient = average_shared_gradient
        self.code_channels = code_channels
        self._coders: dict[Hashable, PNNHCoder] = {}

    def coder(
        self, in_channels: int, out_channels: int, stride: int, key: Hashable = None
    ) -> Optional[PNNHCoder]:
        if not self.enabled:
            return None
        group = (key, in_channels, out_channels, stride)
        if self.shared and group in self._coders:
            return self._coders[group]
        code = self.code_channels or default_code_channels(in_channels)
        coder = PNNHCoder(
            in_channels,
            code,
            out_channels,
            tied=self.tied and in_channels == out_channels and stride == 1,
            init=self.init,
            average_shared_gradient=self.average_shared_gradient,
            trainable=self.trainable,
        )
        self._coders[group] = coder
        return coder
