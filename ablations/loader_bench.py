"""Image-folder feeds on this machine: `python -m ablations.loader_bench` (issue 24's CPU measurement).

On a folder of JPEGs at ImageNet-like sizes (made here, 500 x 375 and 375 x 500, or --root), with the paper's
training recipe (RandAugment rand-m9-mstd0.5-inc1, flips, erasing 0.25, Mixup 0.8 / CutMix 1.0) at 224 px:

1. worker CPU seconds per image: what one DataLoader worker spends on a sample, in this process (time.process_time
   over --images samples, one thread): the PIL path's (timm's transforms: decode, crop, resize, RandAugment, to
   uint8 tensor) and the device path's (read the file, parse its header, draw the box);
2. images/s of the whole feed, loader plus augmentation until a normalised, mixed batch is ready, with --workers
   workers: this project's PIL path, its device path (decoding on the CPU here), and timm's own `create_loader`
   with the same transforms (its prefetcher on the CPU), interleaved --repeats times, median.

The device path's decode, crop and RandAugment run in the training process, so on a CPU they compete with the
model for the same cores; on a GPU they run on the GPU (docs/data.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RECIPE = dict(randaug="rand-m9-mstd0.5-inc1", hflip=0.5, reprob=0.25, mixup=0.8, cutmix=1.0)


def make_jpeg_folder(root: Path, classes=("a", "b"), per_class: int = 8, val_per_class: int = 2,
                     size: tuple[int, int] = (500, 375), quality: int = 90) -> Path:  # fmt: skip
    """An ImageNet-layout folder of smooth colour JPEGs (gradients, a patch, sensor-like noise), landscape and
    portrait alternating, as photos are: a resize of them behaves like one of real photos, unlike pure noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for k, c in enumerate(classes):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = size if i % 2 == 0 else size[::-1]
                yy, xx = np.mgrid[0:h, 0:w]
                arr = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 128 / (w + h) + 60 * k], -1)
                arr = arr + rng.normal(0, 12, arr.shape)
                arr[h // 3 : h // 2, w // 4 : w // 2] = rng.integers(0, 255, 3)
                img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
                img.save(root / split / c / f"{i}.jpg", quality=quality)
    return root


def _cfg(root: Path, decode: str, batch: int, workers: int):
    """The run config of the measured feed: image folder at 224 px, the paper's recipe."""
    from hydra import compose, initialize_config_dir

    from ablations.config import register

    register()
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    over = [f"train.{k}={v}" for k, v in RECIPE.items()]
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        return compose("config", overrides=["data=imagefolder", f"data.root={root}", "data.img_size=224",
                                             f"data.decode={decode}", f"data.workers={workers}", "profile=gpu",
                                             f"train.batch_size={batch}", "channels_last=false", *over])  # fmt: skip


def worker_seconds(root: Path, n: int) -> dict[str, float]:
    """CPU seconds per sample of one worker, PIL path and device path, on the first n training images (cycled)."""
    from ablations.data import SeededSamples, image_folder

    out = {}
    for decode in ("pil", "device"):
        cfg = _cfg(root, decode, 64, 0)
        ds = SeededSamples(image_folder(cfg.data, "train", cfg.train))
        ds[(0, 0)]  # imports and first-call set-up outside the clock
        t = time.process_time()
        for i in range(n):
            ds[(i % len(ds.dataset), i)]
        out[decode] = (time.process_time() - t) / n
    return out


def _timm_loader(root: Path, batch: int, workers: int):
    """timm's create_loader over the same folder with the same transforms (its prefetcher normalises, erases and
    mixes; Mixup/CutMix through timm's Mixup on the collated batch as its train script does)."""
    from timm.data import Mixup, create_loader
    from torchvision.datasets import ImageFolder

    from ablations.augment import fix_timm_posterize

    ds = ImageFolder(str(root / "train"))
    loader = create_loader(ds, (3, 224, 224), batch, is_training=True, use_prefetcher=True, no_aug=False,
                           re_prob=RECIPE["reprob"], hflip=RECIPE["hflip"], color_jitter=None,
                           auto_augment=RECIPE["randaug"], interpolation="bicubic", num_workers=workers,
                           device=torch.device("cpu"), persistent_workers=True)  # fmt: skip
    fix_timm_posterize(ds.transform)  # as this project's PIL path: Pillow >= 10 refuses timm's 0-bit posterize
    mix = Mixup(mixup_alpha=RECIPE["mixup"], cutmix_alpha=RECIPE["cutmix"], num_classes=len(ds.classes))

    def batches():
        while True:  # epoch after epoch (persistent workers), as a run's loop
            for x, y in loader:
                yield mix(x, y)

    return batches


def _ours(root: Path, decode: str, batch: int, workers: int):
    from ablations.data import Data

    cfg = _cfg(root, decode, batch, workers)
    data = Data(cfg, torch.device("cpu"), 0, 1, batch)

    def batches():
        epoch = 1
        while True:
            data.set_epoch(epoch)
            yield from data.train_batches()
            epoch += 1

    return batches


def feed_rates(root: Path, batch: int, workers: int, batches: int, repeats: int) -> dict[str, list[float]]:
    """Images/s of each feed over `batches` batches, the feeds interleaved `repeats` times. The clock starts after
    as many batches as the workers prefetch (2 each) and one more, so it times the steady state, not the start."""
    feeds = {"timm create_loader (PIL)": _timm_loader(root, batch, workers),
             "ours, data.decode=pil": _ours(root, "pil", batch, workers),
             "ours, data.decode=device": _ours(root, "device", batch, workers)}  # fmt: skip
    rates: dict[str, list[float]] = {k: [] for k in feeds}
    for _ in range(repeats):
        for name, make in feeds.items():
            it = iter(make())
            for _ in range(2 * workers + 1):  # workers started, their prefetched batches drained
                next(it)
            t, n = time.perf_counter(), 0
            for _, (x, _y) in zip(range(batches), it):
                n += x.shape[0]
            rates[name].append(n / (time.perf_counter() - t))
            del it
    return rates


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=None, help="an image folder (train/<class>/*.jpg); default: made here")
    p.add_argument("--images", type=int, default=128, help="training images to make (and to time per worker)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=12, help="timed batches per feed and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--make", type=Path, default=None, help="only make the folder of --images JPEGs there, and stop")
    a = p.parse_args(argv)
    if a.make is not None:  # the GPU check's jpeg_run stage: a folder to train from
        make_jpeg_folder(a.make, per_class=a.images // 2, val_per_class=max(2, a.images // 32))
        print(f"{a.images} training JPEGs in {a.make}")
        return
    torch.set_num_threads(1)  # one core per worker-equivalent: the per-image CPU time is one thread's
    with tempfile.TemporaryDirectory() as tmp:
        root = a.root or make_jpeg_folder(Path(tmp), per_class=a.images // 2)
        sec = worker_seconds(root, min(a.images, 256))
        print(f"worker CPU per image (one thread, {min(a.images, 256)} images of 500x375 / 375x500):")
        for k, v in sec.items():
            print(f"  data.decode={k:7s} {v * 1e3:7.3f} ms  ({1 / v:8.0f} images/s per worker core)")
        print(f"  device path's workers do {sec['device'] / sec['pil']:.1%} of the PIL path's work")
        torch.set_num_threads(2)
        rates = feed_rates(root, a.batch, a.workers, a.batches, a.repeats)
        ref = statistics.median(rates["timm create_loader (PIL)"])
        print(f"\nfeed images/s, batch {a.batch}, {a.workers} workers, 224 px, the paper's recipe, median of "
              f"{a.repeats} interleaved repeats of {a.batches} batches:")  # fmt: skip
        for k, v in rates.items():
            med = statistics.median(v)
            print(f"  {k:28s} {med:7.1f}  ({med / ref:.2f}x timm)  runs: {', '.join(f'{r:.1f}' for r in v)}")


if __name__ == "__main__":
    main()
