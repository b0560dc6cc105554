"""FusedPNNHConv: the PNNH convolution layer, a drop-in for the conv (+ BN) + shortcut it replaces."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from pnnh_kernels.backends import backend_reason, check_backend_name, resolve_backend
from pnnh_kernels.backends.call import ACTIVATIONS, BatchNormParams
from pnnh_kernels.coder import (
    DEFAULT_CODER_INIT,
    CoderTensors,
    CoderUser,
    PNNHCoder,
    coder_for_layer,
    default_code_channels,
)
from pnnh_kernels.conv_geometry import ConvGeometry, IntOrPair, Padding
from pnnh_kernels.functional import (
    RefusesTorchScript,
    autocast_enabled,
    check_conv2d,
    pnnh_conv2d,
    run_conv2d,
)
from pnnh_kernels.validation import check_positive_int

NORMS = (None, "batch")


def batch_norm_params(norm: nn.BatchNorm2d) -> BatchNormParams:
    """The arguments nn.BatchNorm2d.forward would pass to F.batch_norm, with the same side effect
    (``num_batches_tracked`` counts a training call) so that running statistics match it exactly.
    Reads the module's parameter and buffer tables directly: a forward reads six of them, and each
    nn.Module attribute lookup of a parameter or buffer is a Python call."""
    buffers, parameters = norm._buffers, norm._parameters
    running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
    tracked = buffers.get("num_batches_tracked")
    training, momentum = norm.training, norm.momentum
    factor = 0.0 if momentum is None else momentum
    if training and norm.track_running_stats and tracked is not None:
        tracked.add_(1)
        factor = 1.0 / float(tracked) if momentum is None else momentum
    pass_running = not training or norm.track_running_stats
    return BatchNormParams(
        running_mean if pass_running else None,
        running_var if pass_running else None,
        parameters.get("weight"),
        parameters.get("bias"),
        # nn.BatchNorm2d's rule for normalising with the batch's statistics
        training or (running_mean is None and running_var is None),
        factor,
        norm.eps,
    )


def fusion_problem(conv: nn.Module, norm: Optional[nn.Module] = None) -> Optional[str]:
    """Why ``conv`` (with ``norm``) cannot become one FusedPNNHConv that computes what they compute,
    or None: :meth:`FusedPNNHConv.from_modules` raises with it, the converter keeps such modules."""
    if type(conv) is not nn.Conv2d:  # a subclass may have its own forward (timm's Conv2dSame)
        what = type(conv).__name__
        return (
            f"{what} is a Conv2d subclass: its forward may differ"
            if isinstance(conv, nn.Conv2d)
            else f"{what} is not an nn.Conv2d"
        )
    if norm is not None and type(norm) is not nn.BatchNorm2d:
        return f"{type(norm).__name__} where a BatchNorm2d was expected"
    if norm is not None and not (norm.affine and norm.track_running_stats):
        return (
            f"BatchNorm2d(affine={norm.affine}, track_running_stats={norm.track_running_stats}): "
            "the fused layer's norm has both"
        )
    if (
        conv._forward_hooks
        or conv._forward_pre_hooks
        or (norm is not None and (norm._forward_hooks or norm._forward_pre_hooks))
    ):
        return "forward hooks on the conv or its norm would be lost"
    if conv.groups != 1:
        kind = "depthwise" if conv.groups == conv.in_channels else "grouped"
        return (
            f"{kind} convolution (groups={conv.groups}): the fused kernels compute dense "
            "convolutions over all input channels"
        )
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}: the fused kernels read zeros outside the image"
    if norm is not None and norm.num_features != conv.out_channels:
        return f"the norm has {norm.num_features} features for the conv's {conv.out_channels} outputs"
    return None


def _copy_batch_norm(source: nn.BatchNorm2d, target: nn.BatchNorm2d) -> None:
    """Affine parameters, running statistics, eps and momentum: what the forward reads."""
    target.eps, target.momentum = source.eps, source.momentum
    target.load_state_dict(source.state_dict())


class FusedPNNHConv(RefusesTorchScript, CoderUser):
    """``y = act(norm(conv2d(x, W_L, b_L)) + W_D relu(W_E x_s + b_E))``, one PNNH layer.

    A learner convolution plus a coder (a small autoencoder, :class:`PNNHCoder`) on the input sampled
    at the output's strided positions. ``coder_channels=0`` gives a plain conv (+ norm) + act, the
    baseline PNNH is compared with; with ``norm=None`` and ``activation=None`` that is nn.Conv2d.

    Args:
        in_channels, out_channels, kernel_size, stride, dilation, bias: as nn.Conv2d.
        padding: as nn.Conv2d, or None (default) for "same"-like padding, ``dilation * (k - 1)``
            zeros in all, half before the image; a layer with a coder accepts only "same"-like
            padding. When ``dilation * (k - 1)`` is odd that padding is asymmetric (one more row and
            column at the bottom and right, as nn.Conv2d's ``"same"``): supported without a coder,
            NotImplementedError with one.
        coder_channels: C_B; default max(1, C_in // 2); 0 for no coder. Ignored in favour of
            ``coder``'s width when a shared ``coder`` is given (passing a different number raises).
        coder: a PNNHCoder to share with other layers (maps in_channels -> out_channels).
        norm: None or "batch" (nn.BatchNorm2d on the learner branch, available as ``.norm``).
        activation: "relu" (default) or None.
        backend: "auto", "torch", "triton" or "cuda"; ``backend_in_use`` says which one runs.
        coder_init: init of a coder this layer creates (see PNNHCoder).
        coder_trainable: whether a coder this layer creates is trained (default False: it keeps its
            initialisation, see docs/pnnh.md); a given shared ``coder`` keeps its own setting.
        groups, padding_mode: only 1 and "zeros" are supported.

    Input: (N, C_in, H, W) in contiguous or channels_last memory format (the output keeps it), or
    unbatched (C_in, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair = 3,
        stride: IntOrPair = 1,
        padding: Padding = None,
        dilation: IntOrPair = 1,
        bias: bool = True,
        coder_channels: Optional[int] = None,
        coder: Optional[PNNHCoder] = None,
        norm: Optional[str] = None,
        activation: Optional[str] = "relu",
        backend: str = "auto",
        groups: int = 1,
        padding_mode: str = "zeros",
        coder_init: str = DEFAULT_CODER_INIT,
        coder_trainable: bool = False,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("out_channels", out_channels)
        if groups != 1:
            raise NotImplementedError(
                f"groups: grouped and depthwise convolutions are not supported (got groups={groups}): "
                "the fused kernels compute a dense convolution over all input channels; keep "
                "nn.Conv2d for a grouped layer"
            )
        if padding_mode != "zeros":
            raise NotImplementedError(
                f"padding_mode: only 'zeros' is supported, got {padding_mode!r}; the fused kernels "
                "read zeros outside the image"
            )
        if norm not in NORMS:
            raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        self.backend = check_backend_name(backend)
        wants_coder = (
            coder is not None
            or (default_code_channels(in_channels) if coder_channels is None else coder_channels) != 0
        )
        self.geometry = ConvGeometry.from_args(
            kernel_size, stride, padding, dilation, with_coder=wants_coder
        )
        # As given: forward hands it to pnnh_conv2d, which resolves it to self.geometry's pads again
        # (geometry.padding alone would lose the bottom/right part of an asymmetric padding). The
        # attribute ``padding`` is nn.Conv2d's view of it (see the property).
        self._padding_given: Padding = padding
        factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.activation = activation
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels, *self.geometry.kernel_size, **factory)
        )
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.norm = nn.BatchNorm2d(out_channels, **factory) if norm == "batch" else None
        self.coder = coder_for_layer(
            in_channels,
            out_channels,
            coder_channels,
            coder,
            coder_init,
            coder_trainable=coder_trainable,
            factory=factory,
        )
        # The signature of the last call whose arguments passed pnnh_conv2d's checks (see forward).
        self._checked_signature: Optional[tuple] = None
        self._checked_geometry = self.geometry
        self.reset_parameters()

    @classmethod
    def from_modules(
        cls,
        conv: nn.Conv2d,
        norm: Optional[nn.BatchNorm2d] = None,
        relu: Optional[nn.Module] = None,
        *,
        coder_channels: Optional[int] = None,
        coder: Optional[PNNHCoder] = None,
        coder_init: str = DEFAULT_CODER_INIT,
        coder_trainable: bool = False,
        backend: str = "auto",
    ) -> FusedPNNHConv:
        """The layer that computes ``relu(norm(conv(x)))`` (``norm`` and ``relu`` optional), plus a
        coder unless ``coder_channels=0``: the conv's weight and bias and the BatchNorm's affine
        parameters, running statistics, eps and momentum copied, on the conv's device and in its
        dtype (one dtype for the whole layer: a float32 BatchNorm under a float16 conv is rounded),
        with each module's training mode and ``requires_grad`` flags (the coder keeps its own).

        Raises ValueError naming the argument for what one layer cannot compute: a Conv2d subclass,
        grouped convolutions, a padding mode other than zeros, forward hooks, a BatchNorm without
        affine parameters or running statistics, ``relu`` not an nn.ReLU or hooked.
        """
        problem = fusion_problem(conv, norm)
        if problem is not None:
            raise ValueError(f"conv, norm: cannot fuse: {problem}")
        if relu is not None and type(relu) is not nn.ReLU:
            raise ValueError(f"relu: expected an nn.ReLU or None, got {type(relu).__name__}")
        if relu is not None and (relu._forward_hooks or relu._forward_pre_hooks):
            raise ValueError("relu: forward hooks on it would be lost")
        weight = conv.weight
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
            coder_channels=coder_channels, coder=coder, norm=None if norm is None else "batch",
            activation=None if relu is None else "relu", backend=backend, coder_init=coder_init,
            coder_trainable=coder_trainable, device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        if coder is None and layer.coder is not None:  # a new coder: on the conv's device, dtype
            layer.coder.to(device=weight.device, dtype=weight.dtype)
        layer.train(conv.training)
        if norm is not None:  # a BatchNorm kept in eval mode inside a training model stays so
            layer.norm.train(norm.training)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.weight.requires_grad_(weight.requires_grad)
        if conv.bias is not None:
            layer.bias.requires_grad_(conv.bias.requires_grad)
        if norm is not None:
            _copy_batch_norm(norm, layer.norm)
            layer.norm.weight.requires_grad_(norm.weight.requires_grad)
            layer.norm.bias.requires_grad_(norm.bias.requires_grad)
        return layer

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Conv2d's initialisation of the learner; the coder and norm keep their own."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    # nn.Conv2d's attributes, for the tools that read them (FLOP counters, model surgery): only
    # these values are accepted by the constructor.
    groups = 1
    padding_mode = "zeros"

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.geometry.kernel_size

    @property
    def stride(self) -> tuple[int, int]:
        return self.geometry.stride

    @property
    def dilation(self) -> tuple[int, int]:
        return self.geometry.dilation

    @property
    def padding(self) -> Union[tuple[int, int], str]:
        """As nn.Conv2d's: the string given (``"same"``, ``"valid"``), else the zeros before the
        image (top, left); ``"same"`` for an asymmetric default padding at stride 1, as nn.Conv2d
        spells it. A strided layer with an asymmetric padding (which nn.Conv2d cannot express) has
        its zeros after the image in :attr:`padding_end`."""
        given = self._padding_given
        if isinstance(given, str):
            return given
        geometry = self.geometry
        if not geometry.is_symmetric and geometry.stride == (1, 1):
            return "same"
        return geometry.padding

    @property
    def padding_end(self) -> tuple[int, int]:
        """The zeros after the image (bottom, right): :attr:`padding` unless it is asymmetric."""
        return self.geometry.padding_end

    def __setstate__(self, state: dict) -> None:
        # A module pickled before ``padding`` became a property kept the given padding under it.
        if "padding" in state and "_padding_given" not in state:
            state["_padding_given"] = state.pop("padding")
        super().__setstate__(state)

    @property
    def code_channels(self) -> int:
        return 0 if self.coder is None else self.coder.code_channels

    @property
    def backend_in_use(self) -> str:
        """The backend that runs this layer for inputs on its parameters' device and dtype."""
        return resolve_backend(self.backend, self.weight.device, self.weight.dtype, "conv2d").name

    @property
    def backend_reason(self) -> str:
        """Why :attr:`backend_in_use` runs this layer: the measurement behind ``"auto"``'s choice on
        this device family (pnnh_kernels.backends.auto), or that the backend was named."""
        return backend_reason(self.backend, self.weight.device, self.weight.dtype, "conv2d")

    def forward(self, input: Tensor) -> Tensor:
        coder = self.coder.tensors() if self.coder is not None else None
        norm = None if self.norm is None else batch_norm_params(self.norm)
        if type(input) is not Tensor or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return pnnh_conv2d(
                input, self.weight, self.bias, *(coder or (None, None, None)),
                stride=self.geometry.stride, padding=self._padding_given,
                dilation=self.geometry.dilation, norm=norm, activation=self.activation,
                backend=self.backend,
            )  # fmt: skip
        # pnnh_conv2d's checks depend only on what this signature holds: they run again only when
        # something in it changes (a new input shape, a parameter moved to another device or dtype,
        # autocast switched), not on every step (~18 µs a call, measured on the development CPU).
        signature = self._signature(input, coder, norm)
        if signature != getattr(self, "_checked_signature", None):  # None: a module from before
            checked = check_conv2d(
                input, self.weight, self.bias, *(coder or (None, None, None)),
                self.geometry.stride, self._padding_given, self.geometry.dilation, norm, self.activation,
            )  # fmt: skip
            self._checked_geometry = checked[1]
            self._checked_signature = signature
        return run_conv2d(
            input, self.weight, self.bias, coder, self._checked_geometry, norm, self.activation,
            self.backend,
        )  # fmt: skip

    def _signature(
        self, input: Tensor, coder: Optional[CoderTensors], norm: Optional[BatchNormParams]
    ) -> tuple:
        tensors = (input, self.weight, self.bias, *(coder or ()), *(norm[:4] if norm else ()))
        return (
            self._padding_given, self.geometry, self.activation, self.backend, norm is None,
            coder is None,
            autocast_enabled(input.device),
            *[None if t is None else (t.shape, t.dtype, t.device) for t in tensors],
        )  # fmt: skip

    def extra_repr(self) -> str:
        g = self.geometry
        padding = f"padding={g.padding}" + ("" if g.is_symmetric else f", padding_end={g.padding_end}")
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={g.kernel_size}, "
            f"stride={g.stride}, {padding}, dilation={g.dilation}, "
            f"bias={self.bias is not None}, code_channels={self.code_channels}, "
            f"activation={self.activation!r}, backend={self.backend!r}"
        )
