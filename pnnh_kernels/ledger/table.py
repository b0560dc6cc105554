"""The ledger as Markdown: one table of launches per step, and a comparison of steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch

from pnnh_kernels.ledger.cards import CARDS, DEFAULT_CARDS
from pnnh_kernels.ledger.steps import StepLedger

MB = 1e6
# The legend under each table: its times are a model, not a measurement (cards.py, StepLedger.seconds)
# and the cached re-reads an estimate kept out of the totals (Declared.cached_read, record.py).
MODELLED_NOTE = (
    "*modelled*: a roofline, not a measurement: each launch takes the longer of its bytes (read + "
    "written) at the card's DRAM bandwidth and its FLOPs at the datasheet {rate}, summed over the "
    "launches, with no launch overhead and no overlap (a floor for comparing dataflows)."
)
CACHED_NOTE = (
    " *cached re-read*: bytes a launch reads again that a cache would serve (a convolution's "
    "neighbouring taps, weight tiles every program re-reads), estimated from its tiling and counted "
    "in neither read, written nor the modelled time."
)
MAINLOOP_NOTE = (
    " *modelled H200 mainloop*: the static mainloop model's time of that convolution's mainloop, "
    "from its sm_90 SASS (pnnh_kernels.mainloop)."
)


def _legend(dtype: torch.dtype) -> str:
    rate = "dense 16-bit tensor-core rate" if dtype.itemsize <= 2 else "fp32 rate (no tensor cores)"
    return MODELLED_NOTE.format(rate=rate)


def microseconds(seconds: float) -> str:
    """``seconds`` in us to at least 3 significant digits: one decimal from 10 us up (as large
    shapes always printed), 3 significant digits below, so that a small shape's nanosecond
    launches print as such and not as 0.0."""
    us = seconds * 1e6
    if us == 0:
        return "0"
    if us >= 10:
        return f"{us:.1f}"
    return f"{us:#.3g}"  # '#' keeps trailing zeros: 1.20, not 1.2


def format_ledger(
    ledger: StepLedger, card: str = DEFAULT_CARDS[0], modelled: Optional[Mapping[str, float]] = None
) -> str:
    """Every launch of the step: kind, name, bytes read and written (MB), cache-served re-reads
    (MB, an estimate, not in the totals), GFLOP and the modelled (roofline) time on ``card`` (us);
    with ``modelled`` (seconds by launch name: the static mainloop model's H200 time), that beside
    it. A one-line legend under the table says what the modelled and cached columns are."""
    peaks = CARDS[card]
    bits = 16 if ledger.dtype.itemsize <= 2 else 32
    lines = [
        f"### {ledger.label}, {str(ledger.dtype).removeprefix('torch.')}, "
        f"{'training' if ledger.training_norm else 'eval'} BatchNorm",
        "",
        "| # | kind | launch | read (MB) | written (MB) | cached re-read (MB) | GFLOP "
        f"| {peaks.name} modelled (us) |"
        + (" modelled H200 mainloop (us) |" if modelled is not None else ""),
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
            f"{microseconds(seconds)} |"
            + (_modelled_cell(modelled, launch.name) if modelled is not None else "")
        )
    lines.append(
        f"| | | **total: {len(ledger.launches)} launches** | **{ledger.read / MB:.1f}** | "
        f"**{ledger.written / MB:.1f}** | {ledger.cached_read / MB:.1f} | {ledger.flops / 1e9:.1f} | "
        f"**{microseconds(ledger.seconds(peaks))}** |" + (" |" if modelled is not None else "")
    )
    # A blank line first: Markdown would read a line right under a table as one more row.
    legend = _legend(ledger.dtype) + CACHED_NOTE + (MAINLOOP_NOTE if modelled is not None else "")
    lines += ["", legend]
    return "\n".join(lines) + "\n"


def _modelled_cell(modelled: Mapping[str, float], name: str) -> str:
    return f" {microseconds(modelled[name])} |" if name in modelled else " |"


def format_comparison(
    ledgers: Sequence[StepLedger], baseline: StepLedger, cards: Sequence[str] = DEFAULT_CARDS
) -> str:
    """Totals of each step beside the baseline's: launches, bytes, FLOPs, modelled (roofline)
    times, ratios; a one-line legend under the table says what the modelled times are."""
    header = "| step | launches | read (MB) | written (MB) | bytes vs baseline | GFLOP |"
    rule = "|---|---|---|---|---|---|"
    for card in cards:
        header += f" {CARDS[card].name} modelled (us) | modelled vs baseline |"
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
            row += f" {microseconds(seconds)} | {seconds / baseline.seconds(CARDS[card]):.2f}x |"
        lines.append(row)
    lines += ["", _legend(baseline.dtype)]  # blank first: see format_ledger
    return "\n".join(lines) + "\n"
