"""Throughput ratios from interleaved rounds (issue #25): the variants' training steps timed round
by round in a seeded random order, so that drift in clocks, temperature or other load falls on all
of them alike, and each round's ratio a paired sample. The claims report's throughput verdict
takes the 95% interval of those ratios (bench/test_models.py: test_interleaved_training_steps).
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

# Student's t, two-sided 95% (the 0.975 quantile), by degrees of freedom 1..30; beyond, the normal's.
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
NORMAL_975 = 1.960


@dataclass(frozen=True)
class RatioInterval:
    """A throughput ratio (images/s of a variant over a reference's): the geometric mean of the
    rounds' ratios and its 95% interval."""

    ratio: float
    low: float
    high: float
    rounds: int


def t_975(degrees_of_freedom: int) -> float:
    if degrees_of_freedom < 1:
        raise ValueError(f"degrees_of_freedom: expected at least 1, got {degrees_of_freedom}")
    return T_975[degrees_of_freedom - 1] if degrees_of_freedom <= len(T_975) else NORMAL_975


def throughput_ratio(seconds: list[float], reference_seconds: list[float]) -> RatioInterval:
    """The variant's throughput over the reference's from paired rounds (seconds a step of each in
    the same round): a t-interval on the log ratios, so that the interval of a ratio and of its
    inverse agree."""
    if len(seconds) != len(reference_seconds):
        raise ValueError(
            f"seconds: expected one per round of the reference's {len(reference_seconds)}, "
            f"got {len(seconds)}"
        )
    if len(seconds) < 2:
        raise ValueError(f"seconds: an interval needs at least 2 rounds, got {len(seconds)}")
    if min(seconds) <= 0 or min(reference_seconds) <= 0:
        raise ValueError("seconds: expected positive step times")
    logs = [math.log(reference / own) for own, reference in zip(seconds, reference_seconds)]
    mean = statistics.fmean(logs)
    half = t_975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return RatioInterval(math.exp(mean), math.exp(mean - half), math.exp(mean + half), len(logs))


def round_orders(variants: list[str], rounds: int, seed: int = 0) -> list[list[str]]:
    """The order of the variants in each round: a seeded shuffle per round, so that no variant is
    always first (after the others' allocations) or always last."""
    generator = random.Random(seed)
    orders = []
    for _ in range(rounds):
        order = list(variants)
        generator.shuffle(order)
        orders.append(order)
    return orders
