"""Every documented error path raises the documented exception, naming the argument."""

from __future__ import annotations

import pytest
import torch

from pnnh_kernels import BackendUnavailableError, FusedPNNHConv, FusedPNNHLinear, PNNHCoder
from pnnh_kernels.functional import pnnh_conv2d, pnnh_linear


def conv(**overrides):
    kwargs = {"in_channels": 4, "out_channels": 4, "coder_init": "he"}
    kwargs.update(overrides)
    return FusedPNNHConv(**kwargs)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"in_channels": 0}, ValueError, "in_channels"),
        ({"out_channels": 2.5}, ValueError, "out_channels"),
        ({"groups": 2, "coder_channels": 0}, NotImplementedError, "groups: grouped .* not supported"),
        ({"padding_mode": "reflect"}, NotImplementedError, "padding_mode"),
        ({"norm": "layer"}, ValueError, "norm"),
        ({"activation": "gelu"}, ValueError, "activation"),
        ({"backend": "fastest"}, ValueError, "backend"),
        ({"padding": 0}, ValueError, "padding: a layer with a coder needs 'same'-like"),
        ({"kernel_size": 3, "dilation": 2, "padding": 1}, ValueError, "padding"),
        ({"kernel_size": 2}, NotImplementedError, "padding: None with a coder .* asymmetric"),
        (
            {"kernel_size": (2, 3), "padding": "same", "dilation": 3},
            NotImplementedError,
            "padding: 'same' with a coder .* coder_channels=0",
        ),
        ({"padding": "same", "stride": 2}, ValueError, "padding"),
        ({"padding": "full"}, ValueError, "padding"),
        ({"kernel_size": 0}, ValueError, "kernel_size"),
        ({"stride": (1, 2, 3)}, TypeError, "stride"),
        ({"coder_channels": -1}, ValueError, "coder_channels"),
        ({"coder": PNNHCoder(8, 2, init="he")}, ValueError, "coder: maps 8 -> 8"),
        ({"coder": PNNHCoder(4, 2, init="he"), "coder_channels": 3}, ValueError, "coder_channels"),
        ({"coder": torch.nn.Linear(4, 4)}, TypeError, "coder"),
        ({"coder_init": "orthogonal"}, ValueError, "init"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_constructor_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        conv(**overrides)


def test_padding_without_coder_is_free():
    layer = conv(padding=0, coder_channels=0)
    assert layer(torch.randn(1, 4, 5, 5)).shape == (1, 4, 3, 3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"in_channels": 4, "code_channels": 0}, ValueError, "code_channels"),
        ({"in_channels": 4, "code_channels": 2, "out_channels": 6}, ValueError, "tied"),
        (
            {"in_channels": 4, "code_channels": 2, "out_channels": 0, "tied": False},
            ValueError,
            "out_channels",
        ),
        ({"in_channels": 4, "code_channels": 2, "init": "zeros"}, ValueError, "init"),
    ],
)
def test_coder_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        PNNHCoder(**kwargs)


def test_coder_forward_checks_width():
    with pytest.raises(ValueError, match="features: expected 4 channels"):
        PNNHCoder(4, 2, init="he")(torch.randn(3, 5))


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.randn(4, 5), ValueError, "input: expected a 3-D"),
        (torch.randn(1, 1, 4, 5, 5), ValueError, "input: expected a 3-D"),
        (torch.randn(2, 3, 5, 5), ValueError, "input: expected 4 channels"),
        (torch.randn(3, 5, 5), ValueError, "input: expected 4 channels"),
        (torch.ones(1, 4, 5, 5, dtype=torch.int64), TypeError, "input: expected a floating-point"),
        (
            torch.randn(1, 4, 5, 5, dtype=torch.float64),
            TypeError,
            "weight: expected the input's dtype",
        ),
        ("not a tensor", ValueError, "input"),
    ],
    ids=["2d", "5d", "channels", "channels-unbatched", "int", "dtype-mismatch", "not-tensor"],
)
def test_conv_forward_input_errors(x, error, match):
    with pytest.raises(error, match=match):
        conv()(x)


