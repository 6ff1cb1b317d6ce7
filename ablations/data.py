"""Data sets: Fashion-MNIST (idx .gz), CIFAR-10/100 (torchvision format), image folders, synthetic.

In-memory data sets are returned as uint8 tensors [N, C, H, W] + int64 labels and batched by TensorLoader;
image folders go through torchvision's ImageFolder, timm's transforms and a DataLoader whose workers hand over
uint8 batches (timm's prefetcher convention), normalised and erased on the training device.
"""

from __future__ import annotations

import gzip
import logging
import os
import random
import struct
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from ablations.augment import BatchAugment, eval_transform, fix_timm_posterize, normalize, parse_randaug
from ablations.decode import EncodedFolder, collate_encoded, decode_batch, eval_crop_pct, unpack_files
from ablations.dist import ignore_stop_signals
from models import ConfigError
from models.layers import choice

log = logging.getLogger("roadmap")

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


# ---------------------------------------------------------------------------------------------- class subsets
def check_classes(cfg) -> list | None:
    """data.classes as a plain list, checked for what needs no files: not empty, no class twice; label numbers of the
    in-memory data sets (and integer indices of image folders) must be whole numbers, those in range(data.num_classes)
    for in-memory data sets. None when every class is kept."""
    classes = cfg.get("classes")
    if classes is None:
        return None
    classes = list(classes)
    if not classes:
        raise ConfigError("data.classes=[] keeps no class; list the classes to keep, or null for all of them")
    twice = sorted({str(c) for c in classes if classes.count(c) > 1})
    if twice:
        raise ConfigError(
            f"data.classes={classes} lists {', '.join(twice)} more than once; each class may appear once (its "
            "position is its new label 0..k-1)"
        )
    if cfg.name == "imagefolder":
        return classes
    bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < cfg.num_classes]
    if bad:
        raise ConfigError(
            f"data.classes={classes}: {', '.join(map(repr, bad))} not a class of data={cfg.name}, whose classes are "
            f"the label numbers 0..{cfg.num_classes - 1}"
        )
    return classes


def keep_classes(data: TensorData, classes: list[int]) -> TensorData:
    """Only the images of `classes`, relabelled by their position in it (classes[i] -> i)."""
    lut = torch.full((int(max(int(data.labels.max()), *classes)) + 1,), -1, dtype=torch.int64)
    lut[torch.tensor(classes)] = torch.arange(len(classes))
    new = lut[data.labels]
    keep = new >= 0
    return TensorData(data.images[keep], new[keep])


def folder_classes(cfg) -> list[str] | None:
    """data.classes of an image folder as class-folder names (an integer is an index into train/'s sorted folders,
    torchvision's class order); a name or index that train/ does not have is a ConfigError listing the valid ones."""
    classes = check_classes(cfg)
    if classes is None:
        return None
    folder = os.path.join(cfg.root, "train")
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir()) if os.path.isdir(folder) else []
    out, bad = [], []
    for c in classes:
        index = isinstance(c, int) and not isinstance(c, bool)
        name = (names[c] if 0 <= c < len(names) else None) if index else (str(c) if str(c) in names else None)
        if name is None:
            bad.append(c)
        else:
            out.append(name)
    if bad:
        shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        raise ConfigError(
            f"data.classes={classes}: {', '.join(map(repr, bad))} not a class of {folder}, whose classes are its "
            f"folders (or their indices 0..{len(names) - 1}): {shown or 'none found'}"
        )
    if len(set(out)) < len(out):
        raise ConfigError(f"data.classes={classes} names one class folder twice ({out}); each class may appear once")
    return out


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
    classes = check_classes(cfg)
    if classes is not None:  # before the subset: train_subset counts images of the kept classes
        data = keep_classes(data, classes)
    idx = subset_indices(cfg, split, len(data))
    if idx is not None:
        data = TensorData(data.images[idx], data.labels[idx])
    if len(data) == 0:
        raise ConfigError(f"data={name} split {split!r} is empty (data.root={cfg.root!r})")
    return data


# ---------------------------------------------------------------------------------------------- random streams
# Every random stream is derived from a key of small integers with numpy's SeedSequence, so no two keys share a
# stream (seed*1000 + epoch*10 + rank made seed s at epoch e+100 equal seed s+1 at epoch e). The first key entry
# names the purpose.
ORDER, AUGMENT, SAMPLE, LOADER = 0, 1, 2, 3


