"""The autograd boundary of the fused backends (Triton, CUDA): torch.library ops and the backend
functions, defined once and instantiated per backend by :func:`define_fused_ops` over that backend's
launchers (``conv_forward``, ``conv_forward_train``, ``conv_backward``).

``<library>::conv2d_fused`` computes ``act(conv(x, W) * scale + shift + W_D relu(W_E x_s + b_E))`` and
``<library>::conv2d_fused_backward`` its gradients. Both are ``torch.library.custom_op``s with fake
implementations, so ``torch.compile(fullgraph=True)`` traces a model built from the modules without
graph breaks and without looking inside the kernels (which also makes the CPU interpreter work
under torch.compile, where ``triton_op`` would try to trace the kernel with fake tensors). Their
``padding`` is ``[top, left, bottom, right]`` (ConvGeometry.op_padding): the bottom/right part sets
only the output size, which an asymmetric "same" padding needs and the fake implementations compute.

Training-mode BatchNorm has its own op, ``<library>::conv2d_fused_train`` (see _train_backward and
docs/kernels.md). The learner's bias and an eval-mode BatchNorm are folded, in PyTorch and with
autograd, into the per-channel ``scale`` and ``shift`` the kernel applies to the learner branch:
``scale = gamma / sqrt(running_var + eps)``, ``shift = beta + (b_L - running_mean) * scale``. The op
returns the gradients of ``scale`` and ``shift``; autograd carries them on to gamma, beta and b_L.

What the op keeps alive for the backward: x, the output y (whose sign is the output ReLU's mask, and
which the next layer keeps alive anyway as its own input), the weights and a few per-channel vectors.
The unfused torch backend also keeps the conv output and the code: for a C -> C layer with
C_B = C / 2 and eval BatchNorm, 3.5x the input's bytes against the fused op's 2x (measured by
counting saved tensors in tests/test_triton_conv.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
from torch import Tensor

from pnnh_kernels.backends.call import ConvCall, LinearCall
from pnnh_kernels.backends.fused_common import (
    ConvGradients,
    TrainingForward,
    TrainingGradients,
    TrainingNorm,
    permuted_weight,
)
from pnnh_kernels.backends.reference import memory_format_of
from pnnh_kernels.coder import CoderTensors
from pnnh_kernels.conv_geometry import ConvGeometry
from pnnh_kernels.ledger.record import register_implementation


class FusedKernels(Protocol):
    """A backend's launchers (no autograd): the same signatures for Triton and CUDA."""

    def conv_forward(
        self,
        x: Tensor,
        weight: Tensor,
        scale: Optional[Tensor],
        shift: Optional[Tensor],
        encoder_weight: Optional[Tensor],
        encoder_bias: Optional[Tensor],
        decoder_weight: Optional[Tensor],
        geometry: ConvGeometry,
        relu: bool,
    ) -> Tensor: ...

    def conv_forward_train(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        norm: TrainingNorm,
        encoder_weight: Optional[Tensor],
        encoder_bias: Optional[Tensor],
        decoder_weight: Optional[Tensor],
        geometry: ConvGeometry,
        relu: bool,
    ) -> TrainingForward: ...

    def update_running_statistics(
        self,
        running_mean: Tensor,
        running_var: Tensor,
        mean: Tensor,
        variance: Tensor,
        momentum: float,
        pixels: int,
    ) -> None: ...

    def conv_backward(
        self,
        grad_output: Tensor,
        x: Tensor,
        y: Tensor,
        weight: Tensor,
        scale: Optional[Tensor],
        encoder_weight: Optional[Tensor],
        encoder_bias: Optional[Tensor],
        decoder_weight: Optional[Tensor],
        geometry: ConvGeometry,
        relu: bool,
        coder_grads: bool = True,
    ) -> ConvGradients: ...

    def conv_backward_train(
        self,
        grad_output: Tensor,
        x: Tensor,
        y: Tensor,
        z: Tensor,
        mean: Tensor,
        rstd: Tensor,
        weight: Tensor,
        norm_weight: Optional[Tensor],
        norm_bias: Optional[Tensor],
        encoder_weight: Optional[Tensor],
        encoder_bias: Optional[Tensor],
        decoder_weight: Optional[Tensor],
        geometry: ConvGeometry,
        relu: bool,
        coder_grads: bool = True,
    ) -> TrainingGradients: ...


