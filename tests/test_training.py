"""``pnnh train``: loaders on data written by the tests, schedules, training, exact resume, DDP."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pnnh_kernels.commands import main as pnnh_main
from pnnh_kernels.training.checkpoint import load_for_resume
from pnnh_kernels.training.data import ImageFolder, load_cifar, random_crop_flip, synthetic
from pnnh_kernels.training.optim import WarmupSchedule, parameter_groups
from pnnh_kernels.training.trainer import TrainConfig, Trainer

# Small enough for two CPU cores: ResNet-18 on 16x16 images, a few steps per epoch.
SMOKE = [
    "--data", "synthetic", "--image-size", "16", "--batch-size", "16", "--lr", "0.02",
    "--synthetic-train-size", "64", "--synthetic-test-size", "32", "--precision", "fp32",
    "--workers", "0",
]  # fmt: skip
TIMING_FIELDS = {"images_per_second", "epoch_seconds", "peak_memory_mib"}


def _write_pickle(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        pickle.dump(value, file)


def write_cifar(root: Path, name: str, per_file: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny CIFAR in the official python format (bytes keys, uint8 rows of 3072 values)."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, train, test = (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
        )
        label_key, meta, names_key, classes = b"labels", "batches.meta", b"label_names", 10
    else:
        folder, train, test = "cifar-100-python", ["train"], ["test"]
        label_key, meta, names_key, classes = b"fine_labels", "meta", b"fine_label_names", 100
    written = {}
    for file_name in train + test:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=per_file).tolist()
        _write_pickle(
            root / folder / file_name, {b"data": data, label_key: labels, b"batch_label": b"x"}
        )
        written[file_name] = data
    _write_pickle(root / folder / meta, {names_key: [f"c{i}".encode() for i in range(classes)]})
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loader_reads_the_official_format(tmp_path, name):
    written = write_cifar(tmp_path, name)
    train = load_cifar(tmp_path, name, train=True)
    test = load_cifar(tmp_path, name, train=False)
    first = "data_batch_1" if name == "cifar10" else "train"
    assert train.images.dtype == torch.uint8
    assert train.images.shape == (6 * (5 if name == "cifar10" else 1), 3, 32, 32)
    assert test.images.shape == (6, 3, 32, 32)
    # Rows are channel-major (1024 red, 1024 green, 1024 blue values), as in the official files.
    assert torch.equal(train.images[0, 1].flatten(), torch.from_numpy(written[first][0, 1024:2048]))
    assert len(train.classes) == (10 if name == "cifar10" else 100)
    # DIR may also be the extracted folder itself.
    inner = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert torch.equal(load_cifar(inner, name, train=False).images, test.images)


def test_cifar_errors_name_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/data_batch_1"):
        load_cifar(tmp_path, "cifar10", train=True)
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3"):
        load_cifar(tmp_path, "cifar10", train=True)
    _write_pickle(
        tmp_path / "cifar-10-batches-py" / "data_batch_3",
        {b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]},
    )
    with pytest.raises(ValueError, match=r"\[N, 3072\]"):
        load_cifar(tmp_path, "cifar10", train=True)


def write_folder(root: Path, classes: int = 3, per_class: int = 4) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in range(classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for index in range(per_class):
                size = (int(rng.integers(20, 40)), int(rng.integers(20, 40)))
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")


def test_folder_loader_decodes_crops_and_is_seeded_per_epoch(tmp_path):
    write_folder(tmp_path)
    train = ImageFolder(tmp_path / "train", image_size=16, train=True, seed=3)
    val = ImageFolder(tmp_path / "val", image_size=16, train=False)
    assert train.classes == ("class_0", "class_1", "class_2")
    assert len(train) == 12
    image, label = train[5]
    assert image.shape == (3, 16, 16)
    assert image.dtype == torch.uint8
    assert label == 1
    assert torch.equal(train[5][0], image)  # the same (seed, epoch, index): the same crop
    train.set_epoch(1)
    assert not torch.equal(train[5][0], image)
    assert torch.equal(val[0][0], val[0][0])
    assert val[0][0].shape == (3, 16, 16)


def test_folder_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image folder .*train"):
        ImageFolder(tmp_path / "train", 16, True)
    (tmp_path / "train" / "empty_class").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(tmp_path / "train", 16, True)


def test_random_crop_flip_matches_a_per_image_loop():
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, 2, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    dy = torch.randint(0, 5, (5,), generator=generator)
    dx = torch.randint(0, 5, (5,), generator=generator)
    flip = torch.rand(5, generator=generator) < 0.5
    for i in range(5):
        padded = torch.nn.functional.pad(images[i], (2, 2, 2, 2))
        expected = padded[:, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
        if flip[i]:
            expected = expected.flip(-1)
        assert torch.equal(out[i], expected)


def test_synthetic_splits_share_their_classes():
    train, test = synthetic(256, 8, split_seed=0), synthetic(128, 8, split_seed=1)
    assert not torch.equal(train.images, test.images)

    def centred(images: torch.Tensor) -> torch.Tensor:  # without the per-image brightness shift
        flat = images.float().flatten(1)
        return flat - flat.mean(1, keepdim=True)

    # A nearest-centroid classifier fitted on the train split labels the test split: the classes
    # are the same patterns in both, and learnable.
    centroids = torch.stack([centred(train.images)[train.labels == c].mean(0) for c in range(10)])
    predicted = torch.cdist(centred(test.images), centroids).argmin(1)
    assert (predicted == test.labels).float().mean() > 0.9


def test_schedules_warm_up_then_decay():
    cosine = WarmupSchedule("cosine", total_steps=100, warmup_steps=10)
    assert cosine(0) == pytest.approx(0.01)
    assert cosine(10) == pytest.approx(1.0)
    assert cosine(55) == pytest.approx(0.5)
    assert cosine(100) == pytest.approx(0.0)
    onecycle = WarmupSchedule("onecycle", total_steps=100, warmup_steps=0)
    assert onecycle(0) == pytest.approx(0.01)
    assert onecycle(30) == pytest.approx(1.0)
    assert onecycle(100) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="--warmup-epochs"):
        WarmupSchedule("cosine", total_steps=10, warmup_steps=11)


def test_coder_loss_needs_trainable_coders():
    config = TrainConfig(data="synthetic", coder_loss_weight=0.1)
    with pytest.raises(ValueError, match=r"--coder-loss-weight.*--coder-trainable"):
        config.validate()
    TrainConfig(data="synthetic", coder_loss_weight=0.1, coder_trainable=True).validate()


def test_no_weight_decay_on_biases_and_norms():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    decay, no_decay = parameter_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4
    assert no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert len(no_decay["params"]) == 4  # conv bias, BN weight and bias, linear bias


def _train(out: Path, *extra: str) -> dict:
    pnnh_main(["train", *SMOKE, "--out", str(out), *extra])
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("variant", ["pnnh", "plain", "residual"])
def test_training_on_a_learnable_task_lowers_the_loss(tmp_path, variant):
    summary = _train(tmp_path, "--variant", variant, "--epochs", "3", "--synthetic-train-size", "128")
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert all(np.isfinite(row["train_loss"]) for row in history)
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert summary["variant"] == variant
    assert summary["epochs_completed"] == 3
    assert summary["backends_in_use"] == ["torch"]
    assert (tmp_path / "metrics.csv").read_text().startswith("epoch,train_loss")
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


def _model_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_resume_continues_exactly(tmp_path):
    common = [
        "--epochs",
        "2",
        "--coder-trainable",
        "--coder-loss-weight",
        "0.1",
        "--schedule",
        "onecycle",
    ]
    _train(tmp_path / "straight", *common)
    _train(tmp_path / "split", *common, "--stop-after", "1")
    assert json.loads((tmp_path / "split" / "summary.json").read_text())["epochs_completed"] == 1
    _train(tmp_path / "split", *common, "--resume", str(tmp_path / "split" / "last.pt"))
    straight = _model_state(tmp_path / "straight" / "last.pt")
    resumed = _model_state(tmp_path / "split" / "last.pt")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    rows = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("straight", "split")
    ]
    for a, b in zip(*rows):
        assert {k: v for k, v in a.items() if k not in TIMING_FIELDS} == {
            k: v for k, v in b.items() if k not in TIMING_FIELDS
        }
    assert rows[1][0]["coder_loss"] > 0


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    _train(tmp_path, "--epochs", "1", "--stop-after", "1")
    config = TrainConfig(
        variant="residual", data="synthetic", image_size=16, batch_size=16, epochs=1,
        synthetic_train_size=64, synthetic_test_size=32, out=str(tmp_path / "other"),
        resume=str(tmp_path / "last.pt"), workers=0,
    )  # fmt: skip
    refused = r"--variant residual contradicts the checkpoint .*last.pt, a run with --variant pnnh"
    with pytest.raises(ValueError, match=refused):
        Trainer(config)
    # Not even on request: the weights are another model's.
    config.override_resume_settings = True
    with pytest.raises(ValueError, match=refused + r"; a resume cannot change the model, variant"):
        Trainer(config)
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint"):
        load_for_resume(tmp_path / "missing.pt", {})


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("batch_size", 0, "--batch-size: expected a positive int"),
        ("precision", "fp8", "--precision"),
        ("label_smoothing", 1.0, "--label-smoothing"),
        ("model", "vgg", "--model"),
        ("variant", "dense", "variant"),
        ("backend", "opencl", "backend"),
    ],
)
def test_bad_settings_are_named(argument, value, message):
    config = TrainConfig(data="synthetic")
    setattr(config, argument, value)
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_missing_data_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        Trainer(TrainConfig(data="cifar10", data_dir=str(tmp_path), out=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="--data-dir: required"):
        Trainer(TrainConfig(data="cifar100", out=str(tmp_path / "o")))


def test_trains_on_a_generated_cifar_dataset(tmp_path):
    write_cifar(tmp_path / "data", "cifar10", per_file=8)
    summary = _train(
        tmp_path / "run", "--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--epochs", "1",
        "--image-size", "32", "--model", "resnet18", "--variant", "residual",
    )  # fmt: skip
    assert summary["num_classes"] == 10
    assert summary["data"] == "cifar10"
    assert summary["epochs_completed"] == 1


def test_trains_on_an_image_folder(tmp_path):
    write_folder(tmp_path / "data", classes=3, per_class=6)
    summary = _train(
        tmp_path / "run", "--data", "folder", "--data-dir", str(tmp_path / "data"), "--epochs", "1",
        "--batch-size", "6", "--model", "resnet18", "--variant", "plain",
    )  # fmt: skip
    assert summary["num_classes"] == 3
    assert summary["stem"] == "cifar"  # 16-pixel crops take the small-image stem
    history = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(history) == 1
    assert np.isfinite(json.loads(history[0])["test_loss"])


def test_torchrun_with_two_cpu_processes_keeps_the_ranks_in_step(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "pnnh_kernels", "train", *SMOKE, "--epochs", "1", "--out", str(tmp_path),
        ],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2
    # Checked inside the run by gathering every rank's weight fingerprint; a mismatch raises.
    assert summary["ranks_agree"] is True
    # Rank 0 alone writes: one summary, one log line per epoch.
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
