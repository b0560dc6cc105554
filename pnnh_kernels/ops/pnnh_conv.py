"""The fused PNNH convolution's ops (``torch.ops.<library>.conv2d_fused*``), their fakes and their
autograd, once for every fused backend's library (``pnnh``: Triton, ``pnnh_cuda``: CUDA).

``conv2d_fused`` computes ``act(conv(x, W) * scale + shift + W_D relu(W_E x_s + b_E))`` and
``conv2d_fused_backward`` its gradients; ``conv2d_fused_train`` and ``conv2d_fused_train_backward``
put training-mode BatchNorm on the learner branch; ``batch_norm_running_update`` updates the running
statistics in place (its own op: an op that mutates its inputs cannot carry an autograd formula).
Their ``padding`` is ``[top, left, bottom, right]`` (ConvGeometry.op_padding): the bottom/right part
sets only the output size, which an asymmetric "same" padding needs and the fakes compute.

Why ``Library.define`` + ``impl`` and a module-level ``autograd.Function`` registered as the
Autograd kernel, not ``torch.library.custom_op``: the same dispatcher entries (fake kernels for
``torch.compile`` and meta tensors, an Autograd kernel that redispatches below autograd, opcheck's
registration checks), without custom_op's per-call Python (pytree flattening, default filling, its
generated Function): measured on the 2-core development CPU, a trivial op's forward and backward
cost 82 µs through custom_op and 47 µs so. Eager calls enter the Function directly and it calls the
launchers without a second dispatch where nothing must see the op (:func:`eager`).

A backend supplies its launchers (no autograd) with :func:`register_kernels`; the ops import no
backend. The learner's bias and an eval-mode BatchNorm are folded, in PyTorch and with autograd,
into the per-channel ``scale`` and ``shift`` the kernel applies to the learner branch; the op
returns the gradients of ``scale`` and ``shift`` and autograd carries them on to gamma, beta, b_L.

What the op keeps alive for the backward: x, the output y (whose sign is the output ReLU's mask,
and which the next layer keeps alive anyway as its own input), the weights and a few per-channel
vectors (training BatchNorm: also z and the batch statistics).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Protocol

import torch
from torch import Tensor

from pnnh_kernels import observer
from pnnh_kernels.backends.call import ConvCall
from pnnh_kernels.backends.fused_common import (
    ConvGradients,
    TrainingGradients,
    in_dtype,
    permuted_weight,
)
from pnnh_kernels.backends.reference import memory_format_of
from pnnh_kernels.conv_geometry import ConvGeometry

LIBRARIES = ("pnnh", "pnnh_cuda")

_SCHEMAS = {
    "conv2d_fused": (
        "conv2d_fused(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, "
        "Tensor? encoder_weight, Tensor? encoder_bias, Tensor? decoder_weight, int[] stride, "
        "int[] padding, int[] dilation, bool relu) -> Tensor"
    ),
    "conv2d_fused_backward": (
        "conv2d_fused_backward(Tensor grad_output, Tensor x, Tensor output, Tensor weight, "
        "Tensor? scale, Tensor? encoder_weight, Tensor? encoder_bias, Tensor? decoder_weight, "
        "int[] stride, int[] padding, int[] dilation, bool relu, bool coder_grads=True) -> Tensor[]"
    ),
    "conv2d_fused_train": (
        "conv2d_fused_train(Tensor x, Tensor weight, Tensor? bias, Tensor? norm_weight, "
        "Tensor? norm_bias, Tensor? encoder_weight, Tensor? encoder_bias, Tensor? decoder_weight, "
        "int[] stride, int[] padding, int[] dilation, bool relu, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "conv2d_fused_train_backward": (
        "conv2d_fused_train_backward(Tensor grad_output, Tensor x, Tensor output, Tensor learner, "
        "Tensor mean, Tensor rstd, Tensor weight, Tensor? norm_weight, Tensor? norm_bias, "
        "Tensor? encoder_weight, Tensor? encoder_bias, Tensor? decoder_weight, int[] stride, "
        "int[] padding, int[] dilation, bool relu, bool coder_grads) -> Tensor[]"
    ),
    "batch_norm_running_update": (
        "batch_norm_running_update(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, "
        "Tensor variance, float momentum, int pixels) -> ()"
    ),
}


class FusedKernels(Protocol):
    """A backend's launchers, each the implementation (below autograd) of the op of its name in
    _LAUNCHERS, with the op's flat signature and outputs: pnnh_kernels.triton.pnnh_conv and
    pnnh_kernels.cuda.launch."""

    def conv_forward(self, *args: Any) -> Tensor: ...
    def conv_forward_train(self, *args: Any) -> tuple[Tensor, ...]: ...
    def update_running_statistics(self, *args: Any) -> None: ...
    def conv_backward(self, *args: Any) -> list[Tensor]: ...
    def conv_backward_train(self, *args: Any) -> list[Tensor]: ...


# Which launcher implements which op.
_LAUNCHERS = {
    "conv2d_fused": "conv_forward",
    "conv2d_fused_backward": "conv_backward",
    "conv2d_fused_train": "conv_forward_train",
    "conv2d_fused_train_backward": "conv_backward_train",
    "batch_norm_running_update": "update_running_statistics",
}


_kernels: dict[str, FusedKernels] = {}  # by library


def register_kernels(library: str, kernels: FusedKernels) -> None:
    """Make ``kernels``' launchers the implementations of ``library``'s ops (called by each fused
    backend's package when it registers itself). The launchers are registered as they are: no
    wrapper frame between the op's dispatch and the launch."""
    if library not in LIBRARIES:
        raise ValueError(f"library: expected one of {LIBRARIES}, got {library!r}")
    _kernels[library] = kernels
    definitions = _libraries[library]
    namespace = getattr(torch.ops, library)
    for name, launcher_name in _LAUNCHERS.items():
        launcher = getattr(kernels, launcher_name)
        definitions.impl(name, launcher, "CompositeExplicitAutograd")
        observer.register_implementation(getattr(namespace, name).default, launcher)


def _launchers(ops: LibraryOps) -> FusedKernels:
    kernels = _kernels.get(ops.library)
    if kernels is None:
        raise RuntimeError(f"torch.ops.{ops.library}: no kernels are registered for this library")
    return kernels


def eager(x: Tensor) -> bool:
    """Whether a call on ``x`` may go to the launchers without the op's dispatch (~8 µs each): a
    plain tensor on a real device, no dispatch mode (the ledger's recording, FakeTensorMode,
    torch.compile's tracing), no functorch transform and no torch.jit.trace, each of which must see
    the op. The launchers are the ops' implementations, so both routes run the same code."""
    return (
        not torch.compiler.is_compiling()  # first: what Dynamo traces stops here
        and type(x) is Tensor
        and x.device.type != "meta"
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._functorch.peek_interpreter_stack() is None
        # a wrapper leaked out of a finished transform has no storage: the op route unwraps it
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
        and not torch._C._is_tracing()  # torch.jit.is_tracing() without its Python wrapper
    )


def _fake_geometry(weight: Tensor, stride: list, padding: list, dilation: list) -> ConvGeometry:
    # Not cached: under dynamic shapes the sizes are SymInts, which do not hash.
    return ConvGeometry.from_op_padding((weight.shape[2], weight.shape[3]), stride, padding, dilation)


# Fakes (meta tensors, torch.compile) -------------------------------------------------------------


def _conv2d_fused_fake(
    x, weight, scale, shift, encoder_weight, encoder_bias, decoder_weight, stride, padding,
    dilation, relu,
):  # fmt: skip
    oh, ow = _fake_geometry(weight, stride, padding, dilation).output_size(x.shape[2], x.shape[3])
    return x.new_empty((x.shape[0], oh, ow, weight.shape[0])).permute(0, 3, 1, 2)


def _conv2d_fused_backward_fake(
    grad_output, x, output, weight, scale, encoder_weight, encoder_bias, decoder_weight, stride,
    padding, dilation, relu, coder_grads=True,
):  # fmt: skip
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


def _conv2d_fused_train_fake(
    x, weight, bias, norm_weight, norm_bias, encoder_weight, encoder_bias, decoder_weight, stride,
    padding, dilation, relu, eps,
):  # fmt: skip
    oh, ow = _fake_geometry(weight, stride, padding, dilation).output_size(x.shape[2], x.shape[3])
    c_out = weight.shape[0]

    def image() -> Tensor:
        return x.new_empty((x.shape[0], oh, ow, c_out)).permute(0, 3, 1, 2)

    def vector() -> Tensor:
        return x.new_empty((c_out,), dtype=torch.float32)

    return image(), image(), vector(), vector(), vector()


def _conv2d_fused_train_backward_fake(
    grad_output, x, output, learner, mean, rstd, weight, norm_weight, norm_bias, encoder_weight,
    encoder_bias, decoder_weight, stride, padding, dilation, relu, coder_grads,
):  # fmt: skip
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


def _batch_norm_running_update_fake(running_mean, running_var, mean, variance, momentum, pixels):
    return None


# Autograd ----------------------------------------------------------------------------------------


def _refuse_double_backward() -> None:
    """The backward kernels' outputs carry no graph: with ``create_graph=True`` (grad mode on in a
    backward) a second derivative would silently miss their part. Refused instead (the torch
    backend supports double backward)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "double backward (create_graph=True) is not supported by the fused PNNH kernels: use "
            "backend='torch' for higher-order gradients"
        )


def _coder_grads(
    coder: tuple[Optional[Tensor], ...], grads: tuple[Optional[Tensor], ...]
) -> tuple[Optional[Tensor], ...]:
    """The coder's gradients in its parameters' dtypes; None for an absent parameter or where none
    was computed (a fixed coder)."""
    return tuple(
        None if parameter is None or grad is None else in_dtype(grad, parameter.dtype)
        for parameter, grad in zip(coder, grads)
    )


class Conv2dFused(torch.autograd.Function):
    """Autograd of ``conv2d_fused``: the backward op gives dx, the unscaled dW, d shift and the
    coder's; d scale and the scaled dW are formed here."""

    @staticmethod
    def forward(ctx: Any, ops: LibraryOps, *args: Any) -> Tensor:
        if eager(args[0]):  # launches: nothing below autograd to dispatch to
            output = _launchers(ops).conv_forward(*args)
        else:
            with torch._C._AutoDispatchBelowAutograd():  # to the implementation (or the fake)
                output = ops.conv2d_fused(*args)
        x, weight, scale, shift, encoder_weight, encoder_bias, decoder_weight = args[:7]
        ctx.save_for_backward(x, output, weight, scale, encoder_weight, encoder_bias, decoder_weight)
        ctx.ops, ctx.arguments, ctx.has_shift = ops, args[7:], shift is not None
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple:
        _refuse_double_backward()
        x, output, weight, scale, encoder_weight, encoder_bias, decoder_weight = ctx.saved_tensors
        stride, padding, dilation, relu = ctx.arguments
        arguments = (
            grad_output, x, output, weight, scale, encoder_weight, encoder_bias, decoder_weight,
            stride, padding, dilation, relu, any(ctx.needs_input_grad[5:8]),
        )  # fmt: skip
        if eager(x):
            grads = _launchers(ctx.ops).conv_backward(*arguments, op_outputs=False)
        else:
            grads = ConvGradients.from_op_outputs(ctx.ops.conv2d_fused_backward(*arguments))
        grad_weight_unscaled, grad_shift = grads.weight_unscaled, grads.shift
        grad_scale = None
        if scale is not None:
            # d(scale)[c] = sum_pixels dp * conv(x)[c] = <W[c], dW_unscaled[c]> (no division by scale).
            grad_scale = (grad_weight_unscaled * permuted_weight(weight).float()).sum((0, 1, 2))
            grad_weight_unscaled = grad_weight_unscaled * scale
        grad_weight = grad_weight_unscaled.permute(3, 2, 0, 1).to(weight.dtype)
        coder = _coder_grads(
            (encoder_weight, encoder_bias, decoder_weight),
            (grads.encoder_weight, grads.encoder_bias, grads.decoder_weight),
        )
        shift = grad_shift if ctx.has_shift else None
        return (None, grads.input, grad_weight, grad_scale, shift, *coder, None, None, None, None)


class Conv2dFusedTrain(torch.autograd.Function):
    """Autograd of ``conv2d_fused_train``: BatchNorm's reductions and dz in the backward's kernels,
    the coder's weight gradients only for a trainable coder."""

    @staticmethod
    def forward(ctx: Any, ops: LibraryOps, *args: Any) -> tuple:
        if eager(args[0]):  # launches: nothing below autograd to dispatch to
            output, learner, mean, variance, rstd = _launchers(ops).conv_forward_train(*args)
        else:
            with torch._C._AutoDispatchBelowAutograd():  # to the implementation (or the fake)
                output, learner, mean, variance, rstd = ops.conv2d_fused_train(*args)
        x, weight, bias, norm_weight, norm_bias, encoder_weight, encoder_bias, decoder_weight = args[:8]
        ctx.save_for_backward(
            x, output, learner, mean, rstd, weight, norm_weight, norm_bias, encoder_weight,
            encoder_bias, decoder_weight,
        )  # fmt: skip
        ctx.ops, ctx.arguments, ctx.has_bias = ops, args[8:12], bias is not None
        # z, mean, variance and rstd are for the backward and the running statistics (under
        # no_grad): non-differentiable, so a loss built on them raises instead of getting zero
        # gradients, and no zero gradients are materialised for them (an activation-sized fill).
        ctx.mark_non_differentiable(learner, mean, variance, rstd)
        ctx.set_materialize_grads(False)
        return output, learner, mean, variance, rstd

    @staticmethod
    def backward(ctx: Any, grad_output: Optional[Tensor], *unused: Optional[Tensor]) -> tuple:
        _refuse_double_backward()
        if grad_output is None:
            return (None,) * 14
        (
            x, output, learner, mean, rstd, weight, norm_weight, norm_bias, encoder_weight,
            encoder_bias, decoder_weight,
        ) = ctx.saved_tensors  # fmt: skip
        stride, padding, dilation, relu = ctx.arguments
        arguments = (
            grad_output, x, output, learner, mean, rstd, weight, norm_weight, norm_bias,
            encoder_weight, encoder_bias, decoder_weight, stride, padding, dilation, relu,
            any(ctx.needs_input_grad[6:9]),
        )  # fmt: skip
        if eager(x):
            grads = _launchers(ctx.ops).conv_backward_train(*arguments, op_outputs=False)
        else:
            grads = TrainingGradients.from_op_outputs(ctx.ops.conv2d_fused_train_backward(*arguments))
        coder = _coder_grads(
            (encoder_weight, encoder_bias, decoder_weight),
            (grads.encoder_weight, grads.encoder_bias, grads.decoder_weight),
        )
        return (
            None,
            grads.input,
            grads.weight,
            # Exactly zero (training BatchNorm subtracts the batch mean, which cancels any
            # per-channel constant before it; a sum of dz would only return its rounding: it failed
            # an fp32 check on an H200, 1.7e-5 where PyTorch's own error was 6.7e-6), or NaN where
            # dz is not finite, as PyTorch's: written by the BatchNorm finalize kernel.
            grads.learner_bias if ctx.has_bias else None,
            grads.norm_weight if norm_weight is not None else None,
            grads.norm_bias if norm_bias is not None else None,
            *coder,
            None,
            None,
            None,
            None,
            None,
        )


def _direct_apply(function: type[torch.autograd.Function]) -> Any:
    """``function.apply`` without its Python preamble (default-argument binding for a
    ``setup_context`` these Functions do not define, functorch's dead-wrapper unwrapping): ~4 µs a
    call on the development CPU. Only for the eager route, which :func:`eager` admits only while no
    functorch transform is active; the op's Autograd kernel keeps the full ``apply``."""
    return super(torch.autograd.Function, function).apply


def _autograd_kernel(function: type[torch.autograd.Function], ops: LibraryOps, name: str):
    """The op's Autograd kernel (a call of torch.ops.<library>.<name>): the Function, or straight
    below autograd when no input needs a gradient."""
    op = getattr(ops, name)

    def kernel(keyset: Any, *args: Any) -> Any:
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return function.apply(ops, *args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    return kernel


apply_fused = _direct_apply(Conv2dFused)
apply_fused_train = _direct_apply(Conv2dFusedTrain)


# Registration ------------------------------------------------------------------------------------


class LibraryOps(NamedTuple):
    """One library's name and OpOverloads."""

    library: str
    conv2d_fused: Any
    conv2d_fused_backward: Any
    conv2d_fused_train: Any
    conv2d_fused_train_backward: Any
    batch_norm_running_update: Any


_FAKES = {
    "conv2d_fused": _conv2d_fused_fake,
    "conv2d_fused_backward": _conv2d_fused_backward_fake,
    "conv2d_fused_train": _conv2d_fused_train_fake,
    "conv2d_fused_train_backward": _conv2d_fused_train_backward_fake,
    "batch_norm_running_update": _batch_norm_running_update_fake,
}
# Kept alive: a dropped Library deregisters its ops. The implementations come with register_kernels.
_libraries: dict[str, torch.library.Library] = {}


def _define(library: str) -> LibraryOps:
    definitions = _libraries[library] = torch.library.Library(library, "DEF")
    namespace = getattr(torch.ops, library)
    for name, schema in _SCHEMAS.items():
        definitions.define(schema)
        torch.library.register_fake(f"{library}::{name}", _FAKES[name], lib=definitions)
    ops = LibraryOps(library, *(getattr(namespace, name).default for name in _SCHEMAS))
    for function, name in ((Conv2dFused, "conv2d_fused"), (Conv2dFusedTrain, "conv2d_fused_train")):
        definitions.impl(name, _autograd_kernel(function, ops, name), "Autograd", with_keyset=True)
    return ops


OPS: dict[str, LibraryOps] = {library: _define(library) for library in LIBRARIES}


# The backend functions (what pnnh_conv2d calls) -------------------------------------------------


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    if device.type == "meta":  # autocast has no meta device (the ledger runs steps on meta)
        return None
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def coder_in(coder: Any, dtype: torch.dtype) -> tuple[Optional[Tensor], ...]:
    """(W_E, b_E, W_D) in the compute dtype, each None where absent (no copy where it is already)."""
    if coder is None:
        return (None, None, None)
    return tuple(None if t is None else in_dtype(t, dtype) for t in coder)


def enters_function(args: tuple) -> bool:
    """Whether a call goes into the autograd Function directly: an :func:`eager` call that needs
    gradients (the op's Autograd kernel, which the other calls reach, does the same with a frame
    and a dispatch more)."""
    return torch.is_grad_enabled() and eager(args[0]) and torch._C._any_requires_grad(*args)


def conv2d(library: str, call: ConvCall) -> Tensor:
    """The fused backend's conv2d: apply autocast; training BatchNorm through conv2d_fused_train
    (batch statistics from the kernels, running statistics updated as F.batch_norm updates them:
    momentum, unbiased variance); the learner's bias and an eval BatchNorm folded into the scale and
    shift of conv2d_fused."""
    ops = OPS[library]
    norm, geometry, x = call.norm, call.geometry, call.input
    compute_dtype = autocast_dtype(x.device) or x.dtype
    inputs = (in_dtype(x, compute_dtype), in_dtype(call.weight, compute_dtype))
    coder = coder_in(call.coder, compute_dtype)
    relu = call.activation == "relu"
    bias = None if call.bias is None else in_dtype(call.bias, torch.float32)
    if norm is not None and norm.training:
        n = x.shape[0]
        oh, ow = geometry.output_size(x.shape[2], x.shape[3])
        count = n * oh * ow
        if count <= 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{torch.Size([n, call.weight.shape[0], oh, ow])}"
            )
        args = (
            *inputs, bias, norm.weight, norm.bias, *coder, geometry.stride_list,
            geometry.op_padding, geometry.dilation_list, relu, norm.eps,
        )  # fmt: skip
        direct = eager(x)
        if direct and torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            out, _, mean, variance, _ = apply_fused_train(ops, *args)
        else:
            out, _, mean, variance, _ = ops.conv2d_fused_train(*args)
        if norm.running_mean is not None and norm.running_var is not None:
            running = (norm.running_mean, norm.running_var, mean, variance, norm.momentum, count)
            if direct:  # a launch, which autograd does not see: no no_grad block needed
                _launchers(ops).update_running_statistics(*running)
            else:
                with torch.no_grad():
                    ops.batch_norm_running_update(*running)
        return out.contiguous(memory_format=memory_format_of(x))
    scale: Optional[Tensor] = None
    shift = bias
    if norm is not None:
        inv_std = torch.rsqrt(norm.running_var.float() + norm.eps)
        scale = inv_std if norm.weight is None else norm.weight.float() * inv_std
        shift_bn = -norm.running_mean.float() * scale
        if norm.bias is not None:
            shift_bn = shift_bn + norm.bias.float()
        shift = shift_bn if shift is None else shift_bn + shift * scale
    args = (
        *inputs, scale, shift, *coder, geometry.stride_list, geometry.op_padding,
        geometry.dilation_list, relu,
    )  # fmt: skip
    out = apply_fused(ops, *args) if enters_function(args) else ops.conv2d_fused(*args)
    return out.contiguous(memory_format=memory_format_of(x))
