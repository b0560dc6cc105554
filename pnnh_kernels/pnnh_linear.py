"""FusedPNNHLinear: the PNNH layer with a linear learner, for MLP and Transformer blocks."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from pnnh_kernels.backends import backend_reason, check_backend_name, resolve_backend
from pnnh_kernels.backends.call import ACTIVATIONS
from pnnh_kernels.coder import (
    DEFAULT_CODER_INIT,
    CoderUser,
    PNNHCoder,
    coder_for_layer,
)
from pnnh_kernels.functional import RefusesTorchScript, pnnh_linear
from pnnh_kernels.validation import check_positive_int


class FusedPNNHLinear(RefusesTorchScript, CoderUser):
    """``y = act(x W_L^T + b_L + relu(x W_E^T + b_E) W_D^T)`` over the last dimension.

    Args:
        in_features, out_features, bias: as nn.Linear.
        coder_features: C_B; default max(1, in_features // 2); 0 for no coder (then, with
            activation=None, the layer is nn.Linear).
        coder: a PNNHCoder to share (maps in_features -> out_features).
        activation: "relu" (default) or None.
        backend: "auto", "torch", "triton" or "cuda"; ``backend_in_use`` says which one runs.
        coder_init: init of a coder this layer creates (see PNNHCoder).
        coder_trainable: whether a coder this layer creates is trained (default False: it keeps its
            initialisation, see docs/pnnh.md); a given shared ``coder`` keeps its own setting.

    Input: (..., in_features), any leading dimensions.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        coder_features: Optional[int] = None,
        coder: Optional[PNNHCoder] = None,
        bias: bool = True,
        activation: Optional[str] = "relu",
        backend: str = "auto",
        coder_init: str = DEFAULT_CODER_INIT,
        coder_trainable: bool = False,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        self.backend = check_backend_name(backend)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.coder = coder_for_layer(
            in_features,
            out_features,
            coder_features,
            coder,
            coder_init,
            coder_trainable=coder_trainable,
            factory=factory,
            channels_word="features",
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's initialisation of the learner; the coder keeps its own."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def code_features(self) -> int:
        return 0 if self.coder is None else self.coder.code_channels

    @property
    def backend_in_use(self) -> str:
        """The backend that runs this layer for inputs on its parameters' device and dtype."""
        return resolve_backend(self.backend, self.weight.device, self.weight.dtype, "linear").name

    @property
    def backend_reason(self) -> str:
        """Why :attr:`backend_in_use` runs this layer: the measurement behind ``"auto"``'s choice on
        this device family (pnnh_kernels.backends.auto), or that the backend was named."""
        return backend_reason(self.backend, self.weight.device, self.weight.dtype, "linear")

    def forward(self, input: Tensor) -> Tensor:
        coder = self.coder.tensors() if self.coder is not None else (None, None, None)
        return pnnh_linear(
            input, self.weight, self.bias, *coder, activation=self.activation, backend=self.backend
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, code_features={self.code_features}, "
            f"activation={self.activation!r}, backend={self.backend!r}"
        )
