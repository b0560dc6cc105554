"""The Fashion-MNIST loader on IDX files the tests write themselves (and, where Debian's package is
installed, on the real files)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from pnnh_kernels.training import fashion_mnist
from pnnh_kernels.training.fashion_mnist import load_fashion_mnist


def _idx(values: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in values.shape)
    return header + values.astype(np.uint8).tobytes()


def _write(folder: Path, images: int = 5, compress: bool = True, labels: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("t10k", 3)):
        pixels = rng.integers(0, 256, (count, 28, 28))
        classes = rng.integers(0, 10, (labels if split == "train" and labels else count,))
        for stem, payload in (
            (f"{split}-images-idx3-ubyte", _idx(pixels, 0x803)),
            (f"{split}-labels-idx1-ubyte", _idx(classes, 0x801)),
        ):
            if compress:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(payload))
            else:
                (folder / stem).write_bytes(payload)
    return folder


@pytest.mark.parametrize("compress", [True, False])
def test_loads_both_splits(tmp_path, compress):
    _write(tmp_path, compress=compress)
    train = load_fashion_mnist(tmp_path, train=True)
    test = load_fashion_mnist(tmp_path, train=False)
    assert train.images.shape == (5, 1, 28, 28)
    assert train.images.dtype == torch.uint8
    assert test.labels.shape == (3,)
    assert train.labels.dtype == torch.int64
    assert train.classes[0] == "T-shirt/top"
    raw = (
        gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())
        if compress
        else (tmp_path / "train-images-idx3-ubyte").read_bytes()
    )
    assert train.images[0, 0, 0, :4].tolist() == list(raw[16:20])  # row-major, header skipped


def test_a_missing_folder_names_it_and_the_install_hint(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"no Fashion-MNIST file train-images.*dataset-fashion-mnist"
    ):
        load_fashion_mnist(tmp_path / "nowhere", train=True)


def test_a_truncated_file_is_named(tmp_path):
    _write(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    payload = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(payload[:-100]))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz holds .* truncated"):
        load_fashion_mnist(tmp_path, train=True)
    path.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match=r"cannot read .*train-images-idx3-ubyte.gz"):
        load_fashion_mnist(tmp_path, train=True)
    corrupt = bytearray(gzip.compress(payload))
    corrupt[len(corrupt) // 2] ^= 0xFF  # a damaged deflate stream: zlib.error, not OSError
    path.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match=r"cannot read .*train-images-idx3-ubyte.gz"):
        load_fashion_mnist(tmp_path, train=True)


def test_a_foreign_file_and_mismatched_counts_are_named(tmp_path):
    _write(tmp_path, compress=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(_idx(np.zeros((5, 2)), 0x802))
    with pytest.raises(ValueError, match="expected magic 0x00000801, found 0x802"):
        load_fashion_mnist(tmp_path, train=True)
    _write(tmp_path, compress=False, labels=4)
    with pytest.raises(ValueError, match=r"holds 5 images but .* 4 labels"):
        load_fashion_mnist(tmp_path, train=True)


@pytest.mark.skipif(
    not (fashion_mnist.DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_the_real_test_split_where_installed():
    test = load_fashion_mnist(None, train=False)
    assert test.images.shape == (fashion_mnist.TEST_IMAGES, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10  # balanced, as published


def test_pnnh_train_runs_on_fashion_mnist(tmp_path, capsys):
    """``pnnh train --data fashion-mnist``: grayscale 28 x 28 images, one input channel."""
    import json

    from pnnh_kernels.commands import main

    (tmp_path / "data").mkdir()
    data = _write(tmp_path / "data", images=8)
    out = tmp_path / "run"
    main([
        "train", "--data", "fashion-mnist", "--data-dir", str(data), "--epochs", "1",
        "--batch-size", "4", "--precision", "fp32", "--workers", "0", "--out", str(out),
    ])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_completed"] == 1
    assert summary["data"] == "fashion-mnist"
    assert "fashion-mnist (8 training images, 10 classes)" in capsys.readouterr().out


def test_pnnh_train_names_missing_fashion_mnist_files(tmp_path, capsys):
    from pnnh_kernels.commands import main

    with pytest.raises(SystemExit) as stopped:
        main(["train", "--data", "fashion-mnist", "--data-dir", str(tmp_path), "--out",
              str(tmp_path / "run")])  # fmt: skip
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "no Fashion-MNIST file train-images-idx3-ubyte(.gz)" in error
    assert "dataset-fashion-mnist" in error
    assert not (tmp_path / "run").exists()


def test_a_relative_data_dir_is_saved_absolute(tmp_path, monkeypatch):
    """A resume from another working directory must read the same data, not ./DIR of its own."""
    import json

    from pnnh_kernels.commands import main

    (tmp_path / "data").mkdir()
    _write(tmp_path / "data", images=8)
    monkeypatch.chdir(tmp_path)
    main([
        "train", "--data", "fashion-mnist", "--data-dir", "data", "--epochs", "1",
        "--batch-size", "4", "--precision", "fp32", "--workers", "0", "--out", "run",
    ])  # fmt: skip
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["data_dir"]
    assert saved == str(tmp_path / "data")


def test_the_study_split_pools_and_standardises(tmp_path):
    from pnnh_kernels.analysis import study
    from pnnh_kernels.training.digits import load_fashion_split

    _write(tmp_path, images=8)
    split = load_fashion_split(6, 3, pool=2, data_dir=tmp_path)
    assert split.train_images.shape == (6, 1, 14, 14)
    assert split.test_images.shape == (3, 1, 14, 14)
    assert abs(float(split.train_images.mean())) < 1e-5
    # the preset: three variants and the gain-1 learned coder, depths 16 and 64, 3 seeds
    runs = list(study.planned_runs(study.FASHION))
    assert len(runs) == 4 * 2 * 3
    assert {r.label.get("setting") for r in runs if r.study == "learned"} == {
        "(iii) orthonormal rows, task only"
    }
