"""Cases and checks shared by the fused backends' tests (Triton: test_triton_conv.py, CUDA:
test_cuda_conv.py): fresh random inputs, the float64 reference, NaN-poisoned outputs."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Optional

import torch

from pnnh_kernels import FusedPNNHConv
from pnnh_kernels.backends.fused_common import poisoned_outputs
from pnnh_kernels.functional import pnnh_conv2d
from tests.reference import (
    assert_matches,
    conv2d_by_taps,
    pnnh_conv2d_reference,
    random_layer_tensors,
    relu_deciding_like,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _forced(config: Optional[Any]) -> Any:
    if config is None:
        return contextlib.nullcontext()
    from pnnh_kernels.triton.pnnh_conv_config import forced_config

    return forced_config(config)


@dataclasses.dataclass(frozen=True)
class Case:
    n: int
    c_in: int
    c_out: int
    c_b: int
    kernel: int
    stride: int
    dilation: int
    h: int
    w: int
    tied: bool = True  # only where c_in == c_out; a tied coder needs a square layer
    bias: bool = True
    norm: bool = False
    relu: bool = True

    @property
    def is_tied(self) -> bool:
        return self.tied and self.c_in == self.c_out

    def __str__(self) -> str:
        parts = [
            f"n{self.n}",
            f"{self.c_in}-{self.c_b}-{self.c_out}",
            f"k{self.kernel}s{self.stride}d{self.dilation}",
            f"{self.h}x{self.w}",
            "tied" if self.is_tied else "untied",
        ]
        parts += [] if self.bias else ["nobias"]
        parts += ["bn"] if self.norm else []
        parts += [] if self.relu else ["linear"]
        return "-".join(parts)


CASES = [
    Case(3, 5, 5, 2, 3, 1, 1, 7, 5),
    Case(1, 6, 6, 3, 3, 2, 1, 5, 7, bias=False),
    Case(3, 7, 7, 7, 3, 1, 1, 1, 1),  # C_B = C, 1x1 image: all taps but the centre in padding
    Case(1, 5, 5, 1, 3, 2, 1, 1, 5, norm=True),  # C_B = 1
    Case(3, 4, 9, 2, 1, 1, 1, 5, 5, tied=False),  # 1x1 learner, untied (wider)
    Case(2, 9, 4, 4, 1, 2, 1, 7, 7, tied=False, relu=False),  # untied (narrower), strided 1x1
    Case(1, 6, 6, 3, 3, 1, 2, 7, 7, norm=True),  # dilation 2
    Case(3, 5, 7, 0, 3, 2, 1, 7, 5),  # no coder: the plain layer
    Case(2, 6, 6, 3, 5, 2, 1, 7, 7, norm=True, relu=False),
    Case(1, 4, 4, 2, 2, 1, 2, 5, 7),  # even kernel with even dilation: no centre tap
    Case(2, 5, 6, 2, 3, 2, 2, 7, 5, tied=False, bias=False, norm=True),
]


# For the CUDA kernels: channel counts around their 64-channel tiles and 32-channel slices; rows
# 16-byte aligned (cp.async) and ragged (element-wise copies); several code chunks; strided; enough
# pixels for several pixel tiles.
CUDA_TILE_CASES = [
    Case(2, 72, 70, 40, 3, 1, 1, 9, 11),
    Case(1, 96, 96, 80, 3, 2, 1, 13, 9, norm=True),  # code in two 64-channel chunks
    Case(3, 130, 66, 33, 1, 1, 1, 5, 7, tied=False),
    Case(2, 64, 64, 32, 3, 1, 1, 16, 16),  # every row vectorised
    Case(1, 33, 129, 17, 3, 2, 2, 11, 13, tied=False, relu=False),
]


@dataclasses.dataclass(frozen=True)
class PaddingCase:
    """A layer without a coder whose "same"-like padding is asymmetric: ``dilation * (kernel - 1)``
    odd in a dimension, so the padding after the image (bottom/right) is one more than before it."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: Optional[str]  # "same" (stride 1) or None ("same"-like, any stride)
    h: int
    w: int

    def __str__(self) -> str:
        k, s, d = ("x".join(map(str, pair)) for pair in (self.kernel, self.stride, self.dilation))
        return f"k{k}-s{s}-d{d}-{self.padding}-{self.h}x{self.w}"


