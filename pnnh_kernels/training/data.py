"""Data for ``pnnh train``: CIFAR-10/100 from the official python batches, ImageNet-style class
folders, and a learnable synthetic set for smoke runs.

Every source yields uint8 image batches [B, 3, H, W] and int64 labels; the trainer converts and
normalises on the device. In-memory sources (CIFAR, synthetic) are augmented on the device a whole
batch at a time, which keeps a GPU fed without worker processes; folders decode with PIL in
DataLoader workers. Data order comes from DistributedSampler(seed, epoch) and the augmentation from
a generator seeded per epoch and rank, so a resumed run sees exactly the batches an uninterrupted one
would have seen.
"""

from __future__ import annotations

import math
import pickle
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pnnh_kernels.training.fashion_mnist import load_fashion_mnist

DATASETS = ("cifar10", "cifar100", "fashion-mnist", "folder", "synthetic")
# Data sets without an ImageNet-style size: their images' size and channels (others: 3 channels).
NATIVE_IMAGES = {"cifar10": (32, 3), "cifar100": (32, 3), "fashion-mnist": (28, 1)}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")

# Per-channel mean and std of the training images, the values used throughout the literature.
NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    "fashion-mnist": ((0.2860,), (0.3530,)),  # grayscale: one channel
}


@dataclass(frozen=True)
class CifarLayout:
    folder: str  # what the official archive extracts to (torchvision's layout)
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    meta_file: str
    names_key: bytes


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
        "batches.meta",
        b"label_names",
    ),
    "cifar100": CifarLayout(
        "cifar-100-python", ("train",), ("test",), b"fine_labels", "meta", b"fine_label_names"
    ),
}


@dataclass(frozen=True)
class ImageTensors:
    """A whole split in memory."""

    images: Tensor  # uint8 [N, C, H, W]: C = 3, or 1 for Fashion-MNIST
    labels: Tensor  # int64 [N]
    classes: tuple[str, ...]


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"--data-dir: expected the CIFAR batch file {path}, which does not exist"
        )
    # The official CIFAR batches are pickles (as torchvision reads them): only open trusted files.
    try:
        with path.open("rb") as file:
            batch = pickle.load(file, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError) as error:  # fmt: skip
        raise ValueError(
            f"--data-dir: {path} ({path.stat().st_size:,} bytes) is not a readable CIFAR batch, "
            f"truncated or corrupt ({type(error).__name__}: {error}); extract the official archive "
            "again"
        ) from error
    if not isinstance(batch, dict):
        raise ValueError(
            f"--data-dir: {path} is not a CIFAR batch: expected a pickled dict, got "
            f"{type(batch).__name__}"
        )
    return batch


def cifar_root(data_dir: Path, name: str) -> Path:
    """The folder holding the batch files: DIR itself or DIR/<archive folder>."""
    layout = CIFAR_LAYOUTS[name]
    for candidate in (data_dir / layout.folder, data_dir):
        if (candidate / layout.train_files[0]).is_file():
            return candidate
    raise FileNotFoundError(
        f"--data-dir: no {name} data in {data_dir}: looked for "
        f"{data_dir / layout.folder / layout.train_files[0]} and {data_dir / layout.train_files[0]} "
        f"(the official 'python version' archive, extracted)"
    )


def load_cifar(data_dir: Path, name: str, train: bool) -> ImageTensors:
    """One split of CIFAR-10 or CIFAR-100 from the official python-pickle batches."""
    if name not in CIFAR_LAYOUTS:
        raise ValueError(f"name: expected one of {tuple(CIFAR_LAYOUTS)}, got {name!r}")
    layout = CIFAR_LAYOUTS[name]
    root = cifar_root(Path(data_dir), name)
    images, labels = [], []
    for file_name in layout.train_files if train else layout.test_files:
        path = root / file_name
        batch = _unpickle(path)
        if b"data" not in batch or layout.label_key not in batch:
            raise ValueError(
                f"{path}: expected keys b'data' and {layout.label_key!r}, got {sorted(batch)}"
            )
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path}: expected data of shape [N, 3072], got {data.shape}")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.tensor(batch[layout.label_key], dtype=torch.long))
    meta = _unpickle(root / layout.meta_file)
    classes = tuple(n.decode() if isinstance(n, bytes) else n for n in meta[layout.names_key])
    label_tensor = torch.cat(labels)
    if label_tensor.numel() and (label_tensor.min() < 0 or label_tensor.max() >= len(classes)):
        raise ValueError(
            f"{root}: labels outside [0, {len(classes)}) for the classes in {layout.meta_file}"
        )
    return ImageTensors(torch.cat(images), label_tensor, classes)