def derive_seed(*key: int) -> int:
    """A 63-bit seed for the stream named by `key` (e.g. (seed, AUGMENT, epoch, step, rank))."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_host(seed: int) -> None:
    """Seed python, numpy and torch's CPU generator from one derived seed: all a DataLoader worker draws from.
    torch.manual_seed seeds every accelerator's generators too, ~0.15 ms a call on a CUDA build, which per sample
    is a few percent of a worker's time; the CPU stream it gives is this one."""
    random.seed(seed)
    np.random.seed(np.random.SeedSequence(seed).generate_state(4))
    torch.default_generator.manual_seed(seed)


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from one derived seed."""
    seed_host(seed)
    torch.manual_seed(seed)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's sample order for `epoch`: one permutation from (seed, epoch), rank r taking every world-th index
    (so the ranks' first batches together are the single-process first batch); the tail that does not divide by
    world is dropped."""
    g = torch.Generator().manual_seed(derive_seed(seed, ORDER, epoch))
    idx = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    return idx[: n - n % world][rank::world] if world > 1 else idx


def shard_size(n: int, world: int) -> int:
    """len(epoch_order(n, ..., world=world)) without drawing the permutation."""
    return (n - n % world) // world


class TensorLoader:
    """Batches of an in-memory split on `device` in epoch_order; `start` skips batches (mid-epoch resume)."""

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
        self.rank, self.world, self.seed, self.epoch, self.start = rank, world, seed, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Choose the epoch whose order the next iteration uses, and the batch it starts at."""
        self.epoch, self.start = epoch, start

    def _indices(self) -> torch.Tensor:
        return epoch_order(len(self.labels), self.seed, self.epoch, self.shuffle, self.rank, self.world)

    def __len__(self):
        n = shard_size(len(self.labels), self.world)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        idx = self._indices().to(self.images.device)
        for i in range(self.start, len(self)):
            b = idx[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.images[b], self.labels[b]


class EpochSampler(torch.utils.data.Sampler):
    """Image-folder training order: epoch_order, each sample paired with its own augmentation seed.

    The seed comes from (seed, epoch, sample index), so a sample's crop, RandAugment and erasing are the same
    whichever DataLoader worker or rank decodes it and wherever a resumed epoch starts.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world, self.epoch, self.start = n, seed, rank, world, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Choose the epoch and the first sample (mid-epoch resume)."""
        self.epoch, self.start = epoch, start

    def __len__(self):
        return shard_size(self.n, self.world) - self.start

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch, True, self.rank, self.world)[self.start :]
        for i in order.tolist():
            yield i, derive_seed(self.seed, SAMPLE, self.epoch, i)


class SeededSamples(torch.utils.data.Dataset):
    """Reads (index, seed) keys from EpochSampler: seeds the worker's RNGs, then returns dataset[index]."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        seed_host(seed)
        return self.dataset[index]


DECODES = ("pil", "device")  # data.decode: where image-folder JPEGs are decoded and cropped (ablations/decode.py)


def image_folder(cfg, split: str, train_cfg=None, cuda: bool = False):
    """torchvision ImageFolder for root/<split>/<class>/*.

    data.decode=pil: timm's train or eval transform in the workers, ending in uint8 CHW tensors (timm's
    `use_prefetcher` convention): normalisation and random erasing run on the training device, so workers decode and
    crop only and a batch crosses shared memory as uint8, a quarter of float32. data.decode=device: the workers hand
    over each file's bytes and its crop box (ablations.decode.EncodedFolder), decoded on the device (`cuda`: the
    device is a GPU, whose decoder leaves some JPEG colour modes to the host).
    """
    from torchvision.datasets import ImageFolder

    folder = os.path.join(cfg.root, "train" if split == "train" else "val")
    if not os.path.isdir(folder):
        raise ConfigError(
            f"image folder {folder!r} does not exist: data.root must hold train/<class>/ and "
            "val/<class>/ (the ImageNet / Imagenette layout)"
        )
    decode = cfg.get("decode", "pil")
    choice("data.decode", decode, DECODES)
    train = train_cfg is not None and split == "train"
    if train:
        parse_randaug(train_cfg.randaug)  # a malformed string: a clear error here, not timm's bare assert
    tf = None if decode == "device" else _pil_transform(cfg, train_cfg if train else None)  # device: bytes only
    classes = folder_classes(cfg)

    class Selected(ImageFolder):
        """ImageFolder over data.classes only, labelled by their position there (all class folders when null)."""

        def find_classes(self, directory):
            found, index = super().find_classes(directory)
            if classes is None:
                return found, index
            missing = [c for c in classes if c not in index]
            if missing:
                raise ConfigError(
                    f"data.classes: {', '.join(missing)} not a class folder of {directory} (train/ has them); "
                    "every kept class needs a folder in train/ and val/"
                )
            return list(classes), {c: i for i, c in enumerate(classes)}

    try:
        ds = Selected(folder, transform=tf)  # its PIL loader converts grey and RGBA images to RGB
    except FileNotFoundError as e:
        raise ConfigError(
            f"image folder {folder!r} has no usable class folders ({e}); expected {folder}/<class>/<image>.jpg"
        ) from None
    if decode == "device":
        hflip = train_cfg.hflip if train_cfg is not None else 0.0
        ds = EncodedFolder(ds, train=train, hflip=hflip, cuda=cuda)
    idx = subset_indices(cfg, split, len(ds))
    return ds if idx is None else torch.utils.data.Subset(ds, idx.tolist())


