"""What PyTorch users do to any module, done to the PNNH layers: deepcopy, shape inference on meta
and fake tensors, torch.jit.trace (and a clear refusal from torch.jit.script)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from pnnh_kernels import FusedPNNHConv, FusedPNNHLinear
from tests.conv_cases import DEVICE

BACKENDS = ["torch", "triton", "cuda"]


def _stack(layers: int = 4) -> nn.Sequential:
    first = FusedPNNHConv(8, 8, backend="torch", coder_init="he", coder_trainable=True)
    rest = [FusedPNNHConv(8, 8, coder=first.coder, backend="torch") for _ in range(layers - 1)]
    return nn.Sequential(first, *rest)


def test_deepcopy_of_one_shared_layer_counts_its_own_uses():
    stack = _stack()
    assert stack[0].coder.num_uses == 4
    single = copy.deepcopy(stack[2])
    assert single.coder is not stack[2].coder
    assert single.coder.num_uses == 1
    assert single.coder.gradient_scale == 1.0
    assert stack[0].coder.num_uses == 4  # the original is untouched


def test_deepcopy_of_one_shared_layer_gets_its_full_gradient():
    # The gradient of the copy's coder is that of an unshared layer with the same weights (it was
    # scaled by 1/4, the stack's averaging, before).
    stack = _stack()
    single = copy.deepcopy(stack[1])
    alone = FusedPNNHConv(8, 8, backend="torch", coder_init="he", coder_trainable=True)
    alone.load_state_dict(single.state_dict())
    x = torch.randn(2, 8, 5, 5)
    single(x).square().sum().backward()
    alone(x).square().sum().backward()
    torch.testing.assert_close(single.coder.encoder_weight.grad, alone.coder.encoder_weight.grad)


def test_deepcopy_of_the_stack_keeps_one_shared_coder():
    stack = _stack()
    twin = copy.deepcopy(stack)
    coders = {id(layer.coder) for layer in twin}
    assert len(coders) == 1
    assert twin[0].coder is not stack[0].coder
    assert twin[0].coder.num_uses == 4


def test_deepcopy_of_a_linear_layer():
    from pnnh_kernels.coder import PNNHCoder

    coder = PNNHCoder(6, 3, 6, tied=True)
    layers = nn.Sequential(*[FusedPNNHLinear(6, 6, coder=coder, backend="torch") for _ in range(3)])
    assert coder.num_uses == 3
    assert copy.deepcopy(layers[0]).coder.num_uses == 1
    assert copy.deepcopy(layers)[0].coder.num_uses == 3


def _layers(backend: str) -> list[nn.Module]:
    return [
        FusedPNNHConv(8, 8, backend=backend),
        FusedPNNHConv(8, 16, stride=2, norm="batch", backend=backend),
        FusedPNNHLinear(8, 6, backend=backend),
    ]


EXPECTED_SHAPES = [(2, 8, 7, 7), (2, 16, 4, 4), (3, 5, 6)]  # of _layers' outputs for _input


def _input(layer: nn.Module, device: str) -> torch.Tensor:
    shape = (2, 8, 7, 7) if isinstance(layer, FusedPNNHConv) else (3, 5, 8)
    return torch.randn(shape, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_meta_tensors_infer_shapes(backend, training):
    # As nn.Conv2d: a model on the meta device runs forward and backward without data. Any backend
    # may be named: no kernel runs (each op's fake implementation gives the outputs).
    for layer, expected in zip(_layers(backend), EXPECTED_SHAPES):
        layer = layer.to("meta").train(training)
        x = _input(layer, "meta").requires_grad_(True)
        y = layer(x)
        assert y.device.type == "meta"
        assert tuple(y.shape) == expected, layer
        y.sum().backward()
        assert x.grad is not None
        assert x.grad.shape == x.shape
        assert layer.weight.grad is not None
        assert layer.weight.grad.shape == layer.weight.shape


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fake_tensors_infer_shapes(backend):
    for layer, expected in zip(_layers(backend), EXPECTED_SHAPES):
        layer = layer.to(DEVICE)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            x = mode.from_tensor(_input(layer, DEVICE))
            y = layer(x)
        assert tuple(y.shape) == expected, layer


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_jit_trace_runs_at_other_shapes(backend, training):
    for layer in _layers(backend):
        layer = layer.to(DEVICE).train(training)
        traced = torch.jit.trace(layer, _input(layer, DEVICE), check_trace=False)
        if isinstance(layer, FusedPNNHLinear):
            other = torch.randn(4, 2, 8, device=DEVICE)  # a trace keeps the rank it saw
        else:
            other = torch.randn(1, 8, 11, 9, device=DEVICE)
        torch.manual_seed(0)
        expected = layer(other)
        torch.manual_seed(0)
        torch.testing.assert_close(traced(other), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: FusedPNNHConv(8, 8), lambda: FusedPNNHLinear(8, 6)])
def test_jit_script_refuses_clearly(make):
    with pytest.raises(RuntimeError, match=r"torch.jit.script: FusedPNNH\w+ cannot be scripted"):
        torch.jit.script(nn.Sequential(make()))


@pytest.mark.parametrize(
    ("kwargs", "padding"),
    [
        ({"kernel_size": 3, "stride": 2}, (1, 1)),
        ({"kernel_size": (3, 5), "dilation": (2, 1)}, (2, 2)),
        ({"kernel_size": 4, "coder_channels": 0}, "same"),  # asymmetric: no tuple, as nn.Conv2d
        ({"kernel_size": 3, "padding": "same"}, "same"),
        ({"kernel_size": 3, "padding": 0, "coder_channels": 0}, (0, 0)),
    ],
)
def test_the_layer_has_nn_conv2d_attributes(kwargs, padding):
    """FLOP counters and model surgery read these from anything that looks like a conv."""
    layer = FusedPNNHConv(8, 16, backend="torch", **kwargs)
    conv = nn.Conv2d(8, 16, **{k: v for k, v in kwargs.items() if k != "coder_channels"})
    for name in ("kernel_size", "stride", "dilation", "groups", "padding_mode"):
        assert getattr(layer, name) == getattr(conv, name), name
    assert layer.padding == padding
    # nn.Conv2d given that padding computes the same convolution (the learner, coder off).
    plain = FusedPNNHConv(8, 16, backend="torch", **{**kwargs, "coder_channels": 0}, activation=None)
    geometry = {k: v for k, v in kwargs.items() if k not in ("coder_channels", "padding")}
    same = nn.Conv2d(8, 16, **geometry, padding=plain.padding)
    same.weight, same.bias = plain.weight, plain.bias
    x = torch.randn(1, 8, 9, 9)
    torch.testing.assert_close(plain(x), same(x))


def test_a_layer_pickled_with_the_old_padding_attribute_loads():
    layer = FusedPNNHConv(8, 8, padding="same", backend="torch")
    state = layer.__dict__.copy()
    state["padding"] = state.pop("_padding_given")  # as a module pickled before 2026-12-07
    restored = FusedPNNHConv.__new__(FusedPNNHConv)
    restored.__setstate__(state)
    assert restored.padding == "same"
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(restored(x), layer(x))


def _conv_bn(groups: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups).double()
    norm = nn.BatchNorm2d(8).double()
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    norm.momentum, norm.eps = 0.3, 1e-3
    return conv, norm


@pytest.mark.parametrize("training", [False, True])
def test_from_modules_computes_what_the_modules_compute(training):
    conv, norm = _conv_bn()
    conv.weight.requires_grad_(False)
    modules = nn.Sequential(conv, norm, nn.ReLU()).train(training)
    layer = FusedPNNHConv.from_modules(conv, norm, nn.ReLU(), coder_channels=0, backend="torch")
    assert layer.training == training
    assert not layer.weight.requires_grad  # frozen stays frozen
    assert (layer.norm.momentum, layer.norm.eps) == (0.3, 1e-3)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), modules(x), rtol=0, atol=1e-12)
    # training mode updated both running means alike
    torch.testing.assert_close(layer.norm.running_mean, norm.running_mean, rtol=0, atol=1e-12)
    with_coder = FusedPNNHConv.from_modules(conv, norm, backend="torch")
    assert with_coder.code_channels == 4
    assert with_coder.activation is None
    assert with_coder.coder.encoder_weight.dtype == torch.float64


@pytest.mark.parametrize(
    ("modules", "match"),
    [
        (lambda: (*_conv_bn(groups=2), None), "conv, norm: cannot fuse: grouped convolution"),
        (lambda: (*_conv_bn(), nn.GELU()), "relu: expected an nn.ReLU or None, got GELU"),
        (lambda: (nn.Linear(8, 8), None, None), "Linear is not an nn.Conv2d"),
        (lambda: (nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(8), None), "norm has 8 features"),
    ],
)
def test_from_modules_names_what_it_cannot_fuse(modules, match):
    with pytest.raises(ValueError, match=match):
        FusedPNNHConv.from_modules(*modules(), coder_channels=0)


def test_a_strided_asymmetric_padding_is_reported_with_its_end():
    """nn.Conv2d cannot express it ("same" is refused with a stride): padding is the top/left
    zeros, padding_end the bottom/right ones."""
    layer = FusedPNNHConv(4, 4, 4, stride=2, coder_channels=0, backend="torch")
    assert layer.padding == (1, 1)
    assert layer.padding_end == (2, 2)


def test_from_modules_keeps_a_frozen_batch_norm_in_eval_mode():
    conv, norm = _conv_bn()
    conv.train()
    norm.eval()  # fine-tuning with frozen statistics
    layer = FusedPNNHConv.from_modules(conv, norm, nn.ReLU(), coder_channels=0, backend="torch")
    assert layer.training
    assert not layer.norm.training
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), torch.relu(norm(conv(x))), rtol=0, atol=1e-12)


def test_a_functorch_wrapper_leaked_from_a_transform_takes_the_op_route():
    from pnnh_kernels.ops.pnnh_conv import eager

    leaked = []

    def function(x):
        leaked.append(x * 1)
        return x.sum()

    torch.func.vjp(function, torch.randn(3))
    assert torch._C._functorch.is_functorch_wrapped_tensor(leaked[0])
    assert not eager(leaked[0])  # its storage is gone: the launchers must not get it
    assert eager(torch.randn(3))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_double_backward_is_refused_by_the_fused_backends(backend, request):
    if backend == "triton":
        pytest.importorskip("triton")
    elif DEVICE == "cpu":
        request.getfixturevalue("emulated_cuda_backend")  # the kernels' source on the CPU
    layer = FusedPNNHConv(4, 4, backend=backend, coder_init="he").to(DEVICE)
    x = torch.randn(2, 4, 5, 5, device=DEVICE, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).square().sum(), layer.weight)  # first order: fine
    assert grad.shape == layer.weight.shape
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\) is not supported"):
        torch.autograd.grad(layer(x).square().sum(), layer.weight, create_graph=True)


def test_from_modules_takes_string_padding():
    conv = nn.Conv2d(8, 8, 3, padding="same").double()
    layer = FusedPNNHConv.from_modules(conv, coder_channels=0, backend="torch")
    assert layer.padding == "same"
    x = torch.randn(1, 8, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-12)
