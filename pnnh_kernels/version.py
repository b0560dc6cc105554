"""The package's version and, in a git checkout, its revision (``pnnh --version``, ``pnnh info``).

The revision is read from git when asked for, not at import; an installed wheel, which has no
checkout beside it, reports the version alone.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Optional

VERSION = "0.1.0"


@functools.lru_cache(maxsize=1)
def git_revision() -> Optional[str]:
    """The short commit of the checkout this package is imported from, with ``+dirty`` when its
    tracked files have changes; None outside a git checkout (or without git)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def version_string() -> str:
    """``pnnh-kernels 0.1.0`` and, in a checkout, ``(git abc1234)``."""
    revision = git_revision()
    return f"pnnh-kernels {VERSION}" + (f" (git {revision})" if revision else "")
