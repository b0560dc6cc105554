"""The one shape syntax of the command line: ``NxCxHxW``, a batch of images as PyTorch orders it
(``256x128x16x16``: 256 images of 128 channels, 16 x 16 pixels), in ``pnnh ledger --shape``,
``pnnh profile --layer`` and ``python -m pnnh_kernels.triton.report --shape``. The report's layers
take their other sizes as ``,key=value`` after it (``256x128x16x16,out=256,k=1,stride=2,code=0``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

EXAMPLE = "256x128x16x16"

T = TypeVar("T")


def image_shape(text: str, argument: str = "--shape", square: bool = False) -> tuple[int, ...]:
    """(N, C, H, W) from ``NxCxHxW``; a ValueError naming ``argument`` and the expected form.
    ``square``: H must equal W (the steps that take one size)."""
    parts = text.strip().lower().split("x")
    values = tuple(int(p) for p in parts if p.isdecimal() and p.isascii())
    if len(parts) != 4 or len(values) != 4 or min(values) < 1:
        raise ValueError(
            f"{argument}: expected NxCxHxW, four positive integers such as {EXAMPLE} (batch x "
            f"channels x height x width), got {text!r}"
        )
    if square and values[2] != values[3]:
        raise ValueError(f"{argument}: expected square images (H = W), got {text!r}")
    return values


def shape_with_options(
    text: str, options: dict[str, int], argument: str = "--shape"
) -> tuple[tuple[int, ...], dict[str, int]]:
    """``NxCxHxW[,key=value...]``: the shape and the given options (non-negative integers among
    ``options``' keys), over ``options``' defaults."""
    head, *rest = text.split(",")
    shape = image_shape(head, argument)
    values = dict(options)
    for item in rest:
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in options or not (value.strip().isdecimal() and value.strip().isascii()):
            raise ValueError(
                f"{argument}: expected ',key=value' with key among {sorted(options)} and a "
                f"non-negative integer, got {item!r} in {text!r}"
            )
        values[key] = int(value)
    return shape, values


def argparse_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """``parse`` as an argparse ``type=``: its ValueError message printed as argparse's error (a
    plain ValueError from a type function loses its message)."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error

    convert.__name__ = getattr(parse, "__name__", "shape")
    return convert
