"""Backends are function tables: one implementation of each PNNH op per backend.

A backend registers a :class:`Backend` with :func:`register_backend` from its own package (the
registry imports no backend: ``import pnnh_kernels`` imports the built-in ones, which register
themselves); the functional entry points
(:func:`pnnh_kernels.functional.pnnh_conv2d`, :func:`pnnh_kernels.functional.pnnh_linear`) validate
their arguments once and then call ``backend.conv2d`` / ``backend.linear`` of the backend that
:func:`resolve_backend` picks. Adding the Triton or CUDA kernels means registering another table; the
modules and the functional API do not change.

``"auto"`` runs the backend measured fastest on the device's family (:mod:`pnnh_kernels.backends.auto`:
a table of measurements, each row citing its file in docs/perf) and says which through
:func:`resolve_backend` and why through :func:`backend_reason` (the modules expose them as
``backend_in_use`` and ``backend_reason``). A backend named explicitly that cannot run the call
raises :class:`BackendUnavailableError` with the reason: no silent fallback hides a slow path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from pnnh_kernels.backends.auto import auto_rule
from pnnh_kernels.backends.call import ConvCall, LinearCall

# The concrete backends; a name that is not registered is rejected when asked for.
BACKEND_NAMES = ("cuda", "triton", "torch")
KNOWN_BACKENDS = ("auto", *BACKEND_NAMES)
REFERENCE_BACKEND = "torch"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call; the message says why."""


@dataclass(frozen=True)
class Backend:
    """One backend's implementations.

    ``unavailable_reason(device, dtype, op)`` returns None when the backend can run ``op`` ("conv2d"
    or "linear") on tensors of that device and dtype, else a sentence saying why not. Every backend
    computes training-mode BatchNorm itself. Where "auto" runs it is not the backend's to say: see
    :mod:`pnnh_kernels.backends.auto`.
    """

    name: str
    conv2d: Callable[[ConvCall], torch.Tensor]
    linear: Callable[[LinearCall], torch.Tensor]
    unavailable_reason: Callable[[torch.device, torch.dtype, str], Optional[str]]


_REGISTRY: dict[str, Backend] = {}
# resolve_backend's answers that succeeded, by (name, device, dtype, op): a layer asks on every call,
# and the answer changes only when a backend is (re)registered. Failures are not kept: they raise.
_resolved: dict[tuple, Backend] = {}


def register_backend(backend: Backend) -> None:
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"backend.name: expected one of {BACKEND_NAMES}, got {backend.name!r}")
    _REGISTRY[backend.name] = backend
    _resolved.clear()


def unregister_backend(name: str) -> Optional[Backend]:
    """Remove the backend registered under ``name`` and return it (None if there was none): an
    installation without it, e.g. for a test; :func:`register_backend` puts it back."""
    _resolved.clear()
    return _REGISTRY.pop(name, None)


# What to install or build for a backend an installation may lack (pnnh_kernels.triton registers its
# backend only when triton imports; the CUDA backend needs its extension only when it runs).
INSTALL_HINTS = {
    "triton": "pip install triton, or the [triton] extra: pip install 'pnnh-kernels[triton]'",
    "cuda": "build the extension: python -m pnnh_kernels.cuda.build",
}


def backend_named(name: str) -> Backend:
    """The backend registered under ``name`` (a concrete name, not "auto")."""
    check_backend_name(name)
    if name not in _REGISTRY:
        raise BackendUnavailableError(
            f"backend={name!r}: no {name} kernels are registered in this installation of pnnh_kernels"
        )
    return _REGISTRY[name]


def check_backend_name(name: str) -> str:
    if name not in KNOWN_BACKENDS:
        raise ValueError(f"backend: expected one of {KNOWN_BACKENDS}, got {name!r}")
    return name


def registered_backends() -> tuple[str, ...]:
    """Names of the backends built into this installation."""
    return tuple(name for name in BACKEND_NAMES if name in _REGISTRY)


def why_unavailable(name: str, device: torch.device, dtype: torch.dtype, op: str) -> Optional[str]:
    """Why the backend ``name`` cannot run ``op`` on ``device`` with ``dtype``, or None if it can."""
    backend = _REGISTRY.get(name)
    if backend is None:
        return f"no {name} kernels are registered in this installation of pnnh_kernels"
    return backend.unavailable_reason(device, dtype, op)


def resolve_backend(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    op: str,
) -> Backend:
    """The backend that runs ``op`` for tensors on ``device`` of ``dtype``.

    Raises:
        ValueError: ``name`` is not a known backend.
        BackendUnavailableError: ``name`` was requested explicitly and cannot run this call.
    """
    key = (name, device, dtype, op)
    cached = _resolved.get(key)
    if cached is not None:
        return cached
    _resolved[key] = backend = _resolve(name, device, dtype, op)
    return backend


def _resolve(name: str, device: torch.device, dtype: torch.dtype, op: str) -> Backend:
    check_backend_name(name)
    if name == "auto":
        chosen = auto_rule(device).backend
        if why_unavailable(chosen, device, dtype, op) is None:
            return _REGISTRY[chosen]
        if why_unavailable(REFERENCE_BACKEND, device, dtype, op) is None:
            return _REGISTRY[REFERENCE_BACKEND]
        raise BackendUnavailableError(f"no backend can run {op} on {device} with {dtype}")
    reason = why_unavailable(name, device, dtype, op)
    if reason is not None:
        raise BackendUnavailableError(
            f"backend={name!r} cannot run {op} on {device} with {dtype}: {reason}"
        )
    return _REGISTRY[name]


def backend_reason(name: str, device: torch.device, dtype: torch.dtype, op: str) -> str:
    """Why :func:`resolve_backend` runs what it runs for ``name``: the measurement behind "auto"'s
    choice on this device family, or that the backend was named."""
    if name != "auto":
        return f"backend={name!r} was named explicitly"
    rule = auto_rule(device)
    unavailable = why_unavailable(rule.backend, device, dtype, op)
    if unavailable is None:
        return f"auto: {rule.backend}, {rule.evidence}"
    return (
        f"auto: {REFERENCE_BACKEND}, because {rule.backend} (measured fastest here: "
        f"{rule.evidence}) cannot run {op} on {device} with {dtype}: {unavailable}"
    )


__all__ = [
    "BACKEND_NAMES",
    "INSTALL_HINTS",
    "Backend",
    "BackendUnavailableError",
    "ConvCall",
    "LinearCall",
    "backend_named",
    "backend_reason",
    "register_backend",
    "registered_backends",
    "resolve_backend",
    "unregister_backend",
    "why_unavailable",
]
