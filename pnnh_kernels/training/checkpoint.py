"""Checkpoints that survive a crash mid-write and refuse to resume into a different model."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
# What must match for a checkpoint to be resumed: the architecture and the label space.
IDENTITY_KEYS = ("model", "variant", "num_classes", "stem", "data")


# The files of one run in its --out folder (a new run refuses a folder holding any of them).
RUN_FILES = ("last.pt", "metrics.jsonl", "metrics.csv", "summary.json", "accuracy.png")


def _free_bytes(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free:,} bytes free there"
    except OSError:
        return "free space unknown"


def save_atomically(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file beside ``path`` and rename it over ``path``: a reader sees the old
    checkpoint or the new one, never half of one. A failed write (a full disk, a quota) raises an
    OSError naming ``path`` and the cause, removes the partial file and leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        torch.save(state, partial)
        os.replace(partial, path)
    except (OSError, RuntimeError) as error:
        # torch.save reports a full disk as "[enforce fail at inline_container.cc] unexpected pos"
        # (a RuntimeError), or as OSError(ENOSPC) from the file object: either way, say where.
        partial.unlink(missing_ok=True)
        kept = f"the previous {path.name} is unchanged" if path.exists() else "nothing was saved"
        message = (
            f"{path}: could not write the checkpoint ({type(error).__name__}: {error}); "
            f"{_free_bytes(path.parent)}; {kept}"
        )
        code = getattr(error, "errno", None)
        raise (OSError(code, message) if code is not None else OSError(message)) from error


def check_space(folder: Path, needed: int) -> None:
    """Raise before training when ``folder`` cannot hold a checkpoint of ``needed`` bytes twice
    over (the new one is written beside the old one), instead of failing after an epoch."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # unknown: the save itself still fails clearly
    if free < 2 * needed:
        raise OSError(
            f"--out: {folder} has {free:,} bytes free; a checkpoint of this run takes about "
            f"{needed:,} bytes and is written beside the previous one ({2 * needed:,} needed)"
        )


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


def read_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint at ``path`` (any run's), after checking that it is one. ``mmap``: map the
    tensors instead of reading them, for a look at the settings, epoch and history only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"--resume: {path} is empty (0 bytes): not a checkpoint")
    try:
        # weights_only: a checkpoint is data (tensors, numbers, strings), never code to unpickle.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError,
            TypeError, AttributeError, IndexError) as error:  # fmt: skip
        raise ValueError(
            f"--resume: {path} ({path.stat().st_size:,} bytes) cannot be read as a checkpoint, "
            f"truncated or not one ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        ) from error
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"--resume: {path} is not a pnnh train checkpoint of format {FORMAT_VERSION} "
            f"(found {state.get('format_version') if isinstance(state, dict) else type(state)})"
        )
    return state


def check_identity(state: dict[str, Any], identity: dict[str, Any], path: Path) -> None:
    """Raise ValueError naming what differs when the checkpoint ``state`` (read from ``path``) was
    not written by a run of the model and label space ``identity`` describes."""
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


def load_for_resume(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint at ``path``, after checking it was written by a run of the same model."""
    state = read_checkpoint(path)
    check_identity(state, identity, path)
    return state
