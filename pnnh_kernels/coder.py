"""The PNNH coder: a small autoencoder on the layer's input, shareable between layers.

A coder encodes the C_in input channels of a layer into C_B code channels, ``code = relu(W_E x + b_E)``,
and decodes them into the layer's C_out output channels, ``W_D code``. It is *tied* when
``W_D = W_E^T`` (one matrix, needs C_out == C_in) and *untied* otherwise.

The default coder is a *fixed rectified isometry* (``init="rectified_isometry"``, ``trainable=False``):
W_E has non-negative orthonormal rows (each code unit is the normalised sum of a group of input
channels), so on the non-negative inputs of a PNNH layer the path ``W_E^T relu(W_E x)`` is the
orthogonal projection of x onto the group means: it reconstructs rectified Gaussian inputs with a
relative error of 0.34 at C_B = C_in / 2 and its gain is exactly 1, never above. The path reaches the
layer's output without a norm, so over L layers sharing a coder its gain compounds as ``gain ** L``;
a pretrained coder (gain 1.08-1.19) diverged at depth 64, and a *trained* shared coder drifts away
from gain 1 and loses most of what it carried (docs/analysis.md, the coder ablation). Built in closed
form, it costs nothing to construct. ``init="rectified_normal"`` (pretraining) and
``trainable=True`` remain available.

Sharing and gradient averaging (trained coders): the PNNH models let every layer of one shape in a
stage use the same coder. With the plain summed gradient, a coder used by L layers receives the sum
of L gradients and, at depth 64, the prototype diverged to NaN. So by default a shared coder's
gradient is *averaged* over
its uses: every layer that adopts the coder calls :meth:`PNNHCoder.attach`, and :meth:`tensors` hands
out the weights behind an identity whose backward multiplies the gradient by ``1 / num_uses``. The
forward values are untouched, and every backend sees ordinary tensors, so the averaging needs nothing
from the kernels. ``average_shared_gradient=False`` restores the plain sum.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pnnh_kernels.validation import check_positive_int

CODER_INITS = ("rectified_isometry", "rectified_normal", "identity", "he")
DEFAULT_CODER_INIT = "rectified_isometry"

# The rectified-normal pretraining: a few hundred Adam steps on fresh batches of relu(N(0, 1)).
# The learning rate shrinks as 1/sqrt(C_in): at a fixed rate wide coders overshoot and their codes die
# (C_in=512 at lr 3e-2 ended with every code unit dead). With these values the tied half-width coder
# reaches a relative error of 0.35-0.41 for C_in from 16 to 1024 (docs/pnnh.md), below the 0.5 of the
# "identity" init; the cost grows as C_in^2 (about 5 s on 2 CPU cores at C_in=1024).
RECTIFIED_NORMAL_STEPS = 300
RECTIFIED_NORMAL_BATCH = 256
RECTIFIED_NORMAL_LR_SCALE = 0.03


def deepcopy_fields(module: nn.Module, memo: dict[int, Any]) -> Any:
    """What ``copy.deepcopy`` does by default for a module (a new instance, every attribute deep
    copied through ``memo``), for ``__deepcopy__`` methods that then adjust the copy."""
    copied = module.__class__.__new__(module.__class__)
    memo[id(module)] = copied
    for key, value in module.__dict__.items():
        copied.__dict__[key] = copy.deepcopy(value, memo)
    return copied


class CoderTensors(NamedTuple):
    """The coder's weights as a backend receives them.

    ``decoder_weight`` is None for a tied coder: the decoder is then ``encoder_weight.T``.
    """

    encoder_weight: Tensor  # [C_B, C_in]
    encoder_bias: Optional[Tensor]  # [C_B]
    decoder_weight: Optional[Tensor]  # [C_out, C_B], None when tied

    def decoder(self) -> Tensor:
        """The effective decoder matrix W_D, [C_out, C_B]."""
        return self.encoder_weight.t() if self.decoder_weight is None else self.decoder_weight


class _ScaleGradient(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def scale_gradient(tensor: Tensor, scale: float) -> Tensor:
    """Return ``tensor`` unchanged, with its gradient multiplied by ``scale`` on the way back."""
    if scale == 1.0 or not tensor.requires_grad:
        return tensor
    return _ScaleGradient.apply(tensor, scale)


class PNNHCoder(nn.Module):
    """Tied or untied ReLU autoencoder ``x -> W_D relu(W_E x + b_E)`` used as a layer's internal path.

    Args:
        in_channels: C_in, the channels of the input it encodes.
        code_channels: C_B, the width of the code (>= 1).
        out_channels: C_out, the channels it decodes to (default C_in).
        tied: use ``W_D = W_E^T``; needs ``out_channels == in_channels``.
        bias: learn the encoder bias b_E.
        init: ``"rectified_isometry"`` (default, closed form: W_E's rows are the normalised sums of
            min(C_B, C_in) groups of consecutive input channels, see the module docstring; with
            C_B >= C_in every group is one channel and the path passes non-negative inputs through
            unchanged, i.e. it is an identity shortcut), ``"rectified_normal"`` (pretrain to
            reconstruct relu(N(0, 1)) samples; seconds at C_in = 1024), ``"identity"`` (pass the
            first C_B channels through exactly) or ``"he"`` (He-normal).
        average_shared_gradient: divide the gradient by the number of layers that use the coder.
        trainable: whether its parameters require gradients (default False: the coder keeps its
            initialisation; its parameters are then not trained and not counted as trainable).

    ``reconstruction_error()`` measures the relative error ``||x - x_hat||^2 / ||x||^2`` on
    rectified Gaussian inputs; after ``init="rectified_normal"``, ``init_reconstruction_error`` holds
    the one its pretraining reached on a held-out batch (None for the other inits).
    """

    def __init__(
        self,
        in_channels: int,
        code_channels: int,
        out_channels: Optional[int] = None,
        tied: bool = True,
        bias: bool = True,
        init: str = DEFAULT_CODER_INIT,
        average_shared_gradient: bool = True,
        trainable: bool = False,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("code_channels", code_channels)
        out_channels = in_channels if out_channels is None else out_channels
        check_positive_int("out_channels", out_channels)
        if tied and out_channels != in_channels:
            raise ValueError(
                f"tied: a tied coder decodes with W_E^T and needs out_channels == in_channels, got "
                f"in_channels={in_channels}, out_channels={out_channels}; use tied=False"
            )
        if init not in CODER_INITS:
            raise ValueError(f"init: expected one of {CODER_INITS}, got {init!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.code_channels = code_channels
        self.out_channels = out_channels
        self.tied = tied
        self.init = init
        self.average_shared_gradient = average_shared_gradient
        self.num_uses = 0
        self.init_reconstruction_error: Optional[float] = None
        self.encoder_weight = nn.Parameter(torch.empty(code_channels, in_channels, **factory))
        self.encoder_bias = nn.Parameter(torch.empty(code_channels, **factory)) if bias else None
        self.decoder_weight = (
            None if tied else nn.Parameter(torch.empty(out_channels, code_channels, **factory))
        )
        self.reset_parameters()
        self.requires_grad_(trainable)

    @property
    def trainable(self) -> bool:
        """Whether the optimizer sees the coder: False (the default) keeps it at its initialisation."""
        return any(p.requires_grad for p in self.parameters())

    def attach(self) -> None:
        """Record one more layer that uses this coder (layers call this when they adopt it, and when
        they are deep-copied with it)."""
        self.num_uses += 1

    def __deepcopy__(self, memo: dict[int, Any]) -> PNNHCoder:
        # A copy's uses are the copied layers that adopt it, not the original's: deepcopy of one
        # layer of a four-layer stack gives a coder used once (it kept 4, and scaled the copy's
        # gradient by 1/4); deepcopy of the whole stack copies the coder once, and its four copied
        # layers attach to it again (CoderUser.__deepcopy__ calls attach()).
        copied = deepcopy_fields(self, memo)
        copied.num_uses = 0
        return copied

    @property
    def gradient_scale(self) -> float:
        """The factor applied to the gradient: 1 / num_uses when averaging, else 1."""
        if self.average_shared_gradient and self.num_uses > 1:
            return 1.0 / self.num_uses
        return 1.0

    def tensors(self) -> CoderTensors:
        """The weights to hand to a backend, with the shared-gradient averaging applied."""
        scale = self.gradient_scale
        return CoderTensors(
            scale_gradient(self.encoder_weight, scale),
            None if self.encoder_bias is None else scale_gradient(self.encoder_bias, scale),
            None if self.decoder_weight is None else scale_gradient(self.decoder_weight, scale),
        )

    def decoder(self) -> Tensor:
        """The effective decoder matrix W_D, [C_out, C_B]."""
        return self.encoder_weight.t() if self.decoder_weight is None else self.decoder_weight

    def encode(self, features: Tensor) -> Tensor:
        """``relu(W_E x + b_E)`` over the last dimension of ``features`` (C_in -> C_B)."""
        return F.relu(F.linear(features, self.encoder_weight, self.encoder_bias))

    def forward(self, features: Tensor) -> Tensor:
        """Reconstruct ``features`` (channels in the last dimension): ``W_D relu(W_E x + b_E)``."""
        if features.shape[-1] != self.in_channels:
            raise ValueError(
                f"features: expected {self.in_channels} channels in the last dimension, got shape "
                f"{tuple(features.shape)}"
            )
        return F.linear(self.encode(features), self.decoder())

    @torch.no_grad()
    def reconstruction_error(self, samples: int = 4096, seed: int = 0) -> float:
        """Relative error ``||target(x) - coder(x)||^2 / ||target(x)||^2`` on ``samples`` fresh
        ``x ~ relu(N(0, I))``, the rectified inputs a coder sees (its own generator: the global RNG
        is untouched). 0 is a perfect autoencoder, 1 no better than outputting zeros."""
        check_positive_int("samples", samples)
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(samples, self.in_channels, generator=generator).relu()
        target = self.reconstruction_target(x)
        weight = self.encoder_weight
        reconstruction = self(x.to(weight.device, weight.dtype)).to("cpu", torch.float32)
        return float((reconstruction - target).square().sum() / target.square().sum())

    def reconstruction_target(self, features: Tensor) -> Tensor:
        """What the coder is trained to output for ``features``: the input itself, or, when
        C_out != C_in, the input in the first min(C_in, C_out) channels and zeros elsewhere (the
        analogue of ResNet's zero-padded identity shortcut)."""
        if self.out_channels == self.in_channels:
            return features
        shared = min(self.in_channels, self.out_channels)
        target = features.new_zeros(*features.shape[:-1], self.out_channels)
        target[..., :shared] = features[..., :shared]
        return target

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.init_reconstruction_error = None
        if self.init == "identity":
            self._init_identity()
            return
        if self.init == "rectified_isometry":
            self._init_rectified_isometry()
            return
        nn.init.kaiming_normal_(self.encoder_weight, nonlinearity="relu")
        if self.decoder_weight is not None:
            nn.init.kaiming_normal_(self.decoder_weight, nonlinearity="relu")
        if self.encoder_bias is not None:
            self.encoder_bias.zero_()
        if self.init == "rectified_normal" and not self.encoder_weight.is_meta:
            self.init_reconstruction_error = self._pretrain_on_rectified_normal()

    def _init_identity(self) -> None:
        # Inputs of a PNNH layer are post-ReLU, hence non-negative: relu(x_i) = x_i passes exactly.
        self.encoder_weight.zero_()
        diagonal = min(self.code_channels, self.in_channels)
        self.encoder_weight[:diagonal, :diagonal] = torch.eye(diagonal)
        if self.encoder_bias is not None:
            self.encoder_bias.zero_()
        if self.decoder_weight is not None:
            self.decoder_weight.zero_()
            diagonal = min(self.code_channels, self.out_channels, self.in_channels)
            self.decoder_weight[:diagonal, :diagonal] = torch.eye(diagonal)

    def _init_rectified_isometry(self) -> None:
        # Split the input channels into min(C_B, C_in) groups of consecutive channels; code unit j is
        # its group's sum over sqrt(group size). W_E then has non-negative orthonormal rows, so on the
        # non-negative inputs of a PNNH layer relu(W_E x) = W_E x and W_E^T W_E x is the orthogonal
        # projection of x onto the group means: the path's gain is exactly 1 on that subspace and 0
        # across it, never above 1, at any depth. Code units beyond C_in (C_B > C_in) stay zero.
        groups = min(self.code_channels, self.in_channels)
        cpu = torch.device("cpu")  # explicit: a torch.device("meta") context must not capture these
        channel = torch.arange(self.in_channels, device=cpu)
        group_of = channel * groups // self.in_channels
        sizes = torch.bincount(group_of, minlength=groups).to(torch.float32)
        encoder = torch.zeros(self.code_channels, self.in_channels, device=cpu)
        encoder[group_of, channel] = sizes[group_of].rsqrt()
        self.encoder_weight.copy_(encoder)
        if self.encoder_bias is not None:
            self.encoder_bias.zero_()
        if self.decoder_weight is not None:
            # Untied (C_out != C_in or strided): decode onto the first min(C_in, C_out) channels, the
            # reconstruction target's (see reconstruction_target), zero elsewhere.
            decoder = torch.zeros(self.out_channels, self.code_channels, device=cpu)
            shared = min(self.in_channels, self.out_channels)
            decoder[:shared] = encoder.t()[:shared]
            self.decoder_weight.copy_(decoder)

    def _pretrain_on_rectified_normal(self) -> float:
        """Minimise ||target(x) - W_D relu(W_E x + b_E)||^2 for x ~ relu(N(0, I)).

        Runs in float32 on the CPU from the He-normal start. The sample generator is seeded from the
        global RNG, so ``torch.manual_seed`` makes the result reproducible. Returns the relative
        reconstruction error on a held-out batch.
        """
        seed = int(torch.randint(0, 2**62, (1,)).item())
        generator = torch.Generator().manual_seed(seed)
        params = {
            name: param.detach().to("cpu", torch.float32).clone()
            for name, param in self.named_parameters(recurse=False)
        }
        if "decoder_weight" in params:
            # Start the untied decoder at the tied one (W_E^T on the shared channels, zero on the
            # rest, where the target is zero): from two independent He draws the pretraining ended
            # above the identity init's error.
            shared = min(self.in_channels, self.out_channels)
            params["decoder_weight"].zero_()
            params["decoder_weight"][:shared] = params["encoder_weight"].t()[:shared]
        for param in params.values():
            param.requires_grad_(True)

        def reconstruct(features: Tensor) -> Tensor:
            code = F.relu(F.linear(features, params["encoder_weight"], params.get("encoder_bias")))
            decoder = params.get("decoder_weight")
            return F.linear(code, params["encoder_weight"].t() if decoder is None else decoder)

        def sample() -> Tensor:
            return torch.randn(RECTIFIED_NORMAL_BATCH, self.in_channels, generator=generator).relu_()

        learning_rate = RECTIFIED_NORMAL_LR_SCALE / math.sqrt(self.in_channels)
        optimizer = torch.optim.Adam(params.values(), lr=learning_rate)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, RECTIFIED_NORMAL_STEPS)
        with torch.enable_grad():
            for _ in range(RECTIFIED_NORMAL_STEPS):
                features = sample()
                loss = F.mse_loss(reconstruct(features), self.reconstruction_target(features))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        for name, param in self.named_parameters(recurse=False):
            param.copy_(params[name].detach())
        held_out = sample()
        target = self.reconstruction_target(held_out)
        error = (reconstruct(held_out) - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)
        return float(error)

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.code_channels}, out_channels={self.out_channels}, "
            f"tied={self.tied}, bias={self.encoder_bias is not None}, init={self.init!r}, "
            f"trainable={self.trainable}, num_uses={self.num_uses}, "
            f"average_shared_gradient={self.average_shared_gradient}"
        )
        if self.init_reconstruction_error is not None:
            text += f", init_reconstruction_error={self.init_reconstruction_error:.4f}"
        return text


