"""FusedPNNHConv and pnnh_conv2d against the independent float64 reference, nn.Conv2d and gradcheck."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pnnh_kernels import FusedPNNHConv, PNNHCoder
from pnnh_kernels.functional import pnnh_conv2d
from tests.conv_cases import ASYMMETRIC_PADDING_CASES, check_asymmetric_padding
from tests.reference import assert_matches, backends_for, pnnh_conv2d_reference, random_layer_tensors

# (C_in, C_out, C_B, kernel, stride, dilation, H, W): odd sizes on purpose
CODER_SHAPES = [
    pytest.param(5, 5, 2, 3, 1, 1, 7, 9, id="tied-k3"),
    pytest.param(6, 6, 3, 3, 2, 1, 9, 6, id="tied-k3-stride2"),
    pytest.param(4, 7, 3, 1, 1, 1, 5, 5, id="untied-k1"),
    pytest.param(3, 8, 2, 5, 2, 1, 11, 7, id="untied-k5-stride2"),
    pytest.param(6, 6, 4, 3, 1, 2, 9, 8, id="tied-dilation2"),
    pytest.param(5, 4, 0, 3, 1, 1, 6, 7, id="no-coder"),
]


@pytest.mark.parametrize(
    ("c_in", "c_out", "c_b", "kernel", "stride", "dilation", "h", "w"), CODER_SHAPES
)
@pytest.mark.parametrize("activation", ["relu", None])
@pytest.mark.parametrize("backend", backends_for(torch.float32))
def test_forward_and_gradients_match_float64_reference(
    c_in, c_out, c_b, kernel, stride, dilation, h, w, activation, backend
):
    dtype = torch.float32
    tensors = random_layer_tensors(c_in, c_out, c_b, c_in == c_out, torch.float64, kernel)
    x64 = torch.randn(3, c_in, h, w, dtype=torch.float64).relu()
    padding = (dilation * (kernel - 1) // 2,) * 2
    leaves64 = {k: v.clone().requires_grad_(True) for k, v in tensors.items() if v is not None}
    x64.requires_grad_(True)
    expected = pnnh_conv2d_reference(
        x64,
        **{k: leaves64.get(k) for k in tensors},
        stride=(stride, stride),
        padding=padding,
        dilation=(dilation, dilation),
        activation=activation,
    )
    grad_out = torch.randn_like(expected)
    expected.backward(grad_out)

    leaves = {k: v.detach().to(dtype).requires_grad_(True) for k, v in leaves64.items()}
    x = x64.detach().to(dtype).requires_grad_(True)
    actual = pnnh_conv2d(
        x,
        **{k: leaves.get(k) for k in tensors},
        stride=stride,
        padding=None,
        dilation=dilation,
        activation=activation,
        backend=backend,
    )
    actual.backward(grad_out.to(dtype))
    assert_matches(actual, expected.detach(), dtype, "output")
    assert_matches(x.grad, x64.grad, dtype, "grad input")
    for name, leaf in leaves.items():
        assert_matches(leaf.grad, leaves64[name].grad, dtype, f"grad {name}")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", backends_for(torch.float64))
def test_batch_norm_layer_matches_reference_and_nn_batchnorm(training, backend):
    layer = FusedPNNHConv(6, 6, coder_channels=3, norm="batch", backend=backend).double()
    with torch.no_grad():
        layer.norm.running_mean.normal_()
        layer.norm.running_var.uniform_(0.5, 2.0)
        layer.norm.weight.normal_()
        layer.norm.bias.normal_()
    twin_norm = copy.deepcopy(layer.norm)
    layer.train(training)
    twin_norm.train(training)
    x = torch.randn(4, 6, 5, 7, dtype=torch.float64).relu()
    norm_args = {
        "running_mean": layer.norm.running_mean.clone(),
        "running_var": layer.norm.running_var.clone(),
        "weight": layer.norm.weight.detach(),
        "bias": layer.norm.bias.detach(),
        "training": training,
        "eps": layer.norm.eps,
    }
    expected = pnnh_conv2d_reference(
        x,
        layer.weight.detach(),
        layer.bias.detach(),
        layer.coder.encoder_weight.detach(),
        layer.coder.encoder_bias.detach(),
        None,
        (1, 1),
        (1, 1),
        (1, 1),
        "relu",
        norm=norm_args,
    )
    actual = layer(x)
    assert_matches(actual, expected, torch.float64, "output")
    twin_norm(nn.functional.conv2d(x, layer.weight, layer.bias, padding=1))
    torch.testing.assert_close(layer.norm.running_mean, twin_norm.running_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(layer.norm.running_var, twin_norm.running_var, rtol=1e-12, atol=0)
    assert int(layer.norm.num_batches_tracked) == int(twin_norm.num_batches_tracked)


def test_batch_norm_with_cumulative_momentum_matches_nn_batchnorm():
    layer = FusedPNNHConv(4, 4, coder_channels=0, norm="batch").double()
    layer.norm.momentum = None
    twin = copy.deepcopy(layer.norm)
    for _ in range(3):
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64) * 3 + 1
        layer(x)
        twin(nn.functional.conv2d(x, layer.weight, layer.bias, padding=1))
    torch.testing.assert_close(layer.norm.running_mean, twin.running_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(layer.norm.running_var, twin.running_var, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("c_in", "c_out", "c_b", "kernel", "stride", "dilation", "tied"),
    [
        (3, 3, 2, 3, 1, 1, True),
        (3, 3, 2, 3, 2, 1, True),
        (3, 4, 2, 3, 2, 1, False),
        (2, 3, 2, 1, 1, 1, False),
        (2, 2, 1, 5, 1, 1, True),
        (3, 3, 1, 3, 1, 2, True),
        (3, 2, 0, 3, 2, 1, False),
    ],
)
@pytest.mark.parametrize("backend", backends_for(torch.float64))
def test_gradcheck_float64(c_in, c_out, c_b, kernel, stride, dilation, tied, backend):
    tensors = random_layer_tensors(c_in, c_out, c_b, tied, torch.float64, kernel)
    names = [k for k, v in tensors.items() if v is not None]
    x = torch.randn(2, c_in, 5, 6, dtype=torch.float64).relu() + 0.1

    def fn(x, *leaves):
        return pnnh_conv2d(
            x, **dict(zip(names, leaves)), stride=stride, dilation=dilation, backend=backend
        )

    inputs = (x, *(tensors[k] for k in names))
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_(True) for t in inputs))


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        {"kernel_size": 3},
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": (3, 5), "padding": (1, 2), "stride": (2, 1)},
        {"kernel_size": 2, "stride": 2},
        {"kernel_size": 4, "padding": 3, "dilation": 2},
        {"kernel_size": 3, "padding": "same", "dilation": (1, 3)},
        {"kernel_size": 5, "padding": "valid", "stride": 3},
        {"kernel_size": 1, "bias": False},
        {"kernel_size": (1, 3), "padding": (0, 1), "dilation": (2, 1), "stride": (1, 2)},
    ],
    ids=str,
)
@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.parametrize("backend", backends_for(torch.float64))
def test_without_coder_and_activation_equals_nn_conv2d(conv_kwargs, unbatched, backend):
    kwargs = dict(conv_kwargs)
    padding = kwargs.pop("padding", 0)
    reference = nn.Conv2d(5, 7, padding=padding, **kwargs).double()
    layer = FusedPNNHConv(
        5, 7, padding=padding, coder_channels=0, activation=None, backend=backend, **kwargs
    ).double()
    layer.load_state_dict(reference.state_dict())
    shape = (5, 11, 13) if unbatched else (2, 5, 11, 13)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, expected = layer(x), reference(x_ref)
    assert_matches(out, expected.detach(), torch.float64, "output")
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert_matches(x.grad, x_ref.grad, torch.float64, "grad input")
    assert_matches(layer.weight.grad, reference.weight.grad, torch.float64, "grad weight")


@pytest.mark.parametrize("case", ASYMMETRIC_PADDING_CASES, ids=str)
@pytest.mark.parametrize("backend", backends_for(torch.float32))
def test_asymmetric_same_padding_without_coder_matches_float64_reference(case, backend):
    check_asymmetric_padding(case, torch.float64 if backend == "torch" else torch.float32, backend)


@pytest.mark.parametrize("backend", backends_for(torch.float32))
@pytest.mark.parametrize("stride", [1, 2])
def test_channels_last_in_channels_last_out(backend, stride):
    layer = FusedPNNHConv(8, 8, stride=stride, backend=backend, coder_init="he", coder_trainable=True)
    x = torch.randn(2, 8, 9, 7)
    out_contiguous = layer(x)
    out_channels_last = layer(x.to(memory_format=torch.channels_last))
    assert out_channels_last.is_contiguous(memory_format=torch.channels_last)
    assert out_contiguous.is_contiguous()
    torch.testing.assert_close(out_channels_last, out_contiguous, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backends_for(torch.float32))
def test_unbatched_input_equals_batch_of_one(backend):
    layer = FusedPNNHConv(4, 6, stride=2, backend=backend, coder_init="he", coder_trainable=True)
    x = torch.randn(4, 9, 8)
    torch.testing.assert_close(layer(x), layer(x.unsqueeze(0)).squeeze(0))


@pytest.mark.parametrize("average", [True, False])
def test_shared_coder_gradient_accumulates_from_every_layer(average):
    coder = PNNHCoder(6, 3, init="he", average_shared_gradient=average, trainable=True)
    shared = nn.Sequential(*(FusedPNNHConv(6, 6, coder=coder) for _ in range(3)))
    assert coder.num_uses == 3
    # The same network with a private copy of the coder in every layer: each copy's gradient is
    # that one layer's contribution.
    private = copy.deepcopy(shared)
    for layer in private:
        layer.coder = copy.deepcopy(layer.coder)
        layer.coder.num_uses = 1
    assert len({id(layer.coder) for layer in private}) == 3

    x = torch.randn(2, 6, 5, 5).relu()
    grad_out = torch.randn(2, 6, 5, 5)
    shared(x).backward(grad_out)
    private(x).backward(grad_out)

    for name in ("encoder_weight", "encoder_bias"):
        contributions = [getattr(layer.coder, name).grad for layer in private]
        assert all(float(c.abs().max()) > 0 for c in contributions)
        expected = sum(contributions) / (3 if average else 1)
        torch.testing.assert_close(getattr(coder, name).grad, expected, rtol=1e-5, atol=1e-7)
    # The learner weights are not shared and get their own, unscaled gradients.
    for a, b in zip(shared, private):
        torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-5, atol=1e-7)


def test_state_dict_round_trip_keeps_values_and_sharing():
    coder = PNNHCoder(4, 2, init="he")
    model = nn.Sequential(
        FusedPNNHConv(4, 4, coder=coder, norm="batch"),
        FusedPNNHConv(4, 4, coder=coder, norm="batch"),
        FusedPNNHConv(4, 6, stride=2, norm="batch", coder_init="he", coder_trainable=True),
    )
    model(torch.randn(3, 4, 6, 6))  # move the running statistics away from their init
    model.eval()
    fresh_coder = PNNHCoder(4, 2, init="he")
    fresh = nn.Sequential(
        FusedPNNHConv(4, 4, coder=fresh_coder, norm="batch"),
        FusedPNNHConv(4, 4, coder=fresh_coder, norm="batch"),
        FusedPNNHConv(4, 6, stride=2, norm="batch", coder_init="he", coder_trainable=True),
    ).eval()
    fresh.load_state_dict(model.state_dict())
    assert fresh[0].coder is fresh[1].coder
    x = torch.randn(2, 4, 7, 5)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_checks_run_again_when_a_warm_layer_changes():
    """The module skips pnnh_conv2d's checks while nothing they read changed; a parameter given
    another dtype, a coder on another device's dtype or a wrong input after warm calls still gets
    the checks' error (and a mutated coder never reaches a backend unchecked)."""
    layer = FusedPNNHConv(4, 4, norm="batch")
    x = torch.randn(2, 4, 5, 5)
    layer(x)
    layer(x)  # warm: the signature matches
    with pytest.raises(ValueError, match="input: expected 4 channels"):
        layer(torch.randn(2, 3, 5, 5))
    layer.coder.encoder_weight.data = layer.coder.encoder_weight.data.double()
    with pytest.raises(TypeError, match="encoder_weight: expected the input's dtype"):
        layer(x)
    layer.coder.encoder_weight.data = layer.coder.encoder_weight.data.float()
    layer.norm.running_var.data = torch.ones(3)
    with pytest.raises(ValueError, match=r"norm.running_var: expected shape \(4,\)"):
        layer(x)
    layer.norm.running_var.data = torch.ones(4)
    torch.testing.assert_close(layer(x), layer.double()(x.double()).float(), rtol=1e-4, atol=1e-5)
