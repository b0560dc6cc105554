"""``FusedPNNHConv(..., coder_channels=0, activation=None)`` against PyTorch's own conv2d test samples.

Without a coder and an activation the layer is documented to be nn.Conv2d. PyTorch's OpInfo for
``nn.functional.conv2d`` (``torch.testing._internal.common_methods_invocations.op_db``, which needs
``expecttest``) holds the samples PyTorch tests its own conv2d with: strides, int, pair, "valid" and
"same" padding (an asymmetric one among them: kernel (2, 3), dilation 3), dilation, no bias, and each
one batched and unbatched. Every sample with groups=1 runs here; the groups != 1 samples are left out
because FusedPNNHConv supports groups=1 only (NotImplementedError, tests/test_errors.py).

Per sample and backend: the layer built from the sample's arguments (nn.Conv2d's padding default 0,
not FusedPNNHConv's None), its weight and bias copied from the sample, then its output and the
gradients of input, weight and bias compared with F.conv2d in float64. The torch backend runs in
float64; the fused backends (Triton, CUDA) in float32 on inputs rounded to float32 first, so that the
tolerance measures only the kernels' own error. Without a GPU, Triton runs in its interpreter and the
CUDA backend on the CPU emulation of its kernels (tests/test_cuda_emulated.py); with a GPU, both run
there, and the CUDA backend's test skips, saying why, where it cannot run.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from pnnh_kernels import FusedPNNHConv
from pnnh_kernels.backends import backend_named
from pnnh_kernels.backends.fused_common import poisoned_outputs
from tests.reference import assert_matches

common_methods_invocations = pytest.importorskip(
    "torch.testing._internal.common_methods_invocations",
    reason="PyTorch's OpInfo samples need expecttest (pip install expecttest; in the dev extra)",
)
# Importing torch's test helpers calls torch.backends.disable_global_flags(): from then on, setting a
# torch.backends.cudnn flag raises in the whole process, i.e. in every test pytest runs once it has
# collected this module. Undo that; the flag is a private global of torch.backends (whose module
# object is a proxy, hence the function's globals), left alone if a torch version renames it.
_BACKENDS_GLOBALS = torch.backends.disable_global_flags.__globals__
if torch.backends.flags_frozen() and "__allow_nonbracketed_mutation_flag" in _BACKENDS_GLOBALS:
    _BACKENDS_GLOBALS["__allow_nonbracketed_mutation_flag"] = True

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND_DTYPES = {"torch": torch.float64, "triton": torch.float32, "cuda": torch.float32}


def _conv2d_opinfo():
    return next(op for op in common_methods_invocations.op_db if op.name == "nn.functional.conv2d")


def _groups_one_samples() -> list:
    """The OpInfo's groups=1 samples in float64 on the CPU (values from the global generator)."""
    samples = _conv2d_opinfo().sample_inputs("cpu", torch.float64, requires_grad=False)
    return [sample for sample in samples if sample.kwargs.get("groups", 1) == 1]


def _sample_id(sample) -> str:
    weight, bias = sample.args
    parts = ["x" + "x".join(map(str, sample.input.shape)), "w" + "x".join(map(str, weight.shape))]
    if bias is None:
        parts.append("nobias")
    parts += [f"{key}={value}" for key, value in sample.kwargs.items() if key != "groups"]
    return "-".join(parts).replace(" ", "")


@functools.cache
def _sample_ids() -> tuple[str, ...]:
    return tuple(_sample_id(sample) for sample in _groups_one_samples())