def _pil_transform(cfg, train_cfg=None):
    """data.decode=pil's per-sample transform, uint8 CHW out: timm's train transform with the run's RandAugment and
    flips (train_cfg given), else its eval transform at the evaluation resolution."""
    from timm.data import create_transform

    if train_cfg is not None:
        tf = create_transform(
            cfg.img_size,
            is_training=True,
            auto_augment=train_cfg.randaug or None,
            color_jitter=None,  # timm jitters colours unless RandAugment is on; neither recipe of the paper does
            hflip=train_cfg.hflip,
            mean=tuple(cfg.mean),  # RandAugment's fill colour
            interpolation="bicubic",
            use_prefetcher=True,  # uint8 out; random erasing (train.reprob) is BatchAugment's, on the device
        )
        fix_timm_posterize(tf)  # timm's PosterizeIncreasing can ask Pillow >= 10 for 0 bits, which raises
        return tf
    size = eval_resolution(cfg)
    return create_transform(
        size,
        is_training=False,
        crop_pct=eval_crop_pct(size),
        interpolation="bicubic",
        use_prefetcher=True,  # uint8 out, normalised on the device
    )


def subset_indices(cfg, split: str, total: int) -> torch.Tensor | None:
    """data.train_subset / test_subset of a split's `total` indices: a fixed random choice (the same for every run
    and seed; image folders list their images class by class, so the first n would drop classes), in their original
    order; None keeps everything."""
    n = cfg.train_subset if split == "train" else cfg.test_subset
    if not n or n >= total:
        return None
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n].sort().values


# ---------------------------------------------------------------------------------------------- resolution
def res_schedule(cfg):
    """data.res_schedule when it is on (start set; end null means start), else None (also for configs from before
    it existed)."""
    s = cfg.get("res_schedule")
    if s is None or s.get("start") is None:
        return None
    from ablations.config import ResSchedule  # its defaults for keys a hand-made config leaves out

    d = ResSchedule()
    end = s.start if s.get("end") is None else s.end
    return SimpleNamespace(
        start=s.start, end=end, ramp=list(s.get("ramp", d.ramp)), multiple=s.get("multiple", d.multiple)
    )


def train_resolution(cfg, epoch: int) -> int:
    """The training resolution of `epoch` (1-based): data.img_size, or data.res_schedule's, as FFCV's
    get_resolution: `start` up to ramp[0] epochs done, `end` from ramp[1], between them np.interp rounded to a
    multiple of `multiple`."""
    s = res_schedule(cfg)
    if s is None:
        return int(cfg.img_size)
    done = epoch - 1
    if done <= s.ramp[0]:
        return int(s.start)
    if done >= s.ramp[1]:
        return int(s.end)
    res = np.interp(done, [s.ramp[0], s.ramp[1]], [s.start, s.end])
    return int(np.round(res / s.multiple)) * int(s.multiple)


def eval_resolution(cfg) -> int:
    """data.eval_img_size, or data.img_size when null."""
    return int(cfg.get("eval_img_size") or cfg.img_size)


