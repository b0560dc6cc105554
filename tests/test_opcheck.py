"""``torch.library.opcheck`` on every registered ``pnnh*::`` op: the Triton ops (``pnnh::``, under the
interpreter without a GPU) and the CUDA ops (``pnnh_cuda::``, on the CPU emulation of the kernels
without a GPU, on the built extension with one).

The torch.compile tests trace with ``aot_eager``, which never compares a fake's strides with the
real output's: a fake returning NCHW strides for an op whose output is channels_last passes them.
``test_faketensor`` runs the op on real and on fake tensors and compares shapes, strides, dtypes,
devices and aliasing; ``test_schema`` checks that no output aliases an input and that no input is
mutated; ``test_autograd_registration`` that the autograd formula sits at the Autograd key.

Matrix, for every op: channels_last and contiguous inputs, with and without a coder, fp32 and bf16,
and BatchNorm in each mode an op takes (``conv2d_fused``: eval, folded into scale and shift, and
none; ``conv2d_fused_train``, ``conv2d_fused_train_backward`` and ``batch_norm_running_update``:
training; ``conv2d_fused_backward``: eval, through ``scale``, and none). Three cheap checks run on
the whole matrix: each runs the op once (``test_autograd_registration`` only reads the dispatcher).
``test_aot_dispatch_dynamic`` (eager against AOTAutograd with dynamic shapes, forward and backward,
so it also traces the backward op's fake) runs the op about six times and costs five to ten times as
much, so it runs on ``AOT_CASES`` only: each differentiable op once per library, each axis's two
values once each.

The cases come from :data:`OPS`, and :func:`test_every_registered_op_is_checked` compares that
table with the dispatcher's registry: a new op without a case fails there instead of going
unchecked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterator
from typing import NamedTuple, Optional

import pytest
import torch
from torch import Tensor

import pnnh_kernels  # noqa: F401  (registers every backend's ops)
from pnnh_kernels.cuda import launch

LIBRARIES = ("pnnh", "pnnh_cuda")
CHEAP_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")
AOT_UTILS = ("test_aot_dispatch_dynamic",)


class Layer(NamedTuple):
    """A layer's sizes, kept small: the interpreter and the emulation are slow."""

    n: int
    c_in: int
    c_out: int
    c_b: int
    height: int
    width: int
    kernel: int
    stride: int = 1
    tied: bool = False
    encoder_bias: bool = True
    relu: bool = True

    @property
    def padding(self) -> int:
        return (self.kernel - 1) // 2


# C_in != C_out and H != W, so that a fake mixing them up fails; N > 1 and H * W > 1, so that the
# channels_last and the contiguous strides differ in every dimension.
LAYER = Layer(2, 6, 8, 4, 4, 5, 3)
# A strided layer with a tied coder without encoder bias and no ReLU, and a linear layer's call
# (a 1 x 1 image per row, as FusedOps.linear makes it).
STRIDED = Layer(2, 8, 8, 4, 5, 5, 3, stride=2, tied=True, encoder_bias=False, relu=False)
ROWS = Layer(5, 6, 8, 4, 1, 1, 1)


@dataclasses.dataclass(frozen=True)
class Case:
    layer: Layer
    channels_last: bool
    coder: bool
    norm: str  # "none", "eval" or "train"
    dtype: torch.dtype

    def __str__(self) -> str:
        parts = [
            {LAYER: "3x3", STRIDED: "strided", ROWS: "rows"}[self.layer],
            "channels_last" if self.channels_last else "contiguous",
            "coder" if self.coder else "plain",
            f"{self.norm}_norm",
            str(self.dtype).removeprefix("torch."),
        ]
        return "-".join(parts)


MATRIX = [
    Case(LAYER, channels_last, coder, norm, dtype)
    for channels_last, coder, norm, dtype in itertools.product(
        (True, False), (True, False), ("eval", "train"), (torch.float32, torch.bfloat16)
    )
] + [
    Case(STRIDED, False, True, "eval", torch.float32),
    Case(STRIDED, True, True, "train", torch.bfloat16),
    Case(ROWS, False, True, "none", torch.float32),  # FusedOps.linear: no norm, shift = bias
]


def _as_layout(tensor: Tensor, case: Case) -> Tensor:
    memory_format = torch.channels_last if case.channels_last else torch.contiguous_format
    return tensor.contiguous(memory_format=memory_format)


