"""The checks of tests/conv_cases.py must fail on a wrong op, and say where.

A correct op (the torch backend, standing in under the name "triton") has its output corrupted the
ways a broken kernel would: outputs above a threshold zeroed (a broken output ReLU), one element's
sign flipped, one element NaN, one element never written (left as the NaN poison). The gradients
pass through unchanged, so the output comparison alone has to catch each. The uncorrupted stand-in
passes the same checks, so a failure below is the corruption's and not the harness's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

from pnnh_kernels.backends import Backend, backend_named, register_backend
from pnnh_kernels.backends.reference import memory_format_of
from tests.conv_cases import Case, check_case, check_linear

Corruption = Callable[[Tensor], Tensor]


def zero_above(threshold: float) -> Corruption:
    return lambda out: torch.where(out > threshold, torch.zeros_like(out), out)


def flip_largest(out: Tensor) -> Tensor:
    flat = out.clone().reshape(-1)
    index = int(flat.abs().argmax())
    flat[index] = -flat[index]
    return flat.reshape(out.shape)


def nan_at(position: int) -> Corruption:
    def corrupt(out: Tensor) -> Tensor:
        flat = out.clone().reshape(-1)
        flat[position % flat.numel()] = float("nan")
        return flat.reshape(out.shape)

    return corrupt


class _Corrupted(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: Tensor, corrupt: Corruption) -> Tensor:
        return corrupt(out.detach()).contiguous(memory_format=memory_format_of(out))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


@contextlib.contextmanager
def triton_standing_in(corrupt: Corruption | None) -> Iterator[None]:
    """Under the name "triton": the torch backend with ``corrupt`` applied to every output."""
    real, torch_backend = backend_named("triton"), backend_named("torch")

    def wrap(op: Callable) -> Callable:
        if corrupt is None:
            return op
        return lambda call: _Corrupted.apply(op(call), corrupt)

    register_backend(
        Backend(
            "triton",
            wrap(torch_backend.conv2d),
            wrap(torch_backend.linear),
            torch_backend.unavailable_reason,
        )
    )
    try:
        yield
    finally:
        register_backend(real)


CONV = Case(2, 6, 6, 3, 3, 1, 1, 7, 5, norm=True)
CORRUPTIONS = {
    "outputs above 1.5 zeroed": zero_above(1.5),
    "largest output's sign flipped": flip_largest,
    "one output NaN": nan_at(17),
    "one output unwritten (NaN poison)": nan_at(-1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_uncorrupted_stand_in_passes(dtype):
    with triton_standing_in(None):
        check_case(CONV, dtype)
        check_linear((3, 5), 8, 8, 4, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_check_case_fails_on_a_corrupted_output_and_says_where(name, dtype):
    with triton_standing_in(CORRUPTIONS[name]), pytest.raises(AssertionError) as failure:
        check_case(CONV, dtype)
    message = str(failure.value)
    assert "output" in message, message
    assert "first at [[" in message, message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_check_linear_fails_on_a_corrupted_output_and_says_where(name, dtype):
    with triton_standing_in(CORRUPTIONS[name]), pytest.raises(AssertionError) as failure:
        check_linear((3, 5), 8, 8, 4, dtype)
    message = str(failure.value)
    assert "output" in message, message
    assert "first at [[" in message, message
