"""The ledger as Markdown: one table of launches per step, and a comparison of steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

from pnnh_kernels.ledger.cards import CARDS, DEFAULT_CARDS
from pnnh_kernels.ledger.steps import StepLedger

MB = 1e6


def format_ledger(
    ledger: StepLedger, card: str = DEFAULT_CARDS[0], modelled: Optional[Mapping[str, float]] = None
) -> str:
    """Every launch of the step: kind, name, bytes read and written (MB), cache-served re-reads
    (MB, an estimate, not in the totals), GFLOP and the roofline time on ``card`` (us); with
    ``modelled`` (seconds by launch name: the static mainloop model's H200 time), that beside it."""
    peaks = CARDS[card]
    bits = 16 if ledger.dtype.itemsize <= 2 else 32
    lines = [
        f"### {ledger.label}, {str(ledger.dtype).removeprefix('torch.')}, "
        f"{'training' if ledger.training_norm else 'eval'} BatchNorm",
        "",
        "| # | kind | launch | read (MB) | written (MB) | cached re-read (MB) | GFLOP "
        f"| {peaks.name} (us) |" + (" modelled H200 mainloop (us) |" if modelled is not None else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if modelled is not None else ""),
    ]
    if modelled is not None:  # a name launched more than once (the 1x1 weight gradients) is unlabelled
        names = [launch.name for launch in ledger.launches]
        modelled = {name: t for name, t in modelled.items() if names.count(name) == 1}
    for index, launch in enumerate(ledger.launches, 1):
        seconds = peaks.seconds(launch.bytes, launch.flops, bits)
        lines.append(
            f"| {index} | {launch.kind} | {launch.name} | {launch.read / MB:.2f} | "
            f"{launch.written / MB:.2f} | {launch.cached_read / MB:.1f} | {launch.flops / 1e9:.2f} | "
            f"{seconds * 1e6:.1f} |"
            + (_modelled_cell(modelled, launch.name) if modelled is not None else "")
        )
    lines.append(
        f"| | | **total: {len(ledger.launches)} launches** | **{ledger.read / MB:.1f}** | "
        f"**{ledger.written / MB:.1f}** | {ledger.cached_read / MB:.1f} | {ledger.flops / 1e9:.1f} | "
        f"**{ledger.seconds(peaks) * 1e6:.1f}** |" + (" |" if modelled is not None else "")
    )
    return "\n".join(lines) + "\n"


def _modelled_cell(modelled: Mapping[str, float], name: str) -> str:
    return f" {modelled[name] * 1e6:.1f} |" if name in modelled else " |"


def format_comparison(
    ledgers: Sequence[StepLedger], baseline: StepLedger, cards: Sequence[str] = DEFAULT_CARDS
) -> str:
    """Totals of each step beside the baseline's: launches, bytes, FLOPs, roofline times, ratios."""
    header = "| step | launches | read (MB) | written (MB) | bytes vs baseline | GFLOP |"
    rule = "|---|---|---|---|---|---|"
    for card in cards:
        header += f" {CARDS[card].name} (us) | vs baseline |"
        rule += "---|---|"
    lines = [header, rule]
    for ledger in (baseline, *ledgers):
        row = (
            f"| {ledger.label} | {len(ledger.launches)} | {ledger.read / MB:.1f} | "
            f"{ledger.written / MB:.1f} | {ledger.bytes / baseline.bytes:.2f}x | "
            f"{ledger.flops / 1e9:.1f} |"
        )
        for card in cards:
            seconds = ledger.seconds(CARDS[card])
            row += f" {seconds * 1e6:.1f} | {seconds / baseline.seconds(CARDS[card]):.2f}x |"
        lines.append(row)
    return "\n".join(lines) + "\n"
