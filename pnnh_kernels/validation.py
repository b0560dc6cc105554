"""Argument checks shared by the modules, models and functions, so that each argument is held to one
rule and named in one message wherever it is passed."""

from __future__ import annotations

from typing import Any


def check_positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 1 (not a bool: ``True`` is not a channel count), else ValueError
    naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value