@dataclass(frozen=True)
class FusedOps:
    """One backend's ops: the backend functions and the torch.library ops behind them."""

    conv2d: Callable[[ConvCall], Tensor]
    linear: Callable[[LinearCall], Tensor]
    conv2d_fused: Any
    conv2d_fused_backward: Any
    conv2d_fused_train: Any
    conv2d_fused_train_backward: Any
    batch_norm_running_update: Any


def _geometry(
    weight: Tensor, stride: list[int], padding: list[int], dilation: list[int]
) -> ConvGeometry:
    """The op's geometry (``padding`` is [top, left, bottom, right], ConvGeometry.op_padding); the
    functional entry point has already validated it."""
    return ConvGeometry.from_op_padding((weight.shape[2], weight.shape[3]), stride, padding, dilation)


def _coder_in(coder: Optional[CoderTensors], dtype: torch.dtype) -> tuple[Optional[Tensor], ...]:
    """(W_E, b_E, W_D) in the compute dtype, each None where absent."""
    if coder is None:
        return (None, None, None)
    return tuple(None if t is None else t.to(dtype) for t in coder)


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    if device.type == "meta":  # autocast has no meta device (the ledger runs steps on meta)
        return None
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _coder_grads(
    coder: tuple[Optional[Tensor], ...], grads: tuple[Tensor, ...]
) -> tuple[Optional[Tensor], ...]:
    """The coder's gradients in its parameters' dtypes; None for an absent parameter or where the op
    returned an empty tensor (a fixed coder: nothing was computed)."""
    return tuple(
        None if parameter is None or grad.numel() == 0 else grad.to(parameter.dtype)
        for parameter, grad in zip(coder, grads)
    )


