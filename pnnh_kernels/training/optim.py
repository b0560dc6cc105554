"""SGD with the usual exemptions from weight decay, and learning-rate schedules with warm-up."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

SCHEDULES = ("cosine", "onecycle")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and conv kernels (coder weights included), none on biases and
    norm scales/shifts: every parameter with fewer than two dimensions."""
    decay, no_decay, seen = [], [], set()
    for parameter in model.parameters():
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def sgd(
    model: nn.Module, lr: float, momentum: float, nesterov: bool, weight_decay: float
) -> torch.optim.SGD:
    if nesterov and momentum <= 0:
        raise ValueError(f"--nesterov: needs --momentum > 0, got {momentum}")
    return torch.optim.SGD(
        parameter_groups(model, weight_decay), lr=lr, momentum=momentum, nesterov=nesterov
    )


@dataclass(frozen=True)
class WarmupSchedule:
    """The learning-rate factor at a step: linear warm-up from ``start_factor`` to 1 over
    ``warmup_steps``, then ``cosine`` (half a cosine down to 0) or ``onecycle`` (a cosine up to
    the peak at 30% of the run, then down to 1e-4 of it; the warm-up replaces the first part)."""

    kind: str
    total_steps: int
    warmup_steps: int
    start_factor: float = 0.01

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"--schedule: expected one of {SCHEDULES}, got {self.kind!r}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"--warmup-epochs: the warm-up ({self.warmup_steps} steps) must fit in the run "
                f"({self.total_steps} steps)"
            )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_factor + (1 - self.start_factor) * step / self.warmup_steps
        if self.kind == "cosine":
            remaining = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / remaining)
            return 0.5 * (1 + math.cos(math.pi * progress))
        peak = max(self.warmup_steps, round(0.3 * self.total_steps))
        if step < peak:  # one-cycle's rise, when the warm-up is shorter than it
            progress = (step - self.warmup_steps) / max(1, peak - self.warmup_steps)
            low = self.start_factor if self.warmup_steps == 0 else 1.0
            return low + (1 - low) * 0.5 * (1 - math.cos(math.pi * progress))
        progress = min(1.0, (step - peak) / max(1, self.total_steps - peak))
        final = 1e-4
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def scheduler(
    optimizer: torch.optim.Optimizer, schedule: WarmupSchedule
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimiser step; its state (the step count) goes into checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
