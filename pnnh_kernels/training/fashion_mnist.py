"""Fashion-MNIST (Xiao et al. 2017: 70,000 real 28 x 28 grayscale images of clothing, 10 classes)
from its four IDX files, gzipped or not, offline.

Where the files are looked for: ``--data-dir`` if given, else the folder Debian's package
``dataset-fashion-mnist`` installs them in (``/usr/share/datasets/fashion-mnist``). A missing,
truncated or foreign file is an error naming the path and what was expected, with the install hint;
nothing is downloaded.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
    "Ankle boot",
)  # fmt: skip
SIZE = 28
TRAIN_IMAGES, TEST_IMAGES = 60_000, 10_000
# Debian's package (apt-get install dataset-fashion-mnist) installs the four gzipped files here.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = (
    "install Debian's package dataset-fashion-mnist (apt-get install dataset-fashion-mnist, as "
    f"root: it puts them in {DEBIAN_DIR}) or put the four files train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (from "
    "github.com/zalandoresearch/fashion-mnist) in a folder and pass it as --data-dir"
)
_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801  # unsigned bytes, 3 and 1 dimensions


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"--data-dir: no Fashion-MNIST file {stem}(.gz) in {root}; {INSTALL_HINT}")


def check_files(data_dir: Optional[Path]) -> None:
    """The four files are where they are looked for (not read): FileNotFoundError naming the first
    missing one, with the install hint."""
    root = data_root(data_dir)
    for stems in _FILES.values():
        for stem in stems:
            _find(root, stem)


def data_root(data_dir: Optional[Path]) -> Path:
    """The folder to read: ``data_dir`` when given, else Debian's."""
    return Path(data_dir) if data_dir is not None else DEBIAN_DIR


def read_idx(path: Path, magic: int, dimensions: int) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped when its name ends in .gz) as an array; ValueError
    naming ``path`` for a foreign, truncated or over-long file."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError
        raise ValueError(f"--data-dir: cannot read {path} ({error}); {INSTALL_HINT}") from error
    header = 4 + 4 * dimensions
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise ValueError(
            f"--data-dir: {path} is not an IDX file of {dimensions}-dimensional unsigned bytes "
            f"(expected magic {magic:#010x}, found {found if found is None else hex(found)})"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dimensions))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(
            f"--data-dir: {path} holds {len(raw):,} bytes, its header {shape} says {expected:,}: "
            f"{'truncated' if len(raw) < expected else 'trailing bytes'}; {INSTALL_HINT}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


class Split(NamedTuple):
    """One split in memory (the fields of pnnh_kernels.training.data.ImageTensors)."""

    images: Tensor  # uint8 [N, 1, 28, 28]
    labels: Tensor  # int64 [N]
    classes: tuple[str, ...]


def load_fashion_mnist(data_dir: Optional[Path], train: bool) -> Split:
    """The training (60,000) or test (10,000) split: uint8 images [N, 1, 28, 28], int64 labels."""
    root = data_root(data_dir)
    images_path, labels_path = (_find(root, stem) for stem in _FILES[train])
    images = read_idx(images_path, _IMAGES_MAGIC, 3)
    labels = read_idx(labels_path, _LABELS_MAGIC, 1)
    if images.shape[1:] != (SIZE, SIZE):
        raise ValueError(f"--data-dir: {images_path} holds {images.shape[1:]} images, expected 28 x 28")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"--data-dir: {images_path} holds {images.shape[0]:,} images but {labels_path} "
            f"{labels.shape[0]:,} labels"
        )
    if labels.size and labels.max() >= len(CLASSES):
        raise ValueError(f"--data-dir: {labels_path} has labels >= {len(CLASSES)}")
    return Split(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        CLASSES,
    )
