"""Data sets: Fashion-MNIST (idx .gz), CIFAR-10/100 (torchvision format), image folders, synthetic.

In-memory data sets are returned as uint8 tensors [N, C, H, W] + int64 labels and batched by TensorLoader;
image folders go through torchvision's ImageFolder, timm's transforms and a DataLoader.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

from models import ConfigError
from models.layers import choice

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class TensorData:
    """A whole split in memory: images uint8 [N, C, H, W], labels int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self):
        return len(self.labels)


def _read_idx(path: str) -> np.ndarray:
    """Read an idx file (optionally .gz): the MNIST family's format."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    _, dtype, ndim = data[0:2], data[2], data[3]
    if dtype != 0x08:
        raise ConfigError(f"{path} is not a uint8 idx file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(root: str, stem: str) -> str | None:
    for folder in (root, os.path.join(root, "raw"), os.path.join(root, "FashionMNIST", "raw")):
        for name in (stem + ".gz", stem):
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    return None


def load_fashion_mnist(root: str, split: str, download: bool = False) -> TensorData:
    """Fashion-MNIST from idx files under root (Debian's layout or torchvision's FashionMNIST/raw)."""
    paths = [_find_idx(root, s) for s in FMNIST_FILES[split]]
    if None in paths and download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(root, train=split == "train", download=True)
        paths = [_find_idx(root, s) for s in FMNIST_FILES[split]]
    if None in paths:
        raise ConfigError(
            f"Fashion-MNIST not found in data.root={root!r} (looked for {', '.join(FMNIST_FILES[split])}[.gz] there, "
            "in raw/ and in FashionMNIST/raw/). Install Debian's dataset-fashion-mnist (`make data`), point data.root "
            "at a folder with the idx files, or set data.download=true on a machine with internet."
        )
    x, y = (_read_idx(p) for p in paths)
    return TensorData(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))


CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


def load_cifar(name: str, root: str, split: str, download: bool = False) -> TensorData:
    """CIFAR-10/100 from the python pickle batches under root/cifar-10-batches-py (or cifar-100-python)."""
    import pickle

    folder_name, train_files, test_files, label_key = CIFAR_FILES[name]
    folder = os.path.join(root, folder_name)
    files = [os.path.join(folder, f) for f in (train_files if split == "train" else test_files)]
    if not all(map(os.path.isfile, files)) and download:
        from torchvision.datasets import CIFAR10, CIFAR100

        (CIFAR10 if name == "cifar10" else CIFAR100)(root, train=split == "train", download=True)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise ConfigError(
            f"{name} not found: data.root={root!r} must contain {folder_name}/ as torchvision writes "
            f"it (missing {', '.join(map(os.path.basename, missing))}); or set data.download=true "
            "on a machine with internet."
        )
    xs, ys = [], []
    for f in files:
        with open(f, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        xs.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32))
        ys.extend(batch[label_key])
    return TensorData(torch.from_numpy(np.concatenate(xs)), torch.tensor(ys, dtype=torch.int64))


def load_synthetic(split: str, n: int, num_classes: int, img_size: int, seed: int = 0) -> TensorData:
    """Random RGB images with random labels (deterministic per split and seed)."""
    g = torch.Generator().manual_seed(seed * 2 + (split == "test"))
    x = torch.randint(0, 256, (n, 3, img_size, img_size), dtype=torch.uint8, generator=g)
    return TensorData(x, torch.randint(0, num_classes, (n,), generator=g))


def load_tensors(cfg, split: str, seed: int = 0) -> TensorData:
    """An in-memory split for data.name in fashion_mnist / cifar10 / cifar100 / synthetic."""
    name = cfg.name
    choice("data", name, DATASETS)
    if name == "fashion_mnist":
        data = load_fashion_mnist(cfg.root, split, cfg.download)
    elif name in ("cifar10", "cifar100"):
        data = load_cifar(name, cfg.root, split, cfg.download)
    elif name == "synthetic":
        data = load_synthetic(split, cfg.synthetic_size, cfg.num_classes, cfg.img_size, seed)
    else:
        raise ConfigError("data=imagefolder is read from disk by a DataLoader (set data.in_memory=false)")
    idx = subset_indices(cfg, split, len(data))
    if idx is not None:
        data = TensorData(data.images[idx], data.labels[idx])
    if len(data) == 0:
        raise ConfigError(f"data={name} split {split!r} is empty (data.root={cfg.root!r})")
    return data


class TensorLoader:
    """Batches of an in-memory split on `device`, reshuffled per epoch from (seed, epoch), sharded over ranks."""

    def __init__(
        self,
        data: TensorData,
        batch_size: int,
        device,
        shuffle: bool,
        drop_last: bool,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
    ):
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose permutation the next iteration uses (deterministic on resume)."""
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        idx = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        # rank r takes every world-th index, so the ranks' first batches together are the global first batch
        return idx[: n - n % self.world][self.rank :: self.world] if self.world > 1 else idx

    def __len__(self):
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        idx = self._indices().to(self.images.device)
        for i in range(len(self)):
            b = idx[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.images[b], self.labels[b]


def image_folder(cfg, split: str, train_cfg=None):
    """torchvision ImageFolder for root/<split>/<class>/* with timm's train or eval transform."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    folder = os.path.join(cfg.root, "train" if split == "train" else "val")
    if not os.path.isdir(folder):
        raise ConfigError(
            f"image folder {folder!r} does not exist: data.root must hold train/<class>/ and "
            "val/<class>/ (the ImageNet / Imagenette layout)"
        )
    if train_cfg is not None and split == "train":
        tf = create_transform(
            cfg.img_size,
            is_training=True,
            auto_augment=train_cfg.randaug or None,
            re_prob=train_cfg.reprob,
            hflip=train_cfg.hflip,
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
            interpolation="bicubic",
        )
    else:
        tf = create_transform(
            cfg.img_size,
            is_training=False,
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
            crop_pct=0.875 if cfg.img_size >= 160 else 1.0,
            interpolation="bicubic",
        )
    try:
        ds = ImageFolder(folder, transform=tf)  # its PIL loader converts grey and RGBA images to RGB
    except FileNotFoundError as e:
        raise ConfigError(
            f"image folder {folder!r} has no usable class folders ({e}); expected {folder}/<class>/<image>.jpg"
        ) from None
    idx = subset_indices(cfg, split, len(ds))
    return ds if idx is None else torch.utils.data.Subset(ds, idx.tolist())


def subset_indices(cfg, split: str, total: int) -> torch.Tensor | None:
    """data.train_subset / test_subset of a split's `total` indices: a fixed random choice (the same for every run
    and seed; image folders list their images class by class, so the first n would drop classes), in their original
    order; None keeps everything."""
    n = cfg.train_subset if split == "train" else cfg.test_subset
    if not n or n >= total:
        return None
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n].sort().values