def check_resolutions(cfg, min_size: int) -> None:
    """data.res_schedule / eval_img_size checked: one ConfigError paragraph for a value the run cannot use."""
    s, ev = res_schedule(cfg), cfg.get("eval_img_size")
    if ev is not None and ev < min_size:
        raise ConfigError(f"data.eval_img_size={ev} is below the smallest input this model takes ({min_size} px)")
    if s is None:
        return
    ramp = list(s.ramp)
    if len(ramp) != 2 or ramp[0] > ramp[1] or ramp[0] < 0:
        raise ConfigError(
            f"data.res_schedule.ramp={ramp} must be two epochs [from, to] with 0 <= from <= to (the training "
            "resolution rises from res_schedule.start to res_schedule.end between them)"
        )
    if s.multiple < 1:
        raise ConfigError(f"data.res_schedule.multiple={s.multiple} must be a positive number of pixels")
    if min(s.start, s.end) < min_size:
        raise ConfigError(
            f"data.res_schedule goes down to {min(s.start, s.end)} px (start={s.start}, end={s.end}), below the "
            f"smallest input this model takes ({min_size} px)"
        )
    if not cfg.in_memory and cfg.get("decode", "pil") != "device":
        raise ConfigError(
            "data.res_schedule needs the resolution to change between epochs, which image folders do with "
            "data.decode=device (the crop is resized on the device); data.decode=pil fixes it in the workers' "
            "transforms. Set data.decode=device, or data.res_schedule=null"
        )


# ---------------------------------------------------------------------------------------------- the run's feed
def loader_workers(cfg) -> int:
    """DataLoader workers per training process: data.workers, or this process's share of the cores minus the one
    the training process itself runs on (dist.setup set torch's threads to that share), at least one."""
    if cfg.workers is not None:
        if cfg.workers < 0:
            raise ConfigError(f"data.workers must be >= 0 (0: load in the training process), got {cfg.workers}")
        return int(cfg.workers)
    return max(1, torch.get_num_threads() - 1)


