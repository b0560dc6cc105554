"""The steps a ledger counts: one training step (forward, then backward of a given output gradient)
of a PNNH layer or block, or of the ResNet layer or block it replaces, built as the benchmarks
build them (bias-free convolutions, BatchNorm, channels_last, the default coder)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from pnnh_kernels.backends import (
    INSTALL_HINTS,
    BackendUnavailableError,
    check_backend_name,
    registered_backends,
    resolve_backend,
)
from pnnh_kernels.benchmarking.baselines import ResNetBasicBlock, ResNetLayer
from pnnh_kernels.ledger.cards import Card
from pnnh_kernels.ledger.record import Launch, Recorder, recording

STEPS = ("pnnh-layer", "resnet-layer", "pnnh-block", "resnet-block")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class StepLedger:
    """The launches of one step and what they were counted for."""

    step: str
    backend: str  # the PNNH backend ("" for the ResNet steps)
    batch: int
    channels: int
    size: int
    dtype: torch.dtype
    training_norm: bool
    launches: tuple[Launch, ...]

    @property
    def label(self) -> str:
        name = f"{self.step} [{self.backend}]" if self.backend else self.step
        return f"{name} {self.batch}x{self.channels}x{self.size}x{self.size}"

    @property
    def read(self) -> int:
        return sum(launch.read for launch in self.launches)

    @property
    def written(self) -> int:
        return sum(launch.written for launch in self.launches)

    @property
    def bytes(self) -> int:
        return self.read + self.written

    @property
    def cached_read(self) -> int:
        return sum(launch.cached_read for launch in self.launches)

    @property
    def flops(self) -> int:
        return sum(launch.flops for launch in self.launches)

    def seconds(self, card: Card) -> float:
        """Roofline time: each launch at the larger of its memory and arithmetic time, summed (no
        launch overhead, no overlap between launches)."""
        bits = torch.finfo(self.dtype).bits
        return sum(card.seconds(launch.bytes, launch.flops, bits) for launch in self.launches)

    def modelled_seconds(self, card: Card, mainloops: Mapping[str, float]) -> float:
        """The step with its convolution mainloops at the static mainloop model's time
        (``mainloops``: seconds by launch name, as ``pnnh ledger --model`` takes them; a name
        launched more than once keeps its roofline) and every other launch at its roofline on
        ``card``: modelled, a floor for the launches the model does not read."""
        bits = torch.finfo(self.dtype).bits
        names = [launch.name for launch in self.launches]
        return sum(
            mainloops[launch.name]
            if launch.name in mainloops and names.count(launch.name) == 1
            else card.seconds(launch.bytes, launch.flops, bits)
            for launch in self.launches
        )


def backend_unavailable_reason(backend: str, dtype: torch.dtype) -> str | None:
    """None when this installation can count a PNNH step on ``backend`` (on meta tensors: the
    launchers declare their launches, no GPU is needed), else why not and what to install."""
    check_backend_name(backend)
    if backend != "auto" and backend not in registered_backends():
        hint = INSTALL_HINTS.get(backend)
        reason = f"no {backend} kernels are registered in this installation of pnnh_kernels"
        return f"{reason} (to count it: {hint})" if hint else reason
    try:
        resolve_backend(backend, torch.device("meta"), dtype, "conv2d")
    except BackendUnavailableError as error:
        return str(error)
    return None


def build_step_module(step: str, channels: int, backend: str, training_norm: bool = True) -> nn.Module:
    """The module of ``step`` (see :data:`STEPS`) on the CPU, in training or eval mode."""
    from pnnh_kernels import FusedPNNHConv
    from pnnh_kernels.coder import PNNHCoder

    if step not in STEPS:
        raise ValueError(f"step: expected one of {STEPS}, got {step!r}")
    if step == "resnet-layer":
        module: nn.Module = ResNetLayer(channels)
    elif step == "resnet-block":
        module = ResNetBasicBlock(channels)
    else:

        def layer(coder: PNNHCoder | None = None) -> FusedPNNHConv:
            return FusedPNNHConv(
                channels, channels, bias=False, norm="batch", coder=coder, backend=backend
            )

        if step == "pnnh-layer":
            module = layer()
        else:  # two layers sharing one coder, as a PNNH stage shares it
            coder = PNNHCoder(channels, channels // 2)
            module = nn.Sequential(layer(coder), layer(coder))
    return module.train(training_norm)


def step_ledger(
    step: str,
    batch: int,
    channels: int,
    size: int,
    backend: str = "triton",
    dtype: str | torch.dtype = "bf16",
    training_norm: bool = True,
    device: str | torch.device = "meta",
    backward: bool = True,
) -> StepLedger:
    """The launches of one training step of ``step`` at [batch, channels, size, size], channels_last.

    On ``device="meta"`` (the default) nothing is computed: PyTorch ops produce shapes and our
    launchers declare their launches, so any shape is counted in well under a second. On a real
    device the step runs, which the drift test does at small shapes.
    """
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    pnnh = step.startswith("pnnh")
    reason = backend_unavailable_reason(backend, dtype) if pnnh else None
    if reason is not None:  # here, not as a traceback from inside the module's forward
        raise BackendUnavailableError(f"backend={backend!r}: cannot count a {step} step: {reason}")
    module = build_step_module(step, channels, backend if pnnh else "torch", training_norm)
    launches = count_step(module, (batch, channels, size, size), dtype, device, backward)
    return StepLedger(
        step, backend if pnnh else "", batch, channels, size, dtype, training_norm, launches
    )  # fmt: skip


def step_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, grad): a non-negative input that requires grad (a ReLU layer's output, as a layer inside
    a net receives) and an output gradient, channels_last."""
    layout = torch.channels_last if len(shape) == 4 else torch.contiguous_format  # images only
    x = torch.randn(shape, dtype=dtype, device=device).relu()
    x = x.contiguous(memory_format=layout).requires_grad_(True)
    grad = torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=layout)
    return x, grad


def count_step(
    module: nn.Module,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: str | torch.device = "meta",
    backward: bool = True,
) -> tuple[Launch, ...]:
    """The launches of the forward of ``module`` on x and the backward of ``grad`` to the gradients of
    x and of every trainable parameter, with x and grad of ``shape`` (channels_last) and the module
    moved to ``device`` and ``dtype``: the second such step (the first warms up what is made once,
    such as a fixed coder's transposes). The gradients are returned, not accumulated into ``.grad``
    (that copy, and the optimizer, are outside the step). ``backward=False``: the forward alone,
    without autograd."""
    return tuple(record_step(module, shape, dtype, device, backward=backward).launches)


def record_step(
    module: nn.Module,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: str | torch.device,
    instrument: bool = False,
    backward: bool = True,
) -> Recorder:
    """:func:`count_step`'s recording (``instrument``: see :func:`recording`)."""
    module = module.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    x, grad = step_inputs(shape, dtype, device)
    inputs = [x, *(p for p in module.parameters() if p.requires_grad)]

    def step() -> None:
        if backward:
            torch.autograd.grad(module(x), inputs, grad)
        else:
            with torch.no_grad():
                module(x)

    with recording():  # a warm-up step: what is made once per fixed tensor is not a step's cost
        step()
    with recording(instrument) as recorder:
        step()
    return recorder