def test_conv_input_too_small_for_kernel():
    layer = conv(kernel_size=5, padding=0, coder_channels=0)
    with pytest.raises(ValueError, match="input: spatial size"):
        layer(torch.randn(1, 4, 3, 8))


def test_tensors_on_different_devices():
    x = torch.randn(1, 4, 5, 5)
    weight = torch.randn(4, 4, 3, 3, device="meta")
    with pytest.raises(ValueError, match="weight: expected a tensor on the input's device"):
        pnnh_conv2d(x, weight)


def test_unregistered_backend_raises_and_says_why():
    from pnnh_kernels.backends import register_backend, unregister_backend

    real = unregister_backend("cuda")  # as in an installation without the CUDA backend
    try:
        layer = conv(backend="cuda")
        with pytest.raises(
            BackendUnavailableError, match=r"backend='cuda'.*no cuda kernels are registered"
        ):
            layer(torch.randn(1, 4, 5, 5))
        with pytest.raises(BackendUnavailableError):
            _ = layer.backend_in_use
    finally:
        register_backend(real)


@pytest.mark.parametrize(
    ("device", "dtype", "op", "interpret", "reason"),
    [
        ("cpu", torch.float32, "conv2d", False, "TRITON_INTERPRET=1"),
        ("cpu", torch.float64, "conv2d", True, "supported dtypes"),
        ("cpu", torch.float32, "attention", True, "no Triton kernel for attention"),
        ("meta", torch.float64, "conv2d", True, "supported dtypes"),
    ],
)
def test_triton_backend_says_why_it_cannot_run(device, dtype, op, interpret, reason, monkeypatch):
    pytest.importorskip("triton")
    from pnnh_kernels.triton import availability, unavailable_reason

    monkeypatch.setattr(availability, "_INTERPRETER", interpret)
    assert reason in unavailable_reason(torch.device(device), dtype, op)


def test_meta_tensors_need_no_kernel():
    # Shape inference on meta (tests/test_module_protocols.py): every backend accepts it.
    from pnnh_kernels.cuda import unavailable_reason as cuda_reason

    assert cuda_reason(torch.device("meta"), torch.float32, "conv2d") is None
    if pytest.importorskip("triton"):
        from pnnh_kernels.triton import unavailable_reason

        assert unavailable_reason(torch.device("meta"), torch.bfloat16, "linear") is None


def test_explicit_triton_backend_with_unsupported_dtype_raises():
    pytest.importorskip("triton")
    layer = conv(backend="triton").double()
    with pytest.raises(BackendUnavailableError, match=r"backend='triton'.*supported dtypes"):
        layer(torch.randn(1, 4, 5, 5, dtype=torch.float64))


def test_auto_backend_says_which_runs():
    assert conv().backend_in_use == "torch"
    assert FusedPNNHLinear(3, 3, coder_init="he", coder_trainable=True).backend_in_use == "torch"
    assert conv().backend_reason.startswith("auto: torch, on a CPU")
    assert conv(backend="torch").backend_reason == "backend='torch' was named explicitly"