class Data:
    """A run's train and test feeds as device batches (images normalised, targets soft under Mixup/CutMix, in the
    run's memory format).

    In-memory data sets are batched by TensorLoader and augmented on the device (BatchAugment); image folders are
    decoded, cropped and RandAugmented per sample by DataLoader workers (timm's transforms, uint8 out), then
    normalised, erased and Mixed/CutMixed on the device (BatchAugment.finish, as timm's prefetch loader). The
    augmenter is built for the class count actually found (an image folder's class folders), not the configured
    one. Evaluation is sharded over ranks; `evaluate` sums the counts.
    """

    def __init__(self, cfg, device, rank: int, world: int, micro_batch: int):
        d, t = cfg.data, cfg.train
        self.cfg, self.device = d, device
        self.memory_format = torch.channels_last if cfg.get("channels_last") else torch.contiguous_format
        self.decode_on_device = not d.in_memory and d.get("decode", "pil") == "device"
        self.train_size, self.eval_size = train_resolution(d, 1), eval_resolution(d)
        if (t.mixup > 0 or t.cutmix > 0) and micro_batch % 2:
            raise ConfigError(
                f"Mixup/CutMix need an even per-process batch, got {micro_batch} (train.batch_size / "
                "(processes x train.grad_accum)); pick a batch size that gives an even micro-batch"
            )
        if d.in_memory:
            self._tensors(cfg, micro_batch, rank, world)
        else:
            self._folders(cfg, micro_batch, rank, world)
        if len(self.train) == 0:
            n = (
                shard_size(len(self.train.labels), world)
                if isinstance(self.train, TensorLoader)
                else len(self.train.sampler)
            )
            raise ConfigError(
                f"the training set has fewer images per process ({n}) than one batch ({micro_batch}); "
                "lower train.batch_size or use more data"
            )
        self.augment = BatchAugment(
            self.train_size,
            d.mean,
            d.std,
            self.num_classes,
            hflip=t.hflip,
            translate=t.translate,
            randaug=t.randaug,
            mixup=t.mixup,
            cutmix=t.cutmix,
            switch_prob=t.mixup_switch_prob,
            label_smoothing=t.label_smoothing,
            reprob=t.reprob,
            device=device,
        )

    def _tensors(self, cfg, micro_batch, rank, world):
        d = cfg.data
        train = load_tensors(d, "train", cfg.seed)
        test = load_tensors(d, "test", cfg.seed)
        top = int(max(train.labels.max(), test.labels.max()))
        classes = check_classes(d)
        if classes is None and top >= d.num_classes:
            raise ConfigError(f"data={d.name} has label {top} but data.num_classes={d.num_classes}")
        self.num_classes = d.num_classes if classes is None else len(classes)
        self.train = TensorLoader(train, micro_batch, self.device, True, True, rank, world, cfg.seed)
        shard = TensorData(test.images[rank::world], test.labels[rank::world]) if world > 1 else test
        self.test = TensorLoader(shard, 256, self.device, False, False)
        self.test_size = len(test)

    def _folders(self, cfg, micro_batch, rank, world):
        from timm.data.loader import fast_collate

        d = cfg.data
        cuda = self.device.type == "cuda"
        train_ds, test_ds = image_folder(d, "train", cfg.train, cuda), image_folder(d, "val", cuda=cuda)
        base = train_ds.dataset if isinstance(train_ds, torch.utils.data.Subset) else train_ds
        self.num_classes = len(base.classes)
        if self.num_classes != d.num_classes and d.get("classes") is None:
            log.info(
                "data: %d class folders found; using num_classes=%d (config said %d)",
                self.num_classes,
                self.num_classes,
                d.num_classes,
            )
        workers = loader_workers(d)
        loader = dict(
            num_workers=workers,
            # its own generator: an iterator draws its workers' base seed when it starts, which on the global RNG
            # would shift the step's augmentation stream at the first step of each process (so a resumed run's
            # first step augmented differently); the samples are seeded one by one anyway (SeededSamples)
            generator=torch.Generator().manual_seed(derive_seed(cfg.seed, LOADER, rank)),
            pin_memory=cuda,
            collate_fn=collate_encoded if self.decode_on_device else fast_collate,  # file bytes | uint8 batches
            worker_init_fn=ignore_stop_signals,  # a preemption signal reaches the trainer, not dead workers
        )
        self.train = torch.utils.data.DataLoader(
            SeededSamples(train_ds),
            micro_batch,
            sampler=EpochSampler(len(train_ds), cfg.seed, rank, world),
            drop_last=True,
            persistent_workers=workers > 0,
            **loader,
        )
        self.test_size = len(test_ds)
        shard = torch.utils.data.Subset(test_ds, range(rank, len(test_ds), world)) if world > 1 else test_ds
        self.test = torch.utils.data.DataLoader(shard, 256, **loader)

    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch and process (the drop-last count)."""
        self.set_epoch(1, 0)
        return len(self.train)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Order and training resolution of `epoch`, starting at micro-batch `start_batch` (mid-epoch resume)."""
        self.train_size = self.augment.img_size = train_resolution(self.cfg, epoch)
        if isinstance(self.train, TensorLoader):
            self.train.set_epoch(epoch, start_batch)
        else:
            self.train.sampler.set_epoch(epoch, start_batch * self.train.batch_size)

    def _on_device(self, batch, size: int, train: bool):
        """A loader batch's (images, labels) on the device: decoded, cropped and resized there to `size` from the
        workers' file bytes and crop boxes (data.decode=device, float 0-255), else moved as the workers made them."""
        if self.decode_on_device:
            data, lengths, boxes, y = batch
            x = decode_batch(unpack_files(data, lengths), boxes, self.device, size, train=train)
            return x, y.to(self.device, non_blocking=True)
        return tuple(t.to(self.device, non_blocking=True) for t in batch)

    def train_batches(self):
        """Augmented training batches on the device, in the order set by set_epoch."""
        for batch in self.train:
            x, y = self._on_device(batch, self.train_size, train=True)
            if self.decode_on_device:  # RandAugmented here
                x, y = self.augment.decoded(x, y)
            elif self.cfg.in_memory:
                x, y = self.augment(x, y)
            else:  # cropped and RandAugmented by the workers
                x, y = self.augment.finish(x.float().div_(255), y)
            yield x.contiguous(memory_format=self.memory_format), y

    def test_batches(self):
        """This rank's shard of the test split, normalised, on the device."""
        for batch in self.test:
            x, y = self._on_device(batch, self.eval_size, train=False)
            if self.decode_on_device:  # already at the evaluation size
                x = normalize(x.div_(255), self.augment.mean, self.augment.std)
            else:
                x = eval_transform(x, self.eval_size, self.augment.mean, self.augment.std)
            yield x.contiguous(memory_format=self.memory_format), y