def _ready(backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip, saying why, where ``backend`` cannot run here; without a GPU the CUDA backend runs on
    the emulation of its kernels."""
    if backend == "cuda" and DEVICE == "cpu":
        request.getfixturevalue("emulated_cuda_backend")
        return
    reason = backend_named(backend).unavailable_reason(
        torch.device(DEVICE), BACKEND_DTYPES[backend], "conv2d"
    )
    if reason is not None:
        pytest.skip(f"backend {backend!r} cannot run here: {reason}")
    # On a GPU the Triton kernels compute float32 dots in TF32 under this flag, as PyTorch's
    # convolutions do (triton/pnnh_conv.input_precision); the tolerance here is float32's.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _has_asymmetric_same_padding(sample) -> bool:
    """nn.Conv2d pads "same" asymmetrically where dilation * (kernel - 1) is odd."""
    if sample.kwargs.get("padding") != "same":
        return False
    dilation = _pair(sample.kwargs.get("dilation", 1))
    kernel = sample.args[0].shape[2:]
    return any(d * (k - 1) % 2 for d, k in zip(dilation, kernel))


def test_the_samples_cover_what_the_layer_must_match():
    """The parametrisation below is only as good as the samples: they must still include an
    asymmetric "same" padding, "valid", strides, dilation, no bias and unbatched inputs."""
    samples = _groups_one_samples()
    kwargs = [sample.kwargs for sample in samples]
    asymmetric_same = [sample for sample in samples if _has_asymmetric_same_padding(sample)]
    assert asymmetric_same, "no groups=1 sample with an asymmetric 'same' padding"
    assert any(k.get("padding") == "valid" for k in kwargs)
    assert any(k.get("stride", 1) != 1 for k in kwargs)
    assert any(k.get("dilation", 1) != 1 for k in kwargs)
    assert any(sample.args[1] is None for sample in samples)
    assert any(sample.input.dim() == 3 for sample in samples)


# PyTorch's own note that its reference F.conv2d copies the input to pad it asymmetrically.
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize("backend", list(BACKEND_DTYPES))
@pytest.mark.parametrize("index", range(len(_sample_ids())), ids=_sample_ids())
def test_matches_conv2d_on_opinfo_sample(index, backend, request, monkeypatch):
    _ready(backend, request, monkeypatch)
    # conftest seeds the generator before each test, so the samples come back with the same values.
    sample = _groups_one_samples()[index]
    weight64, bias64 = sample.args
    kwargs = {key: value for key, value in sample.kwargs.items() if key != "groups"}
    dtype = BACKEND_DTYPES[backend]

    # Rounded to the tested dtype first: the comparison then measures the layer's own error.
    x64 = sample.input.to(dtype).double().requires_grad_(True)
    weight64 = weight64.to(dtype).double().requires_grad_(True)
    bias64 = None if bias64 is None else bias64.to(dtype).double().requires_grad_(True)
    expected = F.conv2d(x64, weight64, bias64, **kwargs)
    grad_out = torch.randn_like(expected).to(dtype).double()
    expected.backward(grad_out)

    with poisoned_outputs():  # an output element a kernel forgets to write reads as NaN
        layer = FusedPNNHConv(
            weight64.shape[1],
            weight64.shape[0],
            kernel_size=tuple(weight64.shape[2:]),
            stride=kwargs.get("stride", 1),
            padding=kwargs.get("padding", 0),
            dilation=kwargs.get("dilation", 1),
            bias=bias64 is not None,
            coder_channels=0,
            activation=None,
            backend=backend,
            device=DEVICE,
            dtype=dtype,
        )
        assert layer.backend_in_use == backend
        with torch.no_grad():
            layer.weight.copy_(weight64)
            if bias64 is not None:
                layer.bias.copy_(bias64)
        x = x64.detach().to(DEVICE, dtype).requires_grad_(True)
        out = layer(x)
        out.backward(grad_out.to(DEVICE, dtype))

    what = f"{_sample_ids()[index]} on {backend}"
    assert_matches(out.cpu(), expected.detach(), dtype, f"{what}: output")
    assert_matches(x.grad.cpu(), x64.grad, dtype, f"{what}: grad input")
    assert_matches(layer.weight.grad.cpu(), weight64.grad, dtype, f"{what}: grad weight")
    if bias64 is not None:
        assert_matches(layer.bias.grad.cpu(), bias64.grad, dtype, f"{what}: grad bias")
