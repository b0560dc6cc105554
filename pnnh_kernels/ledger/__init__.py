"""The traffic ledger: every device launch of one training step, with its bytes and FLOPs, counted on
a CPU at the real shape.

    from pnnh_kernels.ledger import step_ledger
    pnnh = step_ledger("pnnh-layer", batch=256, channels=128, size=16, backend="triton")
    resnet = step_ledger("resnet-layer", batch=256, channels=128, size=16)
    print(format_comparison([pnnh], resnet))

``pnnh ledger`` prints the same tables. :mod:`pnnh_kernels.ledger.record` has the counting rules;
:mod:`pnnh_kernels.ledger.cards` the peaks of the roofline times.
"""

from __future__ import annotations

from pnnh_kernels.ledger.cards import CARDS, DEFAULT_CARDS, Card
from pnnh_kernels.ledger.record import Launch, recording
from pnnh_kernels.ledger.steps import STEPS, StepLedger, step_ledger
from pnnh_kernels.ledger.table import format_comparison, format_ledger

__all__ = [
    "CARDS",
    "DEFAULT_CARDS",
    "STEPS",
    "Card",
    "Launch",
    "StepLedger",
    "format_comparison",
    "format_ledger",
    "recording",
    "step_ledger",
]
