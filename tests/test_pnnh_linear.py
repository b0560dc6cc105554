"""FusedPNNHLinear and pnnh_linear against the independent float64 reference, nn.Linear and gradcheck."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pnnh_kernels import FusedPNNHLinear, PNNHCoder
from pnnh_kernels.functional import pnnh_linear
from tests.reference import (
    assert_matches,
    backends_for,
    pnnh_linear_reference,
    random_layer_tensors,
    relu_deciding_like,
)

FLOAT64_BACKENDS = backends_for(torch.float64, "linear")

BACKENDS = backends_for(torch.float32, "linear")


SHAPES = [
    pytest.param(7, 7, 3, (5,), id="tied-2d"),
    pytest.param(9, 13, 4, (2, 3), id="untied-3d"),
    pytest.param(11, 5, 0, (3,), id="no-coder"),
    pytest.param(6, 6, 6, (), id="tied-full-width-unbatched"),
]


@pytest.mark.parametrize(("c_in", "c_out", "c_b", "leading"), SHAPES)
@pytest.mark.parametrize("activation", ["relu", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_gradients_match_float64_reference(
    c_in, c_out, c_b, leading, activation, dtype, backend
):
    tensors = random_layer_tensors(c_in, c_out, c_b, c_in == c_out, torch.float64)
    # Round the inputs to the tested dtype first so that only the op's own error is measured.
    tensors = {k: None if v is None else v.to(dtype).double() for k, v in tensors.items()}
    x64 = torch.randn(*leading, c_in, dtype=torch.float64).to(dtype).double().requires_grad_(True)
    leaves64 = {k: v.clone().requires_grad_(True) for k, v in tensors.items() if v is not None}
    leaves = {k: v.detach().to(dtype).requires_grad_(True) for k, v in leaves64.items()}
    x = x64.detach().to(dtype).requires_grad_(True)
    actual = pnnh_linear(
        x, **{k: leaves.get(k) for k in tensors}, activation=activation, backend=backend
    )
    assert actual.dtype == dtype
    expected = pnnh_linear_reference(x64, **{k: leaves64.get(k) for k in tensors}, activation=None)
    if activation == "relu":
        expected = relu_deciding_like(expected, actual, dtype)
    grad_out = torch.randn_like(expected).to(dtype).double()
    expected.backward(grad_out)
    actual.backward(grad_out.to(dtype))
    # PyTorch's own result in this dtype, for the low-precision rule of assert_matches.
    twins = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    x_twin = x.detach().clone().requires_grad_(True)
    torch_out = pnnh_linear(
        x_twin, **{k: twins.get(k) for k in tensors}, activation=None, backend="torch"
    )
    if activation == "relu":
        torch_out = relu_deciding_like(torch_out, actual, dtype)
    torch_out.backward(grad_out.to(dtype))
    assert_matches(actual, expected.detach(), dtype, "output", torch_out)
    assert_matches(x.grad, x64.grad, dtype, "grad input", x_twin.grad)
    for name, leaf in leaves.items():
        assert_matches(leaf.grad, leaves64[name].grad, dtype, f"grad {name}", twins[name].grad)


@pytest.mark.parametrize(
    ("c_in", "c_out", "c_b", "tied"), [(4, 4, 2, True), (3, 5, 2, False), (4, 3, 0, False)]
)
@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_gradcheck_float64(c_in, c_out, c_b, tied, backend):
    tensors = random_layer_tensors(c_in, c_out, c_b, tied, torch.float64)
    names = [k for k, v in tensors.items() if v is not None]
    x = torch.randn(2, 3, c_in, dtype=torch.float64)

    def fn(x, *leaves):
        return pnnh_linear(x, **dict(zip(names, leaves)), backend=backend)

    inputs = (x, *(tensors[k] for k in names))
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_(True) for t in inputs))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_without_coder_and_activation_equals_nn_linear(bias, backend):
    reference = nn.Linear(7, 5, bias=bias).double()
    layer = FusedPNNHLinear(7, 5, coder_features=0, bias=bias, activation=None, backend=backend)
    layer.double().load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    assert_matches(layer(x), reference(x).detach(), torch.float64, "output")


def test_default_coder_is_tied_half_width_and_untied_when_shapes_differ():
    square = FusedPNNHLinear(8, 8, coder_init="he", coder_trainable=True)
    assert square.code_features == 4
    assert square.coder.tied
    assert square.coder.decoder_weight is None
    wide = FusedPNNHLinear(8, 12, coder_init="he", coder_trainable=True)
    assert not wide.coder.tied
    assert tuple(wide.coder.decoder_weight.shape) == (12, 4)


def test_shared_coder_between_linear_layers_averages_gradient():
    coder = PNNHCoder(6, 3, init="he", trainable=True)
    first, second = FusedPNNHLinear(6, 6, coder=coder), FusedPNNHLinear(6, 6, coder=coder)
    x = torch.randn(4, 6)
    second(first(x)).sum().backward()
    averaged = coder.encoder_weight.grad.clone()
    coder.zero_grad()
    coder.average_shared_gradient = False
    second(first(x)).sum().backward()
    torch.testing.assert_close(coder.encoder_weight.grad, 2 * averaged)