ASYMMETRIC_PADDING_CASES = [
    PaddingCase((2, 2), (1, 1), (1, 1), "same", 6, 7),
    PaddingCase((4, 3), (1, 1), (1, 3), "same", 7, 5),  # asymmetric in height only
    PaddingCase((2, 5), (2, 2), (3, 1), None, 7, 8),  # strided, asymmetric in height only
    PaddingCase((4, 2), (1, 2), (1, 1), None, 5, 9),
]


def check_asymmetric_padding(
    case: PaddingCase, dtype: torch.dtype = torch.float32, backend: str = "triton"
) -> None:
    """FusedPNNHConv without a coder against the float64 reference with the padding nn.Conv2d uses
    for "same": ``dilation * (kernel - 1)`` zeros, the extra one at the bottom/right; output and the
    gradients of input, weight and bias."""
    spans = [d * (k - 1) for d, k in zip(case.dilation, case.kernel)]
    top_left = (spans[0] // 2, spans[1] // 2)
    bottom_right = (spans[0] - top_left[0], spans[1] - top_left[1])
    assert top_left != bottom_right, f"{case}: the padding is symmetric"
    c_in, c_out = 5, 6
    layer = FusedPNNHConv(
        c_in,
        c_out,
        case.kernel,
        stride=case.stride,
        padding=case.padding,
        dilation=case.dilation,
        coder_channels=0,
        activation=None,
        backend=backend,
        device=DEVICE,
        dtype=dtype,
    )
    weight64 = layer.weight.detach().double().cpu().requires_grad_(True)
    bias64 = layer.bias.detach().double().cpu().requires_grad_(True)
    x64 = torch.randn(2, c_in, case.h, case.w, dtype=torch.float64).to(dtype).double()
    x64.requires_grad_(True)
    expected = conv2d_by_taps(
        x64, weight64, bias64, case.stride, top_left, case.dilation, padding_end=bottom_right
    )
    grad_out = torch.randn_like(expected).to(dtype).double()
    expected.backward(grad_out)
    x = x64.detach().to(DEVICE, dtype).requires_grad_(True)
    with poisoned_outputs():
        out = layer(x)
        out.backward(grad_out.to(DEVICE, dtype))
    assert_matches(out.cpu(), expected.detach(), dtype, f"{case}: output")
    assert_matches(x.grad.cpu(), x64.grad, dtype, f"{case}: grad input")
    assert_matches(layer.weight.grad.cpu(), weight64.grad, dtype, f"{case}: grad weight")
    assert_matches(layer.bias.grad.cpu(), bias64.grad, dtype, f"{case}: grad bias")


def _norm_state(c_out: int) -> dict:
    return {
        "running_mean": torch.randn(c_out, dtype=torch.float64),
        "running_var": torch.rand(c_out, dtype=torch.float64) + 0.5,
        "weight": torch.randn(c_out, dtype=torch.float64),
        "bias": torch.randn(c_out, dtype=torch.float64),
        "eps": 1e-5,
    }


def check_case(
    case: Case,
    dtype: torch.dtype = torch.float32,
    config: Optional[Any] = None,
    backend: str = "triton",
) -> None:
    """Run a fused backend's op and the float64 reference on the same fresh inputs; compare all
    results. ``config``: Triton tile sizes to force (Triton only)."""
    tensors = random_layer_tensors(
        case.c_in, case.c_out, case.c_b, case.is_tied, torch.float64, case.kernel
    )
    if not case.bias:
        tensors["bias"] = None
    norm = _norm_state(case.c_out) if case.norm else None
    # Round every input to the tested dtype first: the comparison then measures the op's own error.
    tensors = {k: None if v is None else v.to(dtype).double() for k, v in tensors.items()}
    x64 = torch.randn(case.n, case.c_in, case.h, case.w, dtype=torch.float64).relu().to(dtype).double()
    leaves64 = {k: v.clone().requires_grad_(True) for k, v in tensors.items() if v is not None}
    norm64 = None
    if norm is not None:
        norm64 = {**norm, "weight": norm["weight"].clone().requires_grad_(True)}
        norm64["bias"] = norm["bias"].clone().requires_grad_(True)
    x64.requires_grad_(True)
    padding = (case.dilation * (case.kernel - 1) // 2,) * 2
    pre = pnnh_conv2d_reference(
        x64,
        **{k: leaves64.get(k) for k in tensors},
        stride=(case.stride,) * 2,
        padding=padding,
        dilation=(case.dilation,) * 2,
        activation=None,
        norm=None if norm64 is None else {**norm64, "training": False},
    )
    grad_out = torch.randn_like(pre).to(dtype).double()

    leaves = {k: v.detach().to(DEVICE, dtype).requires_grad_(True) for k, v in leaves64.items()}
    x = x64.detach().to(DEVICE, dtype).to(memory_format=torch.channels_last).requires_grad_(True)
    norm_params = None
    norm_leaves = {}
    if norm64 is not None:
        from pnnh_kernels.functional import BatchNormParams

        norm_leaves = {
            "weight": norm64["weight"].detach().to(DEVICE, torch.float32).requires_grad_(True),
            "bias": norm64["bias"].detach().to(DEVICE, torch.float32).requires_grad_(True),
        }
        norm_params = BatchNormParams(
            norm64["running_mean"].to(DEVICE, torch.float32),
            norm64["running_var"].to(DEVICE, torch.float32),
            norm_leaves["weight"],
            norm_leaves["bias"],
            False,
            0.1,
            norm64["eps"],
        )
    with poisoned_outputs(), _forced(config):
        out = pnnh_conv2d(
            x,
            **{k: leaves.get(k) for k in tensors},
            stride=case.stride,
            dilation=case.dilation,
            norm=norm_params,
            activation="relu" if case.relu else None,
            backend=backend,
        )
        assert out.dtype == dtype
        if not x.is_contiguous():  # unambiguously channels_last (not C == 1 or H == W == 1)
            assert out.is_contiguous(memory_format=torch.channels_last)
        out.backward(grad_out.to(DEVICE, dtype))
    # The reference decides the output ReLU, except within rounding of zero (see relu_deciding_like).
    expected = relu_deciding_like(pre, out.cpu(), dtype) if case.relu else pre
    expected.backward(grad_out)
    assert_matches(out.cpu(), expected.detach(), dtype, f"{case}: output")
    assert_matches(x.grad.cpu(), x64.grad, dtype, f"{case}: grad input")
    for name, leaf in leaves.items():
        assert_matches(leaf.grad.cpu(), leaves64[name].grad, dtype, f"{case}: grad {name}")
    for name, leaf in norm_leaves.items():
        assert_matches(leaf.grad.cpu(), norm64[name].grad, dtype, f"{case}: grad norm.{name}")


TRAINING_CASES = [
    Case(3, 5, 5, 2, 3, 1, 1, 7, 5, norm=True),
    Case(2, 6, 9, 3, 3, 2, 1, 5, 7, tied=False, bias=False, norm=True),
    Case(4, 7, 7, 0, 3, 1, 2, 5, 5, norm=True, relu=False),
    Case(1, 4, 4, 4, 1, 1, 1, 3, 5, norm=True),
    Case(2, 33, 33, 20, 3, 1, 1, 5, 4, norm=True),  # several tiles and chunks with small Triton tiles
]


def check_training_case(
    case: Case, config: Optional[Any] = None, backend: str = "triton", coder_trainable: bool = True
) -> None:
    """Training-mode BatchNorm on a fused backend against the float64 reference and
    nn.BatchNorm2d's running statistics. ``coder_trainable=False``: the default fixed
    rectified-isometry coder, whose parameters must get no gradient."""
    torch.manual_seed(1)
    layer = FusedPNNHConv(
        case.c_in,
        case.c_out,
        case.kernel,
        stride=case.stride,
        dilation=case.dilation,
        bias=case.bias,
        coder_channels=case.c_b,
        norm="batch",
        activation="relu" if case.relu else None,
        backend=backend,
        **({"coder_init": "he", "coder_trainable": True} if coder_trainable else {}),
    ).to(DEVICE)
    if case.c_b and not case.is_tied:
        assert not layer.coder.tied
    with torch.no_grad():
        layer.norm.weight.normal_()
        layer.norm.bias.normal_()
        layer.norm.running_mean.normal_()
    reference = copy.deepcopy(layer).double().cpu()
    reference.backend = "torch"
    # PyTorch's own fp32 result: where a gradient cancels to about zero (the learner's bias under
    # training BatchNorm is exactly zero in theory), its rounding sets the tolerance (twice it).
    baseline = copy.deepcopy(layer)
    baseline.backend = "torch"
    layer.train()
    reference.train()
    baseline.train()
    assert layer.backend_in_use == backend
    x64 = torch.randn(case.n, case.c_in, case.h, case.w, dtype=torch.float64).relu()
    x = x64.to(DEVICE, torch.float32).requires_grad_(True)
    x64.requires_grad_(True)
    with poisoned_outputs(), _forced(config):
        out = layer(x)
        expected = reference(x64)
        grad = torch.randn_like(expected)
        out.backward(grad.to(DEVICE, torch.float32))
    expected.backward(grad)
    baseline(x64.detach().to(DEVICE, torch.float32)).backward(grad.to(DEVICE, torch.float32))
    assert_matches(out.cpu(), expected.detach(), torch.float32, f"{case}: output")
    assert_matches(x.grad.cpu(), x64.grad, torch.float32, f"{case}: grad input")
    for (name, param), twin, own in zip(
        layer.named_parameters(), reference.parameters(), baseline.parameters()
    ):
        if not param.requires_grad:  # a fixed coder
            assert param.grad is None, f"{case}: {name} got a gradient"
            assert twin.grad is None, f"{case}: the reference's {name} got a gradient"
            continue
        assert_matches(
            param.grad.cpu(), twin.grad, torch.float32, f"{case}: grad {name}", own.grad.cpu()
        )
    for name in ("running_mean", "running_var"):
        assert_matches(
            getattr(layer.norm, name).cpu(),
            getattr(reference.norm, name),
            torch.float32,
            f"{case}: {name}",
        )
    assert int(layer.norm.num_batches_tracked) == int(reference.norm.num_batches_tracked) == 1


def check_linear(
    leading: tuple[int, ...],
    c_in: int,
    c_out: int,
    c_b: int,
    dtype: torch.dtype,
    backend: str = "triton",
) -> None:
    """pnnh_linear on a fused backend against the float64 reference, output and every gradient."""
    from pnnh_kernels.functional import pnnh_linear
    from tests.reference import pnnh_linear_reference, relu_deciding_like

    tensors = random_layer_tensors(c_in, c_out, c_b, c_in == c_out, torch.float64)
    tensors = {k: None if v is None else v.to(dtype).double() for k, v in tensors.items()}
    x64 = torch.randn(*leading, c_in, dtype=torch.float64).to(dtype).double().requires_grad_(True)
    leaves64 = {k: v.clone().requires_grad_(True) for k, v in tensors.items() if v is not None}
    leaves = {k: v.detach().to(DEVICE, dtype).requires_grad_(True) for k, v in leaves64.items()}
    x = x64.detach().to(DEVICE, dtype).requires_grad_(True)
    with poisoned_outputs():
        out = pnnh_linear(x, **{k: leaves.get(k) for k in tensors}, backend=backend)
    pre = pnnh_linear_reference(x64, **{k: leaves64.get(k) for k in tensors}, activation=None)
    expected = relu_deciding_like(pre, out.cpu(), dtype)
    grad_out = torch.randn_like(expected).to(dtype).double()
    expected.backward(grad_out)
    with poisoned_outputs():
        out.backward(grad_out.to(DEVICE, dtype))
    assert out.shape == (*leading, c_out)
    assert_matches(out.cpu(), expected.detach(), dtype, "output")
    assert_matches(x.grad.cpu(), x64.grad, dtype, "grad input")
    for name, leaf in leaves.items():
        assert_matches(leaf.grad.cpu(), leaves64[name].grad, dtype, f"grad {name}")