def _layer_tensors(case: Case, device: str) -> dict[str, Optional[Tensor]]:
    """Inputs as the fused backends pass them: x, W and the coder in the compute dtype, the
    per-channel vectors in fp32 (FusedOps.conv2d folds them in fp32)."""
    layer, dtype = case.layer, case.dtype

    def randn(*shape: int, scale: float = 1.0, dtype: torch.dtype = dtype) -> Tensor:
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    fan_in = layer.c_in * layer.kernel**2
    x = _as_layout(randn(layer.n, layer.c_in, layer.height, layer.width), case)
    tensors: dict[str, Optional[Tensor]] = {
        "x": x,
        "weight": randn(layer.c_out, layer.c_in, layer.kernel, layer.kernel, scale=fan_in**-0.5),
        "encoder_weight": None,
        "encoder_bias": None,
        "decoder_weight": None,
    }
    if case.coder:
        tensors["encoder_weight"] = randn(layer.c_b, layer.c_in, scale=layer.c_in**-0.5)
        if layer.encoder_bias:
            tensors["encoder_bias"] = randn(layer.c_b, scale=0.1)
        if not layer.tied:
            tensors["decoder_weight"] = randn(layer.c_out, layer.c_b, scale=layer.c_b**-0.5)
    tensors["shift"] = randn(layer.c_out, scale=0.1, dtype=torch.float32)
    tensors["scale"] = (torch.rand(layer.c_out, device=device) + 0.5) if case.norm == "eval" else None
    tensors["norm_weight"] = torch.rand(layer.c_out, device=device) + 0.5
    tensors["norm_bias"] = randn(layer.c_out, scale=0.1, dtype=torch.float32)
    return tensors


def _geometry(layer: Layer) -> tuple[list[int], list[int], list[int]]:
    return [layer.stride] * 2, [layer.padding] * 4, [1, 1]  # padding: top, left, bottom, right


def _coder(t: dict[str, Optional[Tensor]]) -> tuple[Optional[Tensor], ...]:
    return t["encoder_weight"], t["encoder_bias"], t["decoder_weight"]


def _requiring_grad(args: tuple) -> tuple:
    """The forward ops' tensors require grad, as in training, so that opcheck checks the autograd
    registration and (AOT check) the gradients."""
    return tuple(a.requires_grad_() if isinstance(a, Tensor) else a for a in args)


def _fused_arguments(case: Case, device: str, library: str) -> tuple:
    t = _layer_tensors(case, device)
    layer = case.layer
    return _requiring_grad(
        (t["x"], t["weight"], t["scale"], t["shift"], *_coder(t), *_geometry(layer), layer.relu)
    )


def _train_arguments(case: Case, device: str, library: str) -> tuple:
    t = _layer_tensors(case, device)
    layer = case.layer
    return _requiring_grad(
        (
            t["x"],
            t["weight"],
            t["shift"],  # the learner's bias
            t["norm_weight"],
            t["norm_bias"],
            *_coder(t),
            *_geometry(layer),
            layer.relu,
            1e-5,
        )
    )


def _backward_arguments(case: Case, device: str, library: str) -> tuple:
    """What the eval autograd formula passes: eval BatchNorm through ``scale``, no norm without it;
    the coder's weight gradients asked for with a coder (``coder_grads``). Nothing requires grad:
    the backward runs without grad mode (no double backward), so test_autograd_registration has
    nothing to check here."""
    t = _layer_tensors(case, device)
    layer = case.layer
    geometry = _geometry(layer)
    fused = getattr(torch.ops, library).conv2d_fused.default
    output = fused(t["x"], t["weight"], t["scale"], t["shift"], *_coder(t), *geometry, layer.relu)
    grad_output = _as_layout(torch.randn(output.shape, device=device).to(case.dtype), case)
    return (
        grad_output,
        t["x"],
        output,
        t["weight"],
        t["scale"],
        *_coder(t),
        *geometry,
        layer.relu,
        case.coder,
    )


def _train_forward(case: Case, device: str, library: str) -> tuple:
    with torch.no_grad():
        train = getattr(torch.ops, library).conv2d_fused_train.default
        return train(*_train_arguments(case, device, library))


def _train_backward_arguments(case: Case, device: str, library: str) -> tuple:
    """What the training autograd formula passes: the saved output, z, batch mean and rstd."""
    t = _layer_tensors(case, device)
    layer = case.layer
    output, learner, mean, _, rstd = _train_forward(case, device, library)
    grad_output = _as_layout(torch.randn(output.shape, device=device).to(case.dtype), case)
    return (
        grad_output,
        t["x"],
        output,
        learner,
        mean,
        rstd,
        t["weight"],
        t["norm_weight"],
        t["norm_bias"],
        *_coder(t),
        *_geometry(layer),
        layer.relu,
        case.coder,
    )


def _running_update_arguments(case: Case, device: str, library: str) -> tuple:
    """The running statistics (in the activations' dtype, as a bf16 model holds them) and a batch's
    mean and biased variance."""
    channels = case.layer.c_out
    _, _, mean, variance, _ = _train_forward(case, device, library)
    running_mean = torch.randn(channels, device=device).to(case.dtype)
    running_var = torch.rand(channels, device=device).to(case.dtype) + 0.5
    layer = case.layer
    return running_mean, running_var, mean, variance, 0.1, layer.n * layer.height * layer.width


class OpCases(NamedTuple):
    arguments: Callable[[Case, str, str], tuple]
    norms: tuple[str, ...]  # the BatchNorm modes the op takes
    differentiable: bool  # has an autograd formula: the AOT check compares its gradients


