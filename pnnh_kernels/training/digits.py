"""scikit-learn's digits (1,797 real 8x8 handwritten digits, bundled offline) and a short trainer.

Used by ``pnnh demo`` and the depth studies: small enough to train 64-layer nets on two CPU cores in
under a minute, real enough that a net that destroys its input cannot fake it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pnnh_kernels.coder import distinct_coders, reconstruction_loss


@dataclass(frozen=True)
class DigitsSplit:
    train_images: Tensor  # [N, 1, 8, 8], standardised with the training set's mean and std
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def require_scikit_learn(who: str = "the digits experiments") -> None:
    """ImportError saying what to install where scikit-learn (the digits' loader) is missing: the
    commands ask before they start work, :func:`load_digits_split` when it loads."""
    try:
        import sklearn.datasets
        import sklearn.model_selection  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"{who} trains on scikit-learn's digits, and scikit-learn is not installed ({error}): "
            "pip install 'pnnh-kernels[experiments]' (or pip install scikit-learn)"
        ) from error


def load_digits_split(test_fraction: float = 0.25, split_seed: int = 0) -> DigitsSplit:
    """A fixed, stratified train/test split of the digits data set."""
    require_scikit_learn()
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=test_fraction,
        random_state=split_seed,
        stratify=labels.numpy(),
    )
    train_images, test_images = images[train_idx], images[test_idx]
    mean, std = train_images.mean(), train_images.std()
    return DigitsSplit(
        (train_images - mean) / std,
        labels[train_idx],
        (test_images - mean) / std,
        labels[test_idx],
    )


def load_fashion_split(
    train_count: int, test_count: int, pool: int = 2, split_seed: int = 0, data_dir=None
) -> DigitsSplit:
    """A study-sized split of Fashion-MNIST (real 28 x 28 clothing images, 10 classes): the first
    ``train_count`` images of a seeded permutation of its training set and ``test_count`` of its test
    set, average-pooled by ``pool`` (2: 14 x 14, so that deep nets train in minutes on a CPU), then
    standardised with the training subset's mean and std, as the digits split is."""
    from pnnh_kernels.training.fashion_mnist import load_fashion_mnist

    splits = []
    generator = torch.Generator().manual_seed(split_seed)
    for train, count in ((True, train_count), (False, test_count)):
        images, labels, _ = load_fashion_mnist(data_dir, train)
        chosen = torch.randperm(len(labels), generator=generator)[:count]
        pixels = F.avg_pool2d(images[chosen].float() / 255, pool) if pool > 1 else images[chosen] / 255
        splits.append((pixels, labels[chosen]))
    (train_images, train_labels), (test_images, test_labels) = splits
    mean, std = train_images.mean(), train_images.std()
    return DigitsSplit(
        (train_images - mean) / std, train_labels, (test_images - mean) / std, test_labels
    )


@dataclass(frozen=True)
class CoderObjective:
    """The paper's self-supervised task for the coders during a study run: reconstruct fresh
    rectified-normal samples ``relu(N(0, I))``, ``weight * mean_coders ||coder(r) - r||^2`` added to
    the classification loss each step. The coders take no weight decay (it would pull them off the
    autoencoder the task asks for). ``task_gradient=False``: the coders learn from the
    reconstruction alone, the classification gradient does not reach them (the literal
    self-supervised reading)."""

    weight: float = 1.0
    task_gradient: bool = True
    samples: int = 256


@dataclass(frozen=True)
class TrainResult:
    train_loss: float  # mean cross-entropy over the training set, eval mode, after training
    test_accuracy: float
    diverged: bool  # a non-finite loss was seen during training
    seconds: float


@torch.no_grad()
def evaluate(
    model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size])
        target = labels[start : start + batch_size]
        total_loss += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
    return total_loss / len(labels), correct / len(labels)


def train_classifier(
    model: nn.Module,
    data: DigitsSplit,
    epochs: int = 10,
    batch_size: int = 64,
    max_lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    optimizer_name: str = "sgd",
    coder_objective: Optional[CoderObjective] = None,
) -> TrainResult:
    """SGD with momentum (or ``optimizer_name="adamw"``, the ViT recipe: AdamW, momentum unused)
    and a one-cycle schedule; the same recipe for every variant of a study. ``coder_objective``:
    the coders' reconstruction task on top (see :class:`CoderObjective`)."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    coders = [c for c in distinct_coders(model) if any(p.requires_grad for p in c.parameters())]
    coder_params = {id(p) for c in coders for p in c.parameters() if p.requires_grad}
    groups: list[dict] = [{"params": list(model.parameters())}]
    if coder_objective is not None:
        groups = [
            {"params": [p for p in model.parameters() if id(p) not in coder_params]},
            {"params": [p for c in coders for p in c.parameters() if p.requires_grad],
             "weight_decay": 0.0},
        ]  # fmt: skip
    if optimizer_name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            groups, lr=max_lr, momentum=momentum, weight_decay=weight_decay
        )
    elif optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=max_lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer_name: expected 'sgd' or 'adamw', got {optimizer_name!r}")
    samples = torch.Generator().manual_seed(seed + 1)  # the reconstruction task's inputs
    steps_per_epoch = math.ceil(len(data.train_labels) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, epochs=epochs, steps_per_epoch=steps_per_epoch
    )
    diverged = False
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(data.train_labels), generator=generator)
        for first in range(0, len(order), batch_size):
            batch = order[first : first + batch_size]
            loss = F.cross_entropy(model(data.train_images[batch]), data.train_labels[batch])
            if not torch.isfinite(loss):
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if coder_objective is not None and not coder_objective.task_gradient:
                for coder in coders:  # the classification gradient does not reach the coders
                    for parameter in coder.parameters():
                        parameter.grad = None
            if coder_objective is not None and coders and coder_objective.weight > 0:
                task = reconstruction_loss(coders, coder_objective.samples, torch.device("cpu"), samples)
                (coder_objective.weight * task).backward()
            optimizer.step()
            schedule.step()
        if diverged:
            break
    train_loss, _ = evaluate(model, data.train_images, data.train_labels)
    _, test_accuracy = evaluate(model, data.test_images, data.test_labels)
    return TrainResult(
        train_loss if not diverged else float("nan"),
        test_accuracy,
        diverged,
        time.perf_counter() - start,
    )