def synthetic(
    count: int, image_size: int = 32, num_classes: int = 10, seed: int = 0, split_seed: int = 0
) -> ImageTensors:
    """A learnable set: each class is a fixed smooth random pattern, each image the pattern of its
    class shifted in brightness plus per-pixel noise. The patterns depend on ``seed`` only, the
    images on ``split_seed`` too, so train and test splits share their classes."""
    patterns_rng = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=patterns_rng)
    patterns = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    rng = torch.Generator().manual_seed(seed * 1_000_003 + split_seed + 1)
    labels = torch.randint(0, num_classes, (count,), generator=rng)
    brightness = 0.15 * torch.randn(count, 1, 1, 1, generator=rng)
    noise = 0.1 * torch.randn(count, 3, image_size, image_size, generator=rng)
    images = (patterns[labels] + brightness + noise).clamp(0, 1).mul(255).round().to(torch.uint8)
    return ImageTensors(images, labels, tuple(f"class_{i}" for i in range(num_classes)))


def random_crop_flip(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Per-image random crop from the zero-padded image and random horizontal flip, batched."""
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(images.device)
    flip = (torch.rand(batch, generator=generator) < 0.5).to(images.device)
    rows = dy[:, None] + torch.arange(height, device=images.device)
    cols = dx[:, None] + torch.arange(width, device=images.device)
    # A flipped image reads its columns right to left.
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return padded[
        torch.arange(batch, device=images.device)[:, None, None, None],
        torch.arange(channels, device=images.device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


class ImageFolder(Dataset):
    """``root/<class>/<image>`` (ImageNet's layout), decoded with PIL to uint8 [3, size, size].

    Training: random resized crop (scale 0.08-1, aspect 3/4-4/3) and horizontal flip, seeded per
    (seed, epoch, index) so that workers and resumed runs agree. Evaluation: resize the shorter side
    to size * 8/7, centre crop.
    """

    def __init__(self, root: Path, image_size: int, train: bool, seed: int = 0) -> None:
        try:
            import PIL  # noqa: F401
        except ImportError as error:  # pragma: no cover - depends on the installation
            raise ImportError(
                "--data folder decodes images with Pillow: pip install 'pnnh-kernels[train]'"
            ) from error
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"--data-dir: expected the image folder {self.root}, which does not exist"
            )
        self.classes = tuple(sorted(p.name for p in self.root.iterdir() if p.is_dir()))
        if not self.classes:
            raise FileNotFoundError(
                f"--data-dir: {self.root} has no class folders (expected {self.root}/<class>/*.png)"
            )
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((self.root / name).iterdir())
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise FileNotFoundError(
                f"--data-dir: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of "
                f"{self.root}"
            )
        self.image_size = image_size
        self.train = train
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError, SyntaxError) as error:  # PIL's unreadable and truncated files
            raise ValueError(
                f"--data-dir: cannot decode the image {path} ({type(error).__name__}: {error})"
            ) from error
        size = self.image_size
        if self.train:
            rng = random.Random(hash((self.seed, self.epoch, index)))
            image = _random_resized_crop(image, size, rng)
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            short = round(size * 8 / 7)
            scale = short / min(image.size)
            image = image.resize(
                (max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                Image.Resampling.BILINEAR,
            )
            left, top = (image.width - size) // 2, (image.height - size) // 2
            image = image.crop((left, top, left + size, top + size))
        array = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1), label


def _random_resized_crop(image, size: int, rng: random.Random):  # PIL.Image in, PIL.Image out
    from PIL import Image

    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            break
    else:  # the whole image's centre square
        w = h = min(width, height)
        left, top = (width - w) // 2, (height - h) // 2
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))


@dataclass
class DataSpec:
    name: str
    data_dir: Optional[Path]
    image_size: int  # folders: the crop size; synthetic: the generated size; CIFAR: 32
    batch_size: int  # per process
    workers: int
    seed: int
    synthetic_train_size: int = 512
    synthetic_test_size: int = 256


class ImageData:
    """Train and test batches for one process of a (possibly distributed) run."""

    def __init__(self, spec: DataSpec, rank: int, world_size: int, device: torch.device) -> None:
        if spec.name not in DATASETS:
            raise ValueError(f"--data: expected one of {DATASETS}, got {spec.name!r}")
        if spec.name not in ("synthetic", "fashion-mnist") and spec.data_dir is None:
            raise ValueError(f"--data-dir: required for --data {spec.name}")
        self.spec, self.rank, self.world_size, self.device = spec, rank, world_size, device
        self.train_tensors: Optional[ImageTensors] = None
        self.test_tensors: Optional[ImageTensors] = None
        self.train_folder: Optional[ImageFolder] = None
        self.test_folder: Optional[ImageFolder] = None
        if spec.name in CIFAR_LAYOUTS:
            assert spec.data_dir is not None
            self.train_tensors = load_cifar(spec.data_dir, spec.name, train=True)
            self.test_tensors = load_cifar(spec.data_dir, spec.name, train=False)
        elif spec.name == "fashion-mnist":  # --data-dir, or where Debian's package puts it
            self.train_tensors = ImageTensors(*load_fashion_mnist(spec.data_dir, train=True))
            self.test_tensors = ImageTensors(*load_fashion_mnist(spec.data_dir, train=False))
        elif spec.name == "synthetic":
            self.train_tensors = synthetic(spec.synthetic_train_size, spec.image_size, split_seed=0)
            self.test_tensors = synthetic(spec.synthetic_test_size, spec.image_size, split_seed=1)
        else:
            assert spec.data_dir is not None
            self.train_folder = ImageFolder(spec.data_dir / "train", spec.image_size, True, spec.seed)
            self.test_folder = ImageFolder(spec.data_dir / "val", spec.image_size, False, spec.seed)
            if self.test_folder.classes != self.train_folder.classes:
                raise ValueError(
                    f"--data-dir: the class folders of {spec.data_dir / 'val'} differ from those of "
                    f"{spec.data_dir / 'train'}"
                )
        train = self.train_tensors or self.train_folder
        assert train is not None
        self.classes: tuple[str, ...] = train.classes
        self.train_size = len(train.labels) if isinstance(train, ImageTensors) else len(train)
        # Every rank takes the same number of full batches so that DDP's collectives line up.
        self.sampler = DistributedSampler(
            range(self.train_size),
            num_replicas=world_size,
            rank=rank,
            shuffle=True,
            seed=spec.seed,
            drop_last=True,
        )
        self.steps_per_epoch = len(self.sampler) // spec.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"--batch-size: {spec.batch_size * world_size} is larger than the {self.train_size} "
                f"training images"
            )
        self._resident: dict[str, Tensor] = {}
        # Built once: normalise() runs every step, and a host-to-device copy there would be per step.
        mean, std = NORMALISATION[spec.name]
        self._normalisation = (
            torch.tensor(mean, device=device).view(1, len(mean), 1, 1),
            torch.tensor(std, device=device).view(1, len(std), 1, 1),
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _on_device(self, key: str, tensor: Tensor) -> Tensor:
        if key not in self._resident:
            self._resident[key] = tensor.to(self.device)
        return self._resident[key]

    def train_batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        self.sampler.set_epoch(epoch)
        indices = torch.tensor(list(self.sampler), dtype=torch.long)
        batch = self.spec.batch_size
        indices = indices[: self.steps_per_epoch * batch]
        if self.train_tensors is not None:
            images = self._on_device("train_images", self.train_tensors.images)
            labels = self._on_device("train_labels", self.train_tensors.labels)
            generator = torch.Generator().manual_seed(
                (self.spec.seed * 1_000_003 + epoch) * 65_537 + self.rank
            )
            padding = max(1, images.shape[-1] // 8)  # 4 pixels at CIFAR's 32
            for first in range(0, len(indices), batch):
                chosen = indices[first : first + batch].to(self.device)
                yield random_crop_flip(images[chosen], padding, generator), labels[chosen]
            return
        assert self.train_folder is not None
        self.train_folder.set_epoch(epoch)
        loader = DataLoader(
            self.train_folder,
            batch_size=batch,
            sampler=indices.tolist(),
            num_workers=self.spec.workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
        )
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def test_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's share of the test set, unpadded (every image is counted exactly once)."""
        batch = self.spec.batch_size
        if self.test_tensors is not None:
            images = self._on_device("test_images", self.test_tensors.images)
            labels = self._on_device("test_labels", self.test_tensors.labels)
            mine = torch.arange(self.rank, len(labels), self.world_size, device=self.device)
            for first in range(0, len(mine), batch):
                chosen = mine[first : first + batch]
                yield images[chosen], labels[chosen]
            return
        assert self.test_folder is not None
        loader = DataLoader(
            self.test_folder,
            batch_size=batch,
            sampler=list(range(self.rank, len(self.test_folder), self.world_size)),
            num_workers=self.spec.workers,
            pin_memory=self.device.type == "cuda",
        )
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def normalise(self, images: Tensor, channels_last: bool) -> Tensor:
        mean, std = self._normalisation
        out = (images.float() / 255 - mean) / std
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out