OPS = {
    "conv2d_fused": OpCases(_fused_arguments, ("none", "eval"), True),
    "conv2d_fused_train": OpCases(_train_arguments, ("train",), True),
    "conv2d_fused_backward": OpCases(_backward_arguments, ("none", "eval"), False),
    "conv2d_fused_train_backward": OpCases(_train_backward_arguments, ("train",), False),
    "batch_norm_running_update": OpCases(_running_update_arguments, ("train",), False),
}

CHEAP_CASES = [
    (library, name, case)
    for library in LIBRARIES
    for name, op in OPS.items()
    for case in MATRIX
    if case.norm in op.norms
]

# Each differentiable op once per library, the libraries taking opposite values on every axis. The
# autograd formulas and fakes checked here are the same code for both libraries
# (pnnh_kernels/ops/pnnh_conv.py); what differs, the kernels, the cheap checks already run over the
# whole matrix.
_FP32_CODER = Case(LAYER, True, True, "eval", torch.float32)
_BF16_PLAIN = Case(LAYER, False, False, "eval", torch.bfloat16)
AOT_CASES = [
    ("pnnh", "conv2d_fused", _FP32_CODER),
    ("pnnh", "conv2d_fused_train", dataclasses.replace(_BF16_PLAIN, norm="train")),
    ("pnnh_cuda", "conv2d_fused", _BF16_PLAIN),
    ("pnnh_cuda", "conv2d_fused_train", dataclasses.replace(_FP32_CODER, norm="train")),
]


def _case_id(value: object) -> str:
    return str(value) if isinstance(value, Case) else value


@contextlib.contextmanager
def _running(library: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """The device the library's kernels run on here: the Triton interpreter and the CUDA emulation
    run on CPU tensors; with a GPU, the real kernels run (the CUDA ones only where built)."""
    if torch.cuda.is_available():
        if library == "pnnh_cuda":
            from pnnh_kernels import cuda

            reason = cuda.why_unavailable()
            if reason is not None:
                pytest.skip(f"the CUDA backend cannot run here: {reason}")
        yield "cuda"
    elif library == "pnnh_cuda":
        with launch.emulated(request.getfixturevalue("cuda_emulator")):
            yield "cpu"
    else:
        yield "cpu"


def _opcheck(library: str, name: str, case: Case, utils: tuple[str, ...], request) -> None:
    op = getattr(getattr(torch.ops, library), name).default
    with _running(library, request) as device:
        args = OPS[name].arguments(case, device, library)
        torch.library.opcheck(op, args, test_utils=utils)


@pytest.mark.parametrize(("library", "name", "case"), CHEAP_CASES, ids=_case_id)
def test_opcheck(library: str, name: str, case: Case, request) -> None:
    _opcheck(library, name, case, CHEAP_UTILS, request)


@pytest.mark.parametrize(("library", "name", "case"), AOT_CASES, ids=_case_id)
def test_opcheck_aot_dispatch(library: str, name: str, case: Case, request) -> None:
    _opcheck(library, name, case, AOT_UTILS, request)


def _registered_ops() -> set[str]:
    # torch.ops.<namespace> resolves names lazily and cannot list them; the dispatcher can.
    names = torch._C._dispatch_get_all_op_names()
    return {name for name in names if name.split("::")[0].startswith("pnnh")}


def test_every_registered_op_is_checked() -> None:
    registered = _registered_ops()
    assert {f"{library}::{name}" for library in LIBRARIES for name in OPS} <= registered
    unchecked = registered - {f"{library}::{name}" for library, name, _ in CHEAP_CASES}
    assert not unchecked, f"ops without an opcheck case: add them to OPS: {sorted(unchecked)}"
    for library, name in itertools.product(LIBRARIES, OPS):
        matrix = [case for lib, op, case in CHEAP_CASES if (lib, op) == (library, name)]
        for axis in ("channels_last", "coder", "dtype"):
            assert len({getattr(case, axis) for case in matrix}) == 2, (library, name, axis)
        assert {case.norm for case in matrix} == set(OPS[name].norms), (library, name)
    for name, op in OPS.items():
        aot = [case for _, checked, case in AOT_CASES if checked == name]
        assert {library for library, checked, _ in AOT_CASES if checked == name} == (
            set(LIBRARIES) if op.differentiable else set()
        ), name
        for axis in ("channels_last", "coder", "dtype"):
            assert len({getattr(case, axis) for case in aot}) == (2 if op.differentiable else 0)


@pytest.mark.parametrize("library", LIBRARIES)
def test_training_statistics_are_not_differentiable(library: str, request) -> None:
    """conv2d_fused_train's z, mean and variance feed only the running statistics; their gradients
    are not computed, so they must not pretend to carry any."""
    case = Case(LAYER, True, True, "train", torch.float32)
    op = getattr(torch.ops, library).conv2d_fused_train.default
    with _running(library, request) as device:
        output, learner, mean, variance, rstd = op(*_train_arguments(case, device, library))
    assert output.requires_grad
    assert not any(t.requires_grad for t in (learner, mean, variance, rstd))
