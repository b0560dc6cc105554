"""NaN and Inf through every backend, forward and backward, as PyTorch's ops treat them.

PyTorch's ReLU keeps NaN (``relu(nan) = nan``, ``relu(-inf) = 0``) and its backward zeroes the
gradient only where the output is ``<= 0``, so a NaN output passes its gradient on and a NaN gradient
where the output is ``<= 0`` is dropped. A kernel that writes ``max(v, 0)`` or masks with ``v > 0``
turns a diverged layer into zeros: the NaN check of a training run never fires.

One element (or, for the output gradient, one channel plane) is poisoned with NaN, +Inf or -Inf in
each tensor in turn; the op under test must give the float64 reference's NaN and Inf pattern exactly
and its finite values to fp32's tolerance. The reference (tests/reference.py) shares no code with
pnnh_kernels; its ReLU is ``where(v <= 0, 0, v)``, PyTorch's semantics including the gradient.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import pytest
import torch
from torch import Tensor

from pnnh_kernels.backends.fused_common import poisoned_outputs
from pnnh_kernels.functional import BatchNormParams, pnnh_conv2d, pnnh_linear
from tests.conv_cases import DEVICE
from tests.reference import (
    assert_matches,
    pnnh_conv2d_reference,
    pnnh_linear_reference,
    random_layer_tensors,
)

BACKENDS = ["torch", "triton", "cuda"]
LAYER_SITES = ["input", "weight", "bias", "encoder_weight", "encoder_bias", "decoder_weight"]
NORM_SITES = ["norm.weight", "norm.bias"]
# Triton's interpreter multiplies in numpy, which warns at each Inf * 0: the point of these tests.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


@pytest.fixture
def backend(request) -> str:
    name = request.param
    if name == "cuda" and not torch.cuda.is_available():
        request.getfixturevalue("emulated_cuda_backend")  # the CUDA source on the CPU
    return name


@dataclasses.dataclass
class Poison:
    site: str
    value: float

    def apply(self, tensors: dict[str, Tensor]) -> None:
        """Poison one element of ``tensors[site]`` in place (a whole channel plane of the output
        gradient, so that it meets outputs on both sides of the ReLU)."""
        target = tensors[self.site]
        if self.site == "grad_output":
            target[0, 1] = self.value
        elif self.site == "weight" and target.dim() == 4:
            # The centre tap, which reads no padding: whether a NaN weight times a padding zero is
            # computed is PyTorch's own choice per implementation (its CPU convolution skips the
            # padding, the reference multiplies it), so a tap that reads padding has no one answer.
            target[2, 1, target.shape[2] // 2, target.shape[3] // 2] = self.value
        else:
            target.view(-1)[target.numel() // 2] = self.value


def _assert_same_nonfinite(
    actual: Tensor, expected: Tensor, what: str, inf_may_be_nan: bool = False
) -> None:
    """The same NaN, +Inf and -Inf elements as the reference, and its finite values.
    ``inf_may_be_nan``: an Inf of the reference may come back as NaN or the other way round, for a
    gradient the backend computes through a regrouped sum (see _regrouped)."""
    actual = actual.detach().cpu().double()
    expected = expected.detach()
    if inf_may_be_nan:
        actual, expected = (torch.where(t.isinf(), float("nan"), t) for t in (actual, expected))
    for name, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        got, want = test(actual), test(expected)
        if not torch.equal(got, want):
            where = (got != want).nonzero()[:4].tolist()
            raise AssertionError(
                f"{what}: {name} at {int(got.sum())} elements, the reference at {int(want.sum())}; "
                f"first differences at {where} (got {actual[tuple(where[0])]!r}, "
                f"expected {expected[tuple(where[0])]!r})"
            )
    finite = torch.isfinite(expected)
    assert_matches(torch.where(finite, actual, 0), torch.where(finite, expected, 0), torch.float32, what)


def _run_conv(backend: str, poison: Poison, norm_mode: Optional[str], relu: bool = True) -> None:
    c_in = c_out = 4
    tensors = random_layer_tensors(c_in, c_out, 2, False, torch.float64, 3)
    tensors = {k: v.float().double() for k, v in tensors.items()}
    tensors["input"] = torch.randn(2, c_in, 5, 6, dtype=torch.float64).float().double()
    norm: dict[str, Tensor] = {}
    if norm_mode is not None:
        norm = {
            "norm.weight": torch.randn(c_out, dtype=torch.float64).float().double(),
            "norm.bias": torch.randn(c_out, dtype=torch.float64).float().double(),
        }
    running = (torch.rand(c_out).double() - 0.5, torch.rand(c_out).double() + 0.5)
    leaves64 = {**tensors, **norm}
    if poison.site != "grad_output":
        poison.apply(leaves64)
    leaves64 = {k: v.clone().requires_grad_(True) for k, v in leaves64.items()}
    layer_args = {k: leaves64[k] for k in LAYER_SITES if k != "input"}
    norm64 = None
    if norm_mode is not None:
        norm64 = {
            "running_mean": running[0].clone(),
            "running_var": running[1].clone(),
            "weight": leaves64["norm.weight"],
            "bias": leaves64["norm.bias"],
            "training": norm_mode == "train",
            "eps": 1e-5,
        }
    expected = pnnh_conv2d_reference(
        leaves64["input"], **layer_args, stride=(1, 1), padding=(1, 1), dilation=(1, 1),
        activation="relu" if relu else None, norm=norm64,
    )  # fmt: skip
    grad = torch.randn_like(expected).float().double()
    if poison.site == "grad_output":
        Poison("grad_output", poison.value).apply({"grad_output": grad})
    expected.backward(grad)

    leaves = {k: v.detach().float().to(DEVICE).requires_grad_(True) for k, v in leaves64.items()}
    norm_params = None
    if norm_mode is not None:
        norm_params = BatchNormParams(
            running[0].float().to(DEVICE), running[1].float().to(DEVICE), leaves["norm.weight"],
            leaves["norm.bias"], norm_mode == "train", 0.1, 1e-5,
        )  # fmt: skip
    with poisoned_outputs():
        out = pnnh_conv2d(
            leaves["input"], **{k: leaves[k] for k in layer_args}, padding=1, norm=norm_params,
            activation="relu" if relu else None, backend=backend,
        )  # fmt: skip
        out.backward(grad.float().to(DEVICE))
    label = f"{backend}, {poison.site}={poison.value}, norm {norm_mode}"
    _assert_same_nonfinite(out, expected, f"{label}: output")
    for name, leaf in leaves.items():
        _assert_same_nonfinite(
            leaf.grad, leaves64[name].grad, f"{label}: grad {name}",
            _regrouped(backend, name, norm_mode, poison),
        )  # fmt: skip


def _regrouped(backend: str, name: str, norm_mode: Optional[str], poison: Poison) -> bool:
    """Whether an Inf of the reference's gradient ``name`` may be NaN here or the other way round.

    The fused backends fold eval-mode BatchNorm into a per-channel scale and compute gamma's
    gradient as ``sum_k W[o, k] * dW_unscaled[o, k]`` (one value per weight) instead of PyTorch's
    ``sum_p dp[p] * x_hat[p]`` (one per pixel): the same number for finite inputs, but an Inf weight
    meets no masked zero ``dp`` in the first form, so ``0 * Inf = NaN`` there becomes +-Inf. Both
    are non-finite; the NaN checks keep the exact pattern.
    """
    return (
        backend != "torch" and name == "norm.weight" and norm_mode == "eval"
        and math.isinf(poison.value)
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("norm_mode", ["eval", "train"])
@pytest.mark.parametrize("site", ["grad_output", *LAYER_SITES, *NORM_SITES])
def test_conv_nan(backend, norm_mode, site):
    _run_conv(backend, Poison(site, VALUES["nan"]), norm_mode)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("value", ["inf", "-inf"])
@pytest.mark.parametrize("site", ["input", "grad_output", "weight", "encoder_weight"])
def test_conv_inf_eval_norm(backend, value, site):
    _run_conv(backend, Poison(site, VALUES[value]), "eval")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("site", ["input", "grad_output"])
def test_conv_nan_without_norm_or_relu(backend, site):
    _run_conv(backend, Poison(site, VALUES["nan"]), None, relu=False)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_all_nan_input_gives_all_nan_output(backend):
    # The reproduction: an all-NaN input must not come back as zeros.
    from pnnh_kernels import FusedPNNHConv

    layer = FusedPNNHConv(8, 8, coder_init="he", backend=backend).to(DEVICE)
    out = layer(torch.full((1, 8, 4, 4), float("nan"), device=DEVICE))
    assert int(out.isnan().sum()) == out.numel() == 128


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("site", ["input", "grad_output", "weight", "encoder_weight"])
@pytest.mark.parametrize("value", ["nan", "-inf"])
def test_linear(backend, site, value):
    tensors = random_layer_tensors(6, 5, 3, False, torch.float64)
    tensors = {k: v.float().double() for k, v in tensors.items()}
    tensors["input"] = torch.randn(3, 4, 6, dtype=torch.float64).float().double()
    poison = Poison(site, VALUES[value])
    if site != "grad_output":
        poison.apply(tensors)
    leaves64 = {k: v.clone().requires_grad_(True) for k, v in tensors.items()}
    args = {k: leaves64[k] for k in LAYER_SITES if k != "input"}
    expected = pnnh_linear_reference(leaves64["input"], **args, activation="relu")
    grad = torch.randn_like(expected).float().double()
    if site == "grad_output":
        grad[0, 1] = poison.value
    expected.backward(grad)
    leaves = {k: v.detach().float().to(DEVICE).requires_grad_(True) for k, v in leaves64.items()}
    with poisoned_outputs():
        out = pnnh_linear(
            leaves["input"], **{k: leaves[k] for k in args}, activation="relu", backend=backend
        )
        out.backward(grad.float().to(DEVICE))
    label = f"linear {backend}, {site}={value}"
    _assert_same_nonfinite(out, expected, f"{label}: output")
    for name, leaf in leaves.items():
        _assert_same_nonfinite(leaf.grad, leaves64[name].grad, f"{label}: grad {name}")


def test_reference_relu_is_pytorchs():
    # The reference's ReLU must itself behave as torch.relu, values and gradient, or the checks
    # above would compare the kernels with the wrong semantics.
    from tests.reference import _relu

    v = torch.tensor([float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 2.0], dtype=torch.float64)
    g = torch.tensor([1.0, 2.0, 3.0, float("nan"), float("nan"), 5.0], dtype=torch.float64)
    ours, theirs = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    _relu(ours).backward(g)
    torch.relu(theirs).backward(g)
    assert torch.equal(_relu(v).isnan(), torch.relu(v).isnan())
    assert torch.equal(torch.nan_to_num(_relu(v)), torch.nan_to_num(torch.relu(v)))
    assert torch.equal(ours.grad.isnan(), theirs.grad.isnan())
    assert torch.equal(torch.nan_to_num(ours.grad), torch.nan_to_num(theirs.grad))
