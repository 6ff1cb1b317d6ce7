"""The in-memory fast path: batched augmentation on device tensors, and the tensor loader's sharding."""

from __future__ import annotations

import pytest
import torch

from ablations.augment import BatchAugment, eval_transform, parse_randaug
from ablations.data import TensorData, TensorLoader
from ablations.train import seed_all
from models import ConfigError

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def _batch(n=16, c=1, size=28):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g), torch.arange(n) % 10


def _full_aug(**kw):
    return BatchAugment(
        32, MEAN, STD, 10, randaug="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, label_smoothing=0.1, reprob=0.25, **kw
    )


def _run(aug, x, y, seed):
    seed_all(seed)  # torch, numpy (timm's Mixup) and random (timm's RandomErasing), as the trainer does per epoch
    return aug(x.clone(), y.clone())


def test_shapes_and_grey_to_rgb():
    x, y = _batch()
    out, t = _run(_full_aug(), x, y, 0)
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert t.shape == (16, 10)
    ev = eval_transform(x, 32, torch.tensor(MEAN).view(1, -1, 1, 1), torch.tensor(STD).view(1, -1, 1, 1))
    assert ev.shape == (16, 3, 32, 32) and torch.equal(ev[:, 0], ev[:, 2])  # grey repeated to RGB


def test_mixed_labels_sum_to_one():
    x, y = _batch()
    for seed in range(4):  # covers both Mixup and CutMix (switch probability 0.5)
        _, t = _run(_full_aug(), x, y, seed)
        assert torch.allclose(t.sum(1), torch.ones(16), atol=1e-6)
        assert (t >= 0).all() and (t.max(1).values < 1).all()  # smoothed and mixed: never one-hot


def test_deterministic_under_a_seed():
    x, y = _batch()
    a, ta = _run(_full_aug(), x, y, 3)
    b, tb = _run(_full_aug(), x, y, 3)
    c, _ = _run(_full_aug(), x, y, 4)
    assert torch.equal(a, b) and torch.equal(ta, tb) and not torch.equal(a, c)


def test_geometry_identity_and_flip():
    x, _ = _batch(4, 3, 32)
    aug = BatchAugment(32, MEAN, STD, 10, hflip=0.0, translate=0.0)
    xf = x.float() / 255
    assert torch.allclose(aug.geometry(xf), xf, atol=1e-5)  # no shift, no flip: the image itself
    flipped = BatchAugment(32, MEAN, STD, 10, hflip=1.0, translate=0.0).geometry(xf)
    assert torch.allclose(flipped, xf.flip(-1), atol=1e-5)


def test_randaug_string_is_parsed():
    assert parse_randaug("rand-m9-mstd0.5-inc1") == (2, 9) and parse_randaug("rand-n3-m5") == (3, 5)
    assert parse_randaug(None) is None
    with pytest.raises(ConfigError, match="RandAugment string"):
        parse_randaug("autoaug")


def test_loader_shards_cover_the_global_batch():
    data = TensorData(torch.zeros(40, 1, 4, 4, dtype=torch.uint8), torch.arange(40))
    one = TensorLoader(data, 8, "cpu", shuffle=True, drop_last=True, seed=1)
    r0 = TensorLoader(data, 4, "cpu", shuffle=True, drop_last=True, rank=0, world=2, seed=1)
    r1 = TensorLoader(data, 4, "cpu", shuffle=True, drop_last=True, rank=1, world=2, seed=1)
    for loader in (one, r0, r1):
        loader.set_epoch(2)
    (_, y), (_, y0), (_, y1) = next(iter(one)), next(iter(r0)), next(iter(r1))
    assert sorted(y0.tolist() + y1.tolist()) == sorted(y.tolist())
    one.set_epoch(3)
    assert next(iter(one))[1].tolist() != y.tolist()  # a new order each epoch