def define_fused_ops(library: str, kernels: FusedKernels) -> FusedOps:
    """Register ``<library>::conv2d_fused``, ``_backward`` and ``_train`` over ``kernels``."""

    @torch.library.custom_op(f"{library}::conv2d_fused", mutates_args=())
    def conv2d_fused(
        x: Tensor,
        weight: Tensor,
        scale: Optional[Tensor],
        shift: Optional[Tensor],
        encoder_weight: Optional[Tensor],
        encoder_bias: Optional[Tensor],
        decoder_weight: Optional[Tensor],
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        relu: bool,
    ) -> Tensor:
        return kernels.conv_forward(
            x,
            weight,
            scale,
            shift,
            encoder_weight,
            encoder_bias,
            decoder_weight,
            _geometry(weight, stride, padding, dilation),
            relu,
        )

    register_implementation(getattr(torch.ops, library).conv2d_fused.default, conv2d_fused._init_fn)

    @conv2d_fused.register_fake
    def _conv2d_fused_fake(
        x,
        weight,
        scale,
        shift,
        encoder_weight,
        encoder_bias,
        decoder_weight,
        stride,
        padding,
        dilation,
        relu,
    ):
        oh, ow = _geometry(weight, stride, padding, dilation).output_size(x.shape[2], x.shape[3])
        return x.new_empty((x.shape[0], oh, ow, weight.shape[0])).permute(0, 3, 1, 2)

    @torch.library.custom_op(f"{library}::conv2d_fused_backward", mutates_args=())
    def conv2d_fused_backward(
        grad_output: Tensor,
        x: Tensor,
        output: Tensor,
        weight: Tensor,
        scale: Optional[Tensor],
        encoder_weight: Optional[Tensor],
        encoder_bias: Optional[Tensor],
        decoder_weight: Optional[Tensor],
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        relu: bool,
        coder_grads: bool = True,
    ) -> list[Tensor]:
        """[dx, dW_unscaled [KH, KW, C_in, C_out] fp32, dshift, dW_E, db_E, dW_D]; absent ones are empty
        (the coder's also when ``coder_grads`` is False: a fixed coder)."""
        grads = kernels.conv_backward(
            grad_output,
            x,
            output,
            weight,
            scale,
            encoder_weight,
            encoder_bias,
            decoder_weight,
            _geometry(weight, stride, padding, dilation),
            relu,
            coder_grads,
        )

        def or_empty(grad: Optional[Tensor]) -> Tensor:
            # A distinct empty tensor each time: outputs of a custom op may not alias each other.
            return x.new_empty((0,), dtype=torch.float32) if grad is None else grad.contiguous()

        return [
            grads.input,
            grads.weight_unscaled,
            grads.shift,
            or_empty(grads.encoder_weight),
            or_empty(grads.encoder_bias),
            or_empty(grads.decoder_weight),
        ]

    register_implementation(
        getattr(torch.ops, library).conv2d_fused_backward.default,
        conv2d_fused_backward._init_fn,
    )

    @conv2d_fused_backward.register_fake
    def _conv2d_fused_backward_fake(
        grad_output,
        x,
        output,
        weight,
        scale,
        encoder_weight,
        encoder_bias,
        decoder_weight,
        stride,
        padding,
        dilation,
        relu,
        coder_grads=True,
    ):
        n, c_in, height, width = x.shape
        c_out, _, kh, kw = weight.shape

        def like(tensor: Optional[Tensor]) -> Tensor:
            shape = (0,) if tensor is None or not coder_grads else tuple(tensor.shape)
            return x.new_empty(shape, dtype=torch.float32)

        return [
            x.new_empty((n, height, width, c_in)).permute(0, 3, 1, 2),
            x.new_empty((kh, kw, c_in, c_out), dtype=torch.float32),
            x.new_empty((c_out,), dtype=torch.float32),
            like(encoder_weight),
            like(encoder_bias),
            like(decoder_weight),
        ]

    def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        (
            x,
            weight,
            scale,
            shift,
            encoder_weight,
            encoder_bias,
            decoder_weight,
            stride,
            padding,
            dilation,
            relu,
        ) = inputs
        ctx.save_for_backward(x, output, weight, scale, encoder_weight, encoder_bias, decoder_weight)
        ctx.arguments = (stride, padding, dilation, relu)
        ctx.has_shift = shift is not None

    def _backward(ctx: Any, grad_output: Tensor) -> tuple:
        x, output, weight, scale, encoder_weight, encoder_bias, decoder_weight = ctx.saved_tensors
        stride, padding, dilation, relu = ctx.arguments
        (
            grad_x,
            grad_weight_unscaled,
            grad_shift,
            grad_encoder_weight,
            grad_encoder_bias,
            grad_decoder_weight,
        ) = conv2d_fused_backward(
            grad_output,
            x,
            output,
            weight,
            scale,
            encoder_weight,
            encoder_bias,
            decoder_weight,
            stride,
            padding,
            dilation,
            relu,
            any(ctx.needs_input_grad[4:7]),
        )
        grad_scale = None
        if scale is not None:
            # d(scale)[c] = sum_pixels dp * conv(x)[c] = <W[c], dW_unscaled[c]> (no division by scale).
            grad_scale = (grad_weight_unscaled * permuted_weight(weight).float()).sum((0, 1, 2))
            grad_weight_unscaled = grad_weight_unscaled * scale
        grad_weight = grad_weight_unscaled.permute(3, 2, 0, 1).to(weight.dtype)
        return (
            grad_x,
            grad_weight,
            grad_scale,
            grad_shift if ctx.has_shift else None,
            *_coder_grads(
                (encoder_weight, encoder_bias, decoder_weight),
                (grad_encoder_weight, grad_encoder_bias, grad_decoder_weight),
            ),
            None,
            None,
            None,
            None,
        )

    conv2d_fused.register_autograd(_backward, setup_context=_setup_context)

    @torch.library.custom_op(f"{library}::conv2d_fused_train", mutates_args=())
    def conv2d_fused_train(
        x: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        norm_weight: Optional[Tensor],
        norm_bias: Optional[Tensor],
        encoder_weight: Optional[Tensor],
        encoder_bias: Optional[Tensor],
        decoder_weight: Optional[Tensor],
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        relu: bool,
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Training-mode BatchNorm on the learner branch: (y, z, batch mean, biased batch variance,
        rstd)."""
        result = kernels.conv_forward_train(
            x,
            weight,
            bias,
            TrainingNorm(norm_weight, norm_bias, eps),
            encoder_weight,
            encoder_bias,
            decoder_weight,
            _geometry(weight, stride, padding, dilation),
            relu,
        )
        return result.output, result.learner, result.mean, result.variance, result.rstd

    register_implementation(
        getattr(torch.ops, library).conv2d_fused_train.default, conv2d_fused_train._init_fn
    )

    @conv2d_fused_train.register_fake
    def _conv2d_fused_train_fake(
        x,
        weight,
        bias,
        norm_weight,
        norm_bias,
        encoder_weight,
        encoder_bias,
        decoder_weight,
        stride,
        padding,
        dilation,
        relu,
        eps,
    ):
        oh, ow = _geometry(weight, stride, padding, dilation).output_size(x.shape[2], x.shape[3])
        c_out = weight.shape[0]

        def image() -> Tensor:
            return x.new_empty((x.shape[0], oh, ow, c_out)).permute(0, 3, 1, 2)

        def vector() -> Tensor:
            return x.new_empty((c_out,), dtype=torch.float32)

        return image(), image(), vector(), vector(), vector()

    @torch.library.custom_op(f"{library}::conv2d_fused_train_backward", mutates_args=())
    def conv2d_fused_train_backward(
        grad_output: Tensor,
        x: Tensor,
        output: Tensor,
        learner: Tensor,
        mean: Tensor,
        rstd: Tensor,
        weight: Tensor,
        norm_weight: Optional[Tensor],
        norm_bias: Optional[Tensor],
        encoder_weight: Optional[Tensor],
        encoder_bias: Optional[Tensor],
        decoder_weight: Optional[Tensor],
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        relu: bool,
        coder_grads: bool,
    ) -> list[Tensor]:
        """[dx, dW (the weight's shape, dtype and layout), d gamma, d beta, dW_E, db_E, dW_D, d b_L]
        (the learner bias's: zero, or NaN where dz is not finite); absent ones (and the coder's when
        ``coder_grads`` is False) are empty."""
        grads = kernels.conv_backward_train(
            grad_output,
            x,
            output,
            learner,
            mean,
            rstd,
            weight,
            norm_weight,
            norm_bias,
            encoder_weight,
            encoder_bias,
            decoder_weight,
            _geometry(weight, stride, padding, dilation),
            relu,
            coder_grads,
        )

        def or_empty(grad: Optional[Tensor]) -> Tensor:
            # A distinct empty tensor each time: outputs of a custom op may not alias each other.
            # Contiguous, as the fake says (the coder's gradients come out as transposes).
            return x.new_empty((0,), dtype=torch.float32) if grad is None else grad.contiguous()

        return [
            grads.input,
            grads.weight,
            or_empty(grads.norm_weight),
            or_empty(grads.norm_bias),
            or_empty(grads.encoder_weight),
            or_empty(grads.encoder_bias),
            or_empty(grads.decoder_weight),
            or_empty(grads.learner_bias),
        ]

    register_implementation(
        getattr(torch.ops, library).conv2d_fused_train_backward.default,
        conv2d_fused_train_backward._init_fn,
    )

    @conv2d_fused_train_backward.register_fake
    def _conv2d_fused_train_backward_fake(
        grad_output,
        x,
        output,
        learner,
        mean,
        rstd,
        weight,
        norm_weight,
        norm_bias,
        encoder_weight,
        encoder_bias,
        decoder_weight,
        stride,
        padding,
        dilation,
        relu,
        coder_grads,
    ):
        n, c_in, height, width = x.shape

        def like(tensor: Optional[Tensor], coder: bool = False) -> Tensor:
            if tensor is None or (coder and not coder_grads):
                return x.new_empty((0,), dtype=torch.float32)
            return x.new_empty(tuple(tensor.shape), dtype=torch.float32 if coder else tensor.dtype)

        return [
            x.new_empty((n, height, width, c_in)).permute(0, 3, 1, 2),
            torch.empty_like(weight),
            like(norm_weight),
            like(norm_bias),
            like(encoder_weight, True),
            like(encoder_bias, True),
            like(decoder_weight, True),
            x.new_empty((weight.shape[0],), dtype=torch.float32),
        ]

    def _setup_train_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, bias, norm_weight, norm_bias, encoder_weight, encoder_bias, decoder_weight = inputs[
            :8
        ]
        stride, padding, dilation, relu, _ = inputs[8:]
        output, learner, mean, variance, rstd = output
        ctx.save_for_backward(
            x,
            output,
            learner,
            mean,
            rstd,
            weight,
            norm_weight,
            norm_bias,
            encoder_weight,
            encoder_bias,
            decoder_weight,
        )
        ctx.arguments = (stride, padding, dilation, relu)
        ctx.has_bias = bias is not None
        # z, mean, variance and rstd are for the backward and the running statistics (under
        # no_grad): non-differentiable, so a loss built on them raises instead of getting zero
        # gradients, and no zero gradients are materialised for them (an activation-sized fill).
        ctx.mark_non_differentiable(learner, mean, variance, rstd)
        ctx.set_materialize_grads(False)

    def _train_backward(ctx: Any, grad_output: Optional[Tensor], *unused: Optional[Tensor]) -> tuple:
        """The fused training backward (kernels.conv_backward_train): BatchNorm's reductions and dz
        in the kernels, the coder's weight gradients only for a trainable coder."""
        nothing = (None,) * 13
        if grad_output is None:
            return nothing
        (
            x,
            output,
            learner,
            mean,
            rstd,
            weight,
            norm_weight,
            norm_bias,
            encoder_weight,
            encoder_bias,
            decoder_weight,
        ) = ctx.saved_tensors
        stride, padding, dilation, relu = ctx.arguments
        grads = conv2d_fused_train_backward(
            grad_output,
            x,
            output,
            learner,
            mean,
            rstd,
            weight,
            norm_weight,
            norm_bias,
            encoder_weight,
            encoder_bias,
            decoder_weight,
            stride,
            padding,
            dilation,
            relu,
            any(ctx.needs_input_grad[5:8]),
        )
        grad_x, grad_weight, grad_norm_weight, grad_norm_bias = grads[:4]
        return (
            grad_x,
            grad_weight,
            # Exactly zero (training BatchNorm subtracts the batch mean, which cancels any
            # per-channel constant before it; a sum of dz would only return its rounding: it failed
            # an fp32 check on an H200, 1.7e-5 where PyTorch's own error was 6.7e-6), or NaN where
            # dz is not finite, as PyTorch's: written by the BatchNorm finalize kernel.
            grads[7] if ctx.has_bias else None,
            grad_norm_weight if norm_weight is not None else None,
            grad_norm_bias if norm_bias is not None else None,
            *_coder_grads((encoder_weight, encoder_bias, decoder_weight), tuple(grads[4:7])),
            None,
            None,
            None,
            None,
            None,
        )

    conv2d_fused_train.register_autograd(_train_backward, setup_context=_setup_train_context)

    @torch.library.custom_op(
        f"{library}::batch_norm_running_update", mutates_args=("running_mean", "running_var")
    )
    def batch_norm_running_update(
        running_mean: Tensor,
        running_var: Tensor,
        mean: Tensor,
        variance: Tensor,
        momentum: float,
        pixels: int,
    ) -> None:
        """nn.BatchNorm2d's update of the running statistics from a batch's mean and biased
        variance over ``pixels`` values per channel, in place (its own op: an op that mutates its
        inputs cannot carry the autograd formula of the training op)."""
        kernels.update_running_statistics(running_mean, running_var, mean, variance, momentum, pixels)

    register_implementation(
        getattr(torch.ops, library).batch_norm_running_update.default,
        batch_norm_running_update._init_fn,
    )

    def _conv2d_training_norm(call: ConvCall, compute_dtype: torch.dtype) -> Tensor:
        """Training-mode BatchNorm: batch statistics from the kernels, running statistics updated
        as F.batch_norm updates them (momentum, unbiased variance)."""
        norm, coder, geometry = call.norm, call.coder, call.geometry
        n = call.input.shape[0]
        oh, ow = geometry.output_size(call.input.shape[2], call.input.shape[3])
        count = n * oh * ow
        if count <= 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{torch.Size([n, call.weight.shape[0], oh, ow])}"
            )

        out, _, mean, variance, _ = conv2d_fused_train(
            call.input.to(compute_dtype),
            call.weight.to(compute_dtype),
            None if call.bias is None else call.bias.float(),
            norm.weight,
            norm.bias,
            *_coder_in(coder, compute_dtype),
            list(geometry.stride),
            geometry.op_padding,
            list(geometry.dilation),
            call.activation == "relu",
            norm.eps,
        )
        if norm.running_mean is not None and norm.running_var is not None:
            with torch.no_grad():
                batch_norm_running_update(
                    norm.running_mean, norm.running_var, mean, variance, norm.momentum, count
                )
        return out.contiguous(memory_format=memory_format_of(call.input))

    def conv2d(call: ConvCall) -> Tensor:
        """conv2d: fold bias and eval BatchNorm, apply autocast, run the op."""
        norm = call.norm
        compute_dtype = _autocast_dtype(call.input.device) or call.input.dtype
        if norm is not None and norm.training:
            return _conv2d_training_norm(call, compute_dtype)
        scale: Optional[Tensor] = None
        shift = None if call.bias is None else call.bias.float()
        if norm is not None:
            inv_std = torch.rsqrt(norm.running_var.float() + norm.eps)
            scale = inv_std if norm.weight is None else norm.weight.float() * inv_std
            shift_bn = -norm.running_mean.float() * scale
            if norm.bias is not None:
                shift_bn = shift_bn + norm.bias.float()
            shift = shift_bn if shift is None else shift_bn + shift * scale
        coder = call.coder

        out = conv2d_fused(
            call.input.to(compute_dtype),
            call.weight.to(compute_dtype),
            scale,
            shift,
            *_coder_in(coder, compute_dtype),
            list(call.geometry.stride),
            call.geometry.op_padding,
            list(call.geometry.dilation),
            call.activation == "relu",
        )
        return out.contiguous(memory_format=memory_format_of(call.input))

    def linear(call: LinearCall) -> Tensor:
        """The linear layer: the fused conv op on a 1 x 1 image per row.

        A linear layer over rows is a 1x1 convolution of an [M, C_in, 1, 1] image whose channels_last
        memory is the [M, C_in] matrix itself, so the same fused kernels (GEMM, code on chip, one store;
        the code recomputed in the backward) serve it with no copy of the activations. The 1x1 kernel
        has a centre tap, so the encoder runs in the learner's main loop on the same x tiles.
        """
        compute_dtype = _autocast_dtype(call.input.device) or call.input.dtype
        in_features = call.weight.shape[1]
        rows = call.input.reshape(-1, in_features).to(compute_dtype)
        coder = call.coder

        out = conv2d_fused(
            rows.view(rows.shape[0], in_features, 1, 1),
            call.weight.to(compute_dtype).view(call.weight.shape[0], in_features, 1, 1),
            None,
            None if call.bias is None else call.bias.float(),
            *_coder_in(coder, compute_dtype),
            [1, 1],
            [0, 0, 0, 0],
            [1, 1],
            call.activation == "relu",
        )
        return out.reshape(*call.input.shape[:-1], call.weight.shape[0])

    return FusedOps(
        conv2d,
        linear,
        conv2d_fused,
        conv2d_fused_backward,
        conv2d_fused_train,
        conv2d_fused_train_backward,
        batch_norm_running_update,
    )
