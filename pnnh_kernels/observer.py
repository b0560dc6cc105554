"""The one hook between the launchers and anything that observes their launches (the ledger).

Every fused launch goes through :func:`launch` with its own declaration of what it reads and writes
beside it (a callable, so that nothing is computed for an observer unless one is installed). With
no observer installed a launch costs one ``is None`` check; ``import pnnh_kernels`` never loads the
observer (pnnh_kernels.ledger.record installs itself here while it records).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Optional, Protocol

import torch
from torch import Tensor


class Declared(NamedTuple):
    """What one launch declares: every tensor it reads and every tensor it writes (None and
    placeholders are skipped, a tensor listed twice counts once), its FLOPs, and the bytes of re-reads
    a cache would serve (an estimate from its tiling)."""

    reads: Sequence[Optional[Tensor]]
    writes: Sequence[Optional[Tensor]]
    flops: int = 0
    cached_read: int = 0


class Observer(Protocol):
    # The card a recording on meta tensors models (its multiprocessors size split reductions, its
    # compute capability picks the tiles).
    modelled_multiprocessors: int
    modelled_capability: tuple[int, int]

    def observe_launch(
        self, name: str, kind: str, run: Callable[[], Any], declared: Declared
    ) -> None: ...

    def paused_block(self) -> contextlib.AbstractContextManager[None]: ...


# The installed observer; None in production (then launch() runs the kernel and nothing else).
observer: Optional[Observer] = None


def launch(
    name: str,
    kind: str,
    function: Callable[..., Any],
    arguments: Sequence[Any],
    declare: Callable[[], Declared],
) -> None:
    """One launch of our kernels: ``function(*arguments)``. An installed observer gets
    ``declare()`` and decides (the ledger on meta tensors counts the launch without running it).
    The call is made here, not through a closure: no frame between the launcher and the launch."""
    if observer is None:
        function(*arguments)
        return
    observer.observe_launch(name, kind, lambda: function(*arguments), declare())


def modelled_multiprocessors() -> int:
    """The multiprocessor count of the card an observer models (a launch on meta tensors sizes its
    grid for it); meta tensors reach a launch only under an observer."""
    if observer is None:
        raise RuntimeError(
            "meta tensors reach a kernel launch only under pnnh_kernels.ledger.recording()"
        )
    return observer.modelled_multiprocessors


def modelled_capability() -> tuple[int, int]:
    """The compute capability of the card an observer models (see modelled_multiprocessors)."""
    if observer is None:
        raise RuntimeError(
            "meta tensors reach a kernel launch only under pnnh_kernels.ledger.recording()"
        )
    return observer.modelled_capability


@contextlib.contextmanager
def unobserved() -> Iterator[None]:
    """Work in the block is not observed: a check's own work (poisoning outputs), not the step's."""
    if observer is None:
        yield
        return
    with observer.paused_block():
        yield


# Tensors that stand in for absent kernel arguments (never read): an observer skips them.
_placeholders: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def placeholder(device: torch.device, dtype: torch.dtype) -> Tensor:
    """A one-element tensor to pass for a pointer argument the kernel never dereferences (its
    constexpr flag is off). One per device and dtype, so that the drift test can tell it apart."""
    key = (device, dtype)
    tensor = _placeholders.get(key)
    if tensor is None:
        tensor = _placeholders[key] = torch.empty(1, device=device, dtype=dtype)  # never read
    return tensor


def is_placeholder(tensor: Tensor) -> bool:
    return any(tensor is p for p in _placeholders.values())


def modelling(tensor: Tensor) -> bool:
    """True when launches on ``tensor`` are declared and not run: a meta tensor (the ledger)."""
    return tensor.device.type == "meta"


def tensor_bytes(tensor: Tensor) -> int:
    """Bytes of the elements a view spans (broadcast dimensions, stride 0, count once)."""
    elements = math.prod(size for size, stride in zip(tensor.shape, tensor.stride()) if stride != 0)
    if tensor.numel() == 0:
        elements = 0
    return elements * tensor.element_size()


# The Python body of each of our ops, by OpOverload: an observer that intercepts PyTorch's dispatch
# (the ledger on meta tensors) runs these instead of the ops' fake kernels, so that it sees the
# launches inside them.
implementations: dict[Any, Callable[..., Any]] = {}


def register_implementation(op: Any, implementation: Callable[..., Any]) -> None:
    implementations[op] = implementation
