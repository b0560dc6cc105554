"""The validated arguments of one PNNH op call, as every backend receives them.

Bundling them keeps backend signatures short and lets a new argument (a new norm, say) reach all
backends without touching each signature.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

from pnnh_kernels.coder import CoderTensors
from pnnh_kernels.conv_geometry import ConvGeometry

ACTIVATIONS = ("relu", None)


class BatchNormParams(NamedTuple):
    """Arguments of ``F.batch_norm`` applied to the learner branch.

    ``training`` means "normalise with the batch statistics" (and update the running ones when they
    are given); ``momentum`` is the exponential-average factor already resolved the way
    nn.BatchNorm2d resolves it (``1 / num_batches_tracked`` when its momentum is None).
    """

    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    training: bool
    momentum: float
    eps: float


class ConvCall(NamedTuple):
    input: Tensor  # [N, C_in, H, W], contiguous or channels_last
    weight: Tensor  # [C_out, C_in, kH, kW]
    bias: Optional[Tensor]  # [C_out]
    coder: Optional[CoderTensors]
    geometry: ConvGeometry
    norm: Optional[BatchNormParams]
    activation: Optional[str]


class LinearCall(NamedTuple):
    input: Tensor  # [..., C_in]
    weight: Tensor  # [C_out, C_in]
    bias: Optional[Tensor]  # [C_out]
    coder: Optional[CoderTensors]
    activation: Optional[str]
