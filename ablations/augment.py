"""Batched augmentation on device tensors for data sets that fit in memory (the fast path: no DataLoader).

Crop/flip/resize is one affine grid_sample per batch; RandAugment is torchvision's tensor implementation applied
per chunk of images; Mixup/CutMix and random erasing are timm's own batch implementations.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import v2

from models import ConfigError


def parse_randaug(spec: str | None) -> tuple[int, int] | None:
    """(num_ops, magnitude) from a timm RandAugment string such as 'rand-m9-mstd0.5-inc1' (n defaults to 2)."""
    if not spec:
        return None
    if not spec.startswith("rand"):
        raise ConfigError(f"train.randaug must be a timm RandAugment string like 'rand-m9-mstd0.5-inc1', got {spec!r}")
    m = re.search(r"-m(\d+)", spec)
    n = re.search(r"-n(\d+)", spec)
    return (int(n[1]) if n else 2), (int(m[1]) if m else 9)


class BatchAugment:
    """Train-time augmentation of a uint8 batch [B, C, h, w] into a normalised float batch [B, 3, S, S] + targets."""

    def __init__(
        self,
        img_size: int,
        mean,
        std,
        num_classes: int,
        *,
        hflip: float = 0.5,
        translate: float = 0.125,
        randaug: str | None = None,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
        reprob: float = 0.0,
        chunk: int = 16,
        device="cpu",
    ):
        self.img_size, self.hflip, self.translate, self.chunk = img_size, hflip, translate, chunk
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        ra = parse_randaug(randaug)
        self.randaug = v2.RandAugment(num_ops=ra[0], magnitude=ra[1]) if ra else None
        self.mixup = (
            Mixup(
                mixup_alpha=mixup,
                cutmix_alpha=cutmix,
                switch_prob=switch_prob,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
            if mixup > 0 or cutmix > 0
            else None
        )
        self.erase = RandomErasing(reprob, mode="pixel", device=str(device)) if reprob > 0 else None

    def geometry(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random translation (zero fill) and horizontal flip, resized to img_size, in one grid_sample."""
        b = x.shape[0]
        theta = torch.zeros(b, 2, 3, device=x.device)
        flip = torch.rand(b, generator=generator, device="cpu") < self.hflip
        theta[:, 0, 0] = torch.where(flip, -1.0, 1.0).to(x.device)
        theta[:, 1, 1] = 1.0
        shift = (torch.rand(b, 2, generator=generator, device="cpu") * 2 - 1) * 2 * self.translate
        theta[:, :, 2] = shift.to(x.device)
        grid = F.affine_grid(theta, [b, x.shape[1], self.img_size, self.img_size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None):
        """Augment one batch; returns (images, targets): targets are soft (B, classes) when Mixup/CutMix is on."""
        if self.randaug is not None:
            x = torch.cat([self.randaug(c) for c in x.split(self.chunk)])  # ops shared within a chunk
        x = self.geometry(x.float().div_(255), generator)
        x = normalize(x, self.mean, self.std)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        if self.erase is not None:
            x = self.erase(x)
        return x, y


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std, grey images repeated to 3 channels first (the stem takes RGB)."""
    if x.shape[1] == 1 and mean.shape[1] == 3:
        x = x.expand(-1, 3, -1, -1)
    return (x - mean) / std


def eval_transform(x: torch.Tensor, img_size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 batch -> normalised float batch at img_size (no augmentation)."""
    x = x.float().div_(255)
    if x.shape[-1] != img_size or x.shape[-2] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
    return normalize(x, mean, std)
