"""Checkpoints that survive a crash mid-write and refuse to resume into a different model."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
# What must match for a checkpoint to be resumed: the architecture and the label space.
IDENTITY_KEYS = ("model", "variant", "num_classes", "stem", "data")


def save_atomically(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file beside ``path`` and rename it over ``path``: a reader sees the old
    checkpoint or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    torch.save(state, partial)
    os.replace(partial, path)


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_for_resume(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint at ``path``, after checking it was written by a run of the same model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    # weights_only: a checkpoint is data (tensors, numbers, strings), never code to unpickle.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"--resume: {path} is not a pnnh train checkpoint of format {FORMAT_VERSION} "
            f"(found {state.get('format_version') if isinstance(state, dict) else type(state)})"
        )
    mismatched = {
        key: (state["identity"].get(key), identity[key])
        for key in IDENTITY_KEYS
        if state["identity"].get(key) != identity[key]
    }
    if mismatched:
        details = ", ".join(
            f"{k}: checkpoint {old!r}, this run {new!r}" for k, (old, new) in mismatched.items()
        )
        raise ValueError(f"--resume: {path} was written by a different run ({details})")
    return state