class CoderUser(nn.Module):
    """Base of the modules that adopt a (possibly shared) PNNHCoder as ``self.coder`` and attach to
    it: FusedPNNHConv, FusedPNNHLinear, the ViT's sublayers. A deepcopy attaches the copy to the
    copied coder, so that the copied coder counts its own users (PNNHCoder.__deepcopy__)."""

    coder: Optional[PNNHCoder]

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        copied = deepcopy_fields(self, memo)
        if copied.coder is not None:
            copied.coder.attach()
        return copied


def default_code_channels(in_channels: int) -> int:
    """C_B when the caller does not choose: half the input channels, at least one (a one-channel layer
    gets a one-channel coder; it silently had none when this was C_in // 2)."""
    return max(1, in_channels // 2)


def coder_for_layer(
    in_channels: int,
    out_channels: int,
    coder_channels: Optional[int],
    coder: Optional[PNNHCoder],
    coder_init: str,
    *,
    coder_trainable: bool = False,
    factory: dict[str, Any],
    channels_word: str = "channels",
) -> Optional[PNNHCoder]:
    """The coder a layer uses: the shared ``coder`` it was given (checked against the layer's shape),
    a new one of ``coder_channels`` (default max(1, C_in // 2); tied when C_out == C_in), or None when
    ``coder_channels == 0``. The returned coder has recorded the layer as one of its uses."""
    if coder is not None:
        if not isinstance(coder, PNNHCoder):
            raise TypeError(f"coder: expected a PNNHCoder or None, got {type(coder).__name__}")
        if coder.in_channels != in_channels or coder.out_channels != out_channels:
            raise ValueError(
                f"coder: maps {coder.in_channels} -> {coder.out_channels} {channels_word}, but the "
                f"layer maps {in_channels} -> {out_channels}"
            )
        if coder_channels is not None and coder_channels != coder.code_channels:
            raise ValueError(
                f"coder_{channels_word}: {coder_channels} contradicts the given coder's "
                f"code_channels={coder.code_channels}; pass one or the other"
            )
    else:
        if coder_channels is None:
            coder_channels = default_code_channels(in_channels)
        if not isinstance(coder_channels, int) or coder_channels < 0:
            raise ValueError(
                f"coder_{channels_word}: expected a non-negative int, got {coder_channels!r}"
            )
        if coder_channels == 0:
            return None
        if coder_channels > in_channels:
            idle = (
                f"; with the rectified isometry the code units beyond {in_channels} stay zero"
                if coder_init == "rectified_isometry"
                else ""
            )
            warnings.warn(
                f"coder_{channels_word}={coder_channels} is wider than the layer's {in_channels} "
                f"input {channels_word}: the coder is then not a bottleneck{idle}; the default is "
                "max(1, C_in // 2)",
                UserWarning,
                stacklevel=3,
            )
        coder = PNNHCoder(
            in_channels,
            coder_channels,
            out_channels,
            tied=out_channels == in_channels,
            init=coder_init,
            trainable=coder_trainable,
            **factory,
        )
    coder.attach()
    return coder


def distinct_coders(model: nn.Module) -> list[PNNHCoder]:
    """Each PNNHCoder of ``model`` once (a shared coder appears in many layers)."""
    found: dict[int, PNNHCoder] = {}
    for module in model.modules():
        if isinstance(module, PNNHCoder):
            found.setdefault(id(module), module)
    return list(found.values())


def reconstruction_loss(
    coders: list[PNNHCoder],
    samples: int,
    device: torch.device,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Mean over the coders of the autoencoder loss on fresh rectified-normal inputs ``relu(N(0, I))``:
    the paper's self-supervised task for the coder (and the one its initialisations are made for)."""
    losses = []
    for coder in coders:
        features = torch.randn(samples, coder.in_channels, device=device, generator=generator).relu()
        losses.append(F.mse_loss(coder(features), coder.reconstruction_target(features)))
    return torch.stack(losses).mean()
