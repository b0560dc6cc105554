"""Coder sharing inside a PNNH model: one coder per group of identically shaped layers."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Optional

from pnnh_kernels.coder import DEFAULT_CODER_INIT, PNNHCoder, default_code_channels

VARIANTS = ("residual", "plain", "pnnh")


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
