"""Per-layer curves of a deep stack at He initialisation: survival against its Cantelli bound,
similarity between inputs, and how much of the input a linear probe can still reconstruct."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from pnnh_kernels.analysis.bounds import cantelli_survival_bound
from pnnh_kernels.analysis.probes import mean_cosine_similarity, ridge_r2
from pnnh_kernels.backends.reference import learner_conv2d
from pnnh_kernels.coder import DEFAULT_CODER_INIT
from pnnh_kernels.models.deep_cnn import DeepCNN, ResidualLayer, deep_cnn
from pnnh_kernels.pnnh_conv import FusedPNNHConv


@dataclass(frozen=True)
class LayerCurvePoint:
    variant: str
    inputs: str  # "digits" or "gaussian"
    layer: int  # 1-based depth of the layer in the body
    survival: float  # fraction of pre-activations > 0
    bound: float  # mean Cantelli bound over units, positions and samples
    cosine_similarity: float
    ridge_r2: float

    def as_dict(self) -> dict:
        return asdict(self)


def he_stack(depth: int, width: int, variant: str, coder_init: str = DEFAULT_CODER_INIT) -> DeepCNN:
    """deep_cnn without normalisation and with zero biases: the He-initialised stack that the
    bounds are derived for (docs/analysis.md)."""
    model = deep_cnn(depth, width, variant, norm=None, coder_init=coder_init)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FusedPNNHConv) and module.bias is not None:
                module.bias.zero_()
    return model.eval()


def _learner(layer: FusedPNNHConv, x: Tensor) -> Tensor:
    return learner_conv2d(x, layer.weight, layer.bias, layer.geometry)


def _patch_variance(layer: FusedPNNHConv, x: Tensor) -> Tensor:
    """Var(w . x_patch) for w ~ N(0, 2 / fan_in) at each output position: 2 |x_patch|^2 / fan_in."""
    g = layer.geometry
    ones = x.new_ones(1, x.shape[1], *g.kernel_size)
    energy = learner_conv2d(x.square(), ones, None, g)
    return 2.0 * energy / layer.weight[0].numel()


def _coder_path(layer: FusedPNNHConv, x: Tensor) -> Tensor:
    coder = layer.coder
    features = x.permute(0, 2, 3, 1)
    return coder(features).permute(0, 3, 1, 2)


@torch.no_grad()
def layer_curves(
    model: DeepCNN, batch: Tensor, inputs: str, probe: bool = True
) -> list[LayerCurvePoint]:
    """Walk the body of ``model`` (from :func:`he_stack`) layer by layer on ``batch``."""
    x = model.stem(batch)
    points = []
    for depth, module in enumerate(model.layers, start=1):
        layer = module.layer if isinstance(module, ResidualLayer) else module
        z = _learner(layer, x)
        if model.variant == "residual":
            path = x
        elif model.variant == "pnnh":
            path = _coder_path(layer, x)
        else:
            path = torch.zeros_like(z)
        pre = z + path
        bound = cantelli_survival_bound(path, _patch_variance(layer, x).expand_as(path))
        x = torch.relu(pre)
        points.append(
            LayerCurvePoint(
                model.variant,
                inputs,
                depth,
                float((pre > 0).double().mean()),
                float(bound.double().mean()),
                mean_cosine_similarity(x),
                ridge_r2(x, batch) if probe else float("nan"),
            )
        )
    return points