def test_auto_follows_the_measurement_table(monkeypatch):
    """What "auto" runs: the backend of the device family's row, and says why; where that backend cannot
    run the call, the torch backend, saying so."""
    from pnnh_kernels import backends
    from pnnh_kernels.backends import auto

    pytest.importorskip("triton")
    monkeypatch.setattr(backends, "_resolved", {})
    rule = auto.AutoRule("triton", "measured in a test")
    monkeypatch.setitem(auto.MEASURED_FASTEST, ("cpu", None), rule)
    layer = conv()
    assert layer.backend_in_use == "triton"  # the CPU interpreter runs it under the tests
    assert layer.backend_reason == "auto: triton, measured in a test"
    assert conv().double().backend_in_use == "torch"  # Triton takes no float64
    assert "auto: torch, because triton (measured fastest here" in conv().double().backend_reason


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"encoder_weight": None}, ValueError, "encoder_weight: required"),
        ({"encoder_weight": torch.randn(2, 5)}, ValueError, "encoder_weight: expected shape"),
        ({"encoder_bias": torch.randn(3)}, ValueError, "encoder_bias: expected shape"),
        ({"decoder_weight": torch.randn(4, 3)}, ValueError, "decoder_weight: expected shape"),
        ({"bias": torch.randn(5)}, ValueError, "bias: expected shape"),
        ({"weight": torch.randn(4, 4)}, ValueError, "weight: expected a 4-D"),
        ({"encoder_weight": torch.ones(2, 4, dtype=torch.int32)}, TypeError, "encoder_weight"),
    ],
)
def test_functional_conv_argument_errors(overrides, error, match):
    kwargs = {
        "input": torch.randn(1, 4, 5, 5),
        "weight": torch.randn(4, 4, 3, 3),
        "bias": torch.randn(4),
        "encoder_weight": torch.randn(2, 4),
        "encoder_bias": torch.randn(2),
        "decoder_weight": torch.randn(4, 2),
    }
    kwargs.update(overrides)
    with pytest.raises(error, match=match):
        pnnh_conv2d(**kwargs)


def test_functional_tied_coder_needs_square_layer():
    with pytest.raises(ValueError, match="decoder_weight: a tied coder"):
        pnnh_conv2d(torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3), encoder_weight=torch.randn(2, 4))


def test_functional_norm_shape_is_checked():
    from pnnh_kernels.functional import BatchNormParams

    norm = BatchNormParams(torch.zeros(3), torch.ones(4), None, None, False, 0.1, 1e-5)
    with pytest.raises(ValueError, match=r"norm\.running_mean: expected shape"):
        pnnh_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3), norm=norm)


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.randn(3, 5), ValueError, "input: expected 4 features"),
        (torch.tensor(1.0), ValueError, "input: expected a tensor with at least 1 dimension"),
        (torch.ones(3, 4, dtype=torch.int64), TypeError, "input: expected a floating-point"),
    ],
)
def test_linear_forward_errors(x, error, match):
    with pytest.raises(error, match=match):
        FusedPNNHLinear(4, 4, coder_init="he", coder_trainable=True)(x)


def test_linear_constructor_errors():
    with pytest.raises(ValueError, match="coder: maps 4 -> 4 features, but the layer maps 4 -> 6"):
        FusedPNNHLinear(4, 6, coder=PNNHCoder(4, 2, init="he"))
    with pytest.raises(ValueError, match="coder_features"):
        FusedPNNHLinear(4, 4, coder_features=-2)
    with pytest.raises(ValueError, match="weight: expected a 2-D"):
        pnnh_linear(torch.randn(2, 4), torch.randn(4, 4, 1))


@pytest.mark.parametrize("value", [True, 0, -1, 2.0, "4"])
def test_channel_counts_are_held_to_one_rule_everywhere(value):
    for build in (
        lambda: PNNHCoder(value, 2),
        lambda: PNNHCoder(4, value),
        lambda: FusedPNNHConv(value, 4),
        lambda: FusedPNNHLinear(4, value),
    ):
        with pytest.raises(ValueError, match="expected a positive int"):
            build()


def test_a_code_wider_than_the_input_is_warned_about():
    with pytest.warns(UserWarning, match=r"coder_channels=100 is wider than the layer's 8 input"):
        FusedPNNHConv(8, 8, coder_channels=100, backend="torch")
    with pytest.warns(UserWarning, match=r"coder_features=20 is wider"):
        FusedPNNHLinear(8, 8, coder_features=20, backend="torch")
