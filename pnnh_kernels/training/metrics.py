"""Per-epoch metrics of ``pnnh train``: JSONL and CSV logs, the final summary, the accuracy plot."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

EPOCH_FIELDS = (
    "epoch",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "coder_loss",
    "images_per_second",
    "learning_rate",
    "peak_memory_mib",
    "epoch_seconds",
)


def _replace(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_logs(history: list[dict[str, Any]], out: Path) -> None:
    """Rewrite ``metrics.jsonl`` and ``metrics.csv`` from the whole history: a resumed run's logs
    hold exactly the epochs its checkpoint holds, never a duplicate of an interrupted epoch."""
    _replace(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    partial = out / ".metrics.csv.partial"
    with partial.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=EPOCH_FIELDS)
        writer.writeheader()
        writer.writerows({key: row.get(key) for key in EPOCH_FIELDS} for row in history)
    os.replace(partial, out / "metrics.csv")


def write_summary(summary: dict[str, Any], out: Path) -> None:
    _replace(out / "summary.json", json.dumps(summary, indent=1) + "\n")


def plot_accuracy(history: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    """``accuracy.png``: train and test accuracy per epoch (None without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        print("accuracy plot skipped: matplotlib is not installed (pip install 'pnnh-kernels[bench]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [row["train_accuracy"] for row in history], marker="o", label="train")
    ax.plot(epochs, [row["test_accuracy"] for row in history], marker="o", label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = out / "accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
