"""Batched augmentation on device tensors for data sets that fit in memory (the fast path: no DataLoader).

The order is timm's: per-image augmentation first (crop/flip/resize as one affine grid_sample, then RandAugment),
normalisation, random erasing, and Mixup/CutMix last on the whole batch. RandAugment follows timm's
`rand_augment_transform` (op set, level-to-argument mapping, probability, magnitude noise) with every image
drawing its own ops; Mixup/CutMix and random erasing are timm's own batch implementations. Every random draw of
this module comes from torch's RNG on the batch's device, so a GPU batch is augmented without a host sync.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, _RAND_TRANSFORMS
from timm.data.random_erasing import RandomErasing

from ablations.decode import thread_pool
from models import ConfigError

_LEVEL_DENOM = 10.0  # timm: magnitude M maps to the fraction M / 10 of each op's range
RANDAUG_INTERPOLATION = "bicubic"  # what this project's create_transform (data.image_folder) and ConvNeXt pass
RANDAUG_TRANSLATE_PCT = 0.45  # timm's default for TranslateXRel / TranslateYRel (create_transform keeps it)

_RANDAUG_HELP = (
    "expected 'rand' followed by dash-separated sections: m<int> magnitude (default 10, on timm's 0-10 scale), "
    "n<int> ops per image (default 2), p<float> probability of applying each op (default 0.5), mstd<float> "
    "std of gaussian magnitude noise (>100: uniform in [0, m]), mmax<int> magnitude upper bound (default 10), "
    "inc<0|1> timm's increasing-severity op set; e.g. 'rand-m9-mstd0.5-inc1' (the paper's)"
)


@dataclass(frozen=True)
class RandAugSpec:
    """A parsed timm RandAugment string: the fields `rand_augment_transform` reads from it."""

    magnitude: int = 10
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: int | None = None
    increasing: bool = False

    @property
    def ops(self) -> tuple[str, ...]:
        """timm's op names for this string (`_RAND_INCREASING_TRANSFORMS` with inc1, else `_RAND_TRANSFORMS`)."""
        return tuple(_RAND_INCREASING_TRANSFORMS if self.increasing else _RAND_TRANSFORMS)


def parse_randaug(spec: str | None) -> RandAugSpec | None:
    """RandAugSpec from a timm RandAugment string such as 'rand-m9-mstd0.5-inc1'; None for an empty spec."""
    if not spec:
        return None

    def bad(why: str) -> ConfigError:
        return ConfigError(f"train.randaug={spec!r} is not a timm RandAugment string: {why}; {_RANDAUG_HELP}")

    sections = str(spec).split("-")
    if sections[0] != "rand":
        raise bad("it must start with 'rand'")
    kinds = {"m": int, "n": int, "p": float, "mstd": float, "mmax": int, "inc": int}
    fields: dict = {}
    for sec in sections[1:]:
        m = re.fullmatch(r"([a-z]+)(\d.*)", sec)
        if m is None or m[1] not in kinds:
            raise bad(f"unknown section {sec!r} (valid keys: {', '.join(kinds)}; timm's t<set> is not supported)")
        try:
            fields[m[1]] = kinds[m[1]](m[2])
        except ValueError:
            raise bad(f"section {sec!r} needs {kinds[m[1]].__name__} value") from None
    if not 0.0 <= fields.get("p", 0.5) <= 1.0:
        raise bad(f"p must be a probability in [0, 1], got {fields['p']}")
    mstd = fields.get("mstd", 0.0)
    return RandAugSpec(
        magnitude=fields.get("m", 10),
        num_layers=fields.get("n", 2),
        prob=fields.get("p", 0.5),
        magnitude_std=math.inf if mstd > 100 else mstd,
        magnitude_max=fields.get("mmax"),
        increasing=bool(fields.get("inc", 0)),
    )


# ------------------------------------------------------------------------------------------------ RandAugment
_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_POINT = ("AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "Solarize")
_POINT += ("SolarizeIncreasing", "SolarizeAdd")
_ENHANCE = ("Color", "Contrast", "Brightness", "Sharpness")  # each also as <name>Increasing
_SIGNED = _GEOMETRIC + tuple(e + "Increasing" for e in _ENHANCE)  # timm's _randomly_negate draws a sign
SUPPORTED_OPS = _GEOMETRIC + _POINT + _ENHANCE + tuple(e + "Increasing" for e in _ENHANCE)


def _level_to_arg(name: str, level: torch.Tensor, sign: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """timm's `_LEVEL_TO_ARG[name]` for a batch: level = magnitude / 10, sign = +-1 (used by signed ops only)."""
    h, w = size
    if name == "Rotate":
        return level * 30.0 * sign  # degrees, [-30, 30]
    if name in ("ShearX", "ShearY"):
        return level * 0.3 * sign
    if name == "TranslateXRel":
        return level * RANDAUG_TRANSLATE_PCT * sign * w  # timm's translate_x_rel: pct * width in pixels
    if name == "TranslateYRel":
        return level * RANDAUG_TRANSLATE_PCT * sign * h
    if name == "Posterize":
        return torch.floor(level * 4.0)  # bits kept, [0, 4]
    if name == "PosterizeIncreasing":
        return 4.0 - torch.floor(level * 4.0)
    if name == "Solarize":
        return torch.clamp(torch.floor(level * 256.0), max=256.0)  # threshold
    if name == "SolarizeIncreasing":
        return 256.0 - torch.clamp(torch.floor(level * 256.0), max=256.0)
    if name == "SolarizeAdd":
        return torch.clamp(torch.floor(level * 110.0), max=128.0)
    if name.endswith("Increasing"):
        return torch.clamp(1.0 + sign * level * 0.9, min=0.1)  # enhance factor around 1.0
    if name in _ENHANCE:
        return level * 1.8 + 0.1  # enhance factor in [0.1, 1.9]
    return torch.zeros_like(level)  # AutoContrast, Equalize, Invert take no argument


def _pil_affine(name: str, arg: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, 3, 3] output->input pixel maps as PIL's Image.transform / Image.rotate build them (origin top-left)."""
    h, w = size
    a = torch.eye(3, device=arg.device).repeat(arg.shape[0], 1, 1)
    if name == "ShearX":
        a[:, 0, 1] = arg
    elif name == "ShearY":
        a[:, 1, 0] = arg
    elif name == "TranslateXRel":
        a[:, 0, 2] = arg
    elif name == "TranslateYRel":
        a[:, 1, 2] = arg
    elif name == "Rotate":  # PIL rotates counter-clockwise about (w/2, h/2)
        t = torch.deg2rad(-arg)
        c, s = torch.cos(t), torch.sin(t)
        cx, cy = w / 2.0, h / 2.0
        a[:, 0, 0], a[:, 0, 1], a[:, 1, 0], a[:, 1, 1] = c, s, -s, c
        a[:, 0, 2] = -c * cx - s * cy + cx
        a[:, 1, 2] = s * cx - c * cy + cy
    return a


def _warp(x: torch.Tensor, pix: torch.Tensor, fill: torch.Tensor, mode: str) -> torch.Tensor:
    """Resample x through per-image PIL pixel maps; points mapped outside the image take `fill`, as PIL does."""
    b, _, h, w = x.shape
    # PIL maps pixel coordinates (centres at i + 0.5); grid_sample wants [-1, 1] (align_corners=False)
    a, bb, c, d, e, f = pix[:, 0, 0], pix[:, 0, 1], pix[:, 0, 2], pix[:, 1, 0], pix[:, 1, 1], pix[:, 1, 2]
    row0 = torch.stack([a, bb * h / w, a + bb * h / w + 2 * c / w - 1], -1)
    row1 = torch.stack([d * w / h, e, d * w / h + e + 2 * f / h - 1], -1)
    theta = torch.stack([row0, row1], 1).view(b, 2, 3, 1, 1)
    # F.affine_grid(theta, align_corners=False) written out over the pixel centres: its batched matmul over a
    # [h * w, 3] base grid costs a CPU a third of the whole warp, these broadcasts a tenth of it
    u = ((torch.arange(w, device=x.device, dtype=x.dtype) * 2 + 1) / w - 1).view(1, 1, w)
    v = ((torch.arange(h, device=x.device, dtype=x.dtype) * 2 + 1) / h - 1).view(1, h, 1)
    gx = theta[:, 0, 0] * u + theta[:, 0, 1] * v + theta[:, 0, 2]
    gy = theta[:, 1, 0] * u + theta[:, 1, 1] * v + theta[:, 1, 2]
    out = F.grid_sample(x, torch.stack([gx, gy], -1), mode=mode, padding_mode="border", align_corners=False)
    # PIL's bilinear/bicubic filters give up (-> fill colour) when the source point lies outside [0, w) x [0, h)
    outside = ((gx < -1) | (gx >= 1) | (gy < -1) | (gy >= 1)).unsqueeze(1)
    return torch.where(outside, fill.view(1, -1, 1, 1), out).clamp_(0, 255).floor_()


def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's convert('L') (ITU-R 601-2 luma, integer arithmetic) of 0-255 values; grey images as they are. In x's
    float dtype: every partial sum is a whole number below 255 * 65536 + 32768 < 2**24, so float32 holds it exactly
    and the shift is an exact floor of a division by 2**16 (on a CPU a seventh of the time of int64 arithmetic)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 0x8000) / 65536).unsqueeze(1)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageFilter.SMOOTH (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1 over 13, rounded); the border is left as is. The
    integer sum of the nine shifted views, divided once: exact (a sum over 13 never ends in .5), and on a CPU an
    eighth of a 3-channel grouped conv2d's time."""
    h, w = x.shape[-2:]
    acc = 4 * x[..., 1:-1, 1:-1]
    for i in range(3):
        for j in range(3):
            acc += x[..., i : h - 2 + i, j : w - 2 + j]
    out = x.clone()
    out[..., 1:-1, 1:-1] = acc.div_(13).round_()
    return out


def _point_lut(name: str, x: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    """[B, C, 256] lookup tables of PIL's ImageOps op `name` for each image and channel (as ImageOps builds them)."""
    b, c = x.shape[:2]
    ar = torch.arange(256, device=x.device, dtype=x.dtype).expand(b, c, 256)
    a = arg.view(b, 1, 1)
    if name == "Invert":
        return 255.0 - ar
    if name.startswith("Posterize"):  # keep the `a` most significant bits
        q = torch.exp2(8.0 - a)
        return torch.where(a >= 8, ar, torch.floor(ar / q) * q)
    if name.startswith("Solarize") and name != "SolarizeAdd":
        return torch.where(ar >= a, 255.0 - ar, ar)
    if name == "SolarizeAdd":
        return torch.where(ar < 128, torch.clamp(ar + a, max=255.0), ar)
    flat = x.flatten(2)
    if name == "AutoContrast":  # per channel: min -> 0, max -> 255, int() of the affine map
        lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
        scale = 255.0 / (hi - lo).clamp(min=1)
        lut = torch.floor((ar - lo) * scale + 1e-3).clamp_(0, 255)  # + 1e-3: PIL's double arithmetic at hi
        return torch.where(hi > lo, lut, ar)
    if name == "Equalize":  # PIL's ImageOps.equalize, per channel
        idx = flat.long()
        hist = torch.zeros(b, c, 256, device=x.device, dtype=torch.long).scatter_add_(2, idx, torch.ones_like(idx))
        last = hist.gather(2, idx.amax(-1, keepdim=True))  # count of the highest value present
        step = (idx.shape[-1] - last) // 255
        cum = hist.cumsum(-1) - hist  # pixels below each value
        lut = ((step // 2 + cum) // step.clamp(min=1)).clamp_(max=255)
        usable = (step > 0) & ((hist > 0).sum(-1, keepdim=True) > 1)
        return torch.where(usable, lut.to(x.dtype), ar)
    raise KeyError(name)


def _degenerate(name: str, x: torch.Tensor) -> torch.Tensor:
    """The image that PIL's ImageEnhance op `name` blends with (factor 0 gives it, 1 the image itself)."""
    base = name.removesuffix("Increasing")
    if base == "Color":
        return _grey(x).expand_as(x)
    if base == "Contrast":  # a flat image at the rounded mean of the grey image
        return torch.floor(_grey(x).mean((1, 2, 3), keepdim=True) + 0.5).expand_as(x)
    if base == "Brightness":
        return torch.zeros_like(x)
    if base == "Sharpness":
        return _smooth(x)
    raise KeyError(name)


class BatchRandAugment:
    """timm's RandAugment on a float batch [B, C, H, W] of 0-255 integer values, each image drawing its own ops.

    Per layer every image draws one op uniformly (with replacement across layers, as timm's np.random.choice),
    an application coin (prob), a magnitude (gaussian noise of std magnitude_std, clipped to [0, mmax or 10]) and
    a sign; on a GPU every op is computed for the whole batch and selected per image by masks (no loop over images,
    no host sync), on a CPU each op only for the images that drew it (same numbers, `subsets`). PIL's rounding is
    reproduced (LUT ops exact, blends truncated, resampling rounded); geometric ops resample with `interpolation`
    and fill with `fill` (0-255 per channel), as timm's AugmentOp.
    """

    def __init__(
        self, spec: RandAugSpec, fill, interpolation: str = RANDAUG_INTERPOLATION, ops=None, subsets: bool | None = None
    ):
        # subsets: compute each op on the images that drew it (None: on a CPU, where that is far cheaper)
        self.spec, self.interpolation, self.subsets = spec, interpolation, subsets
        self.ops = tuple(ops) if ops is not None else spec.ops
        missing = [o for o in self.ops if o not in SUPPORTED_OPS]
        if missing:
            raise ConfigError(f"RandAugment ops {missing} have no device implementation (have: {SUPPORTED_OPS})")
        self.fill = [float(v) for v in (fill if isinstance(fill, (list, tuple)) else [fill])]

    def __repr__(self) -> str:
        return f"BatchRandAugment({self.spec}, ops={self.ops}, interpolation={self.interpolation!r})"

    def _magnitude(self, b: int, device, generator) -> torch.Tensor:
        s = self.spec
        m = torch.full((b,), float(s.magnitude), device=device)
        if s.magnitude_std == math.inf:
            m = torch.rand(b, device=device, generator=generator) * s.magnitude
        elif s.magnitude_std > 0:
            m = m + torch.randn(b, device=device, generator=generator) * s.magnitude_std
        return m.clamp(0.0, float(s.magnitude_max or _LEVEL_DENOM))

    def _layer_by_subsets(self, x, op, level, sign, fill) -> torch.Tensor:
        """One layer, each op computed only on the images that drew it (the same numbers as the masked layer of
        __call__, which computes every op on every image to avoid host syncs: right on a GPU, 15x the work on a CPU,
        where a sync costs nothing; at 224 px on a loaded CPU: ~38 ms per image masked, ~4 ms this way). On a CPU
        with several torch threads the ops run side by side in a thread pool (their images are disjoint, torch's
        ops release the GIL, and one op on a few images is too small for torch's own intra-op threads)."""
        h, w = x.shape[-2:]

        def one(k: int):
            name, idx = self.ops[k], (op == k).nonzero().squeeze(1)
            if not len(idx):
                return None
            xs, arg = x[idx], _level_to_arg(name, level[idx], sign[idx], (h, w))
            if name in _GEOMETRIC:
                xs = _warp(xs, _pil_affine(name, arg, (h, w)), fill, self.interpolation)
            elif name in _POINT:
                xs = _point_lut(name, xs, arg).gather(2, xs.flatten(2).long()).view(xs.shape)
            else:
                deg, f = _degenerate(name, xs), arg.view(-1, 1, 1, 1)
                xs = torch.where(f == 1, xs, torch.trunc(deg + f * (xs - deg)).clamp_(0, 255))
            return idx, xs

        ks = range(len(self.ops))
        parallel = x.device.type == "cpu" and torch.get_num_threads() > 1
        out = x.clone()
        for done in thread_pool().map(one, ks) if parallel else map(one, ks):
            if done is not None:
                out[done[0]] = done[1]
        return out

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment x (float, 0-255 integer values, C = 1 or 3); returns a new tensor of the same kind."""
        b, c, h, w = x.shape
        dev = x.device
        fill = torch.empty(c, device=dev)  # built on the device from python numbers: no host->device copy
        for i in range(c):
            fill[i] = self.fill[i] if len(self.fill) >= c else self.fill[0]
        eye = torch.eye(3, device=dev).expand(b, 3, 3)
        for _ in range(self.spec.num_layers):
            op = torch.randint(len(self.ops), (b,), device=dev, generator=generator)
            on = torch.rand(b, device=dev, generator=generator) < self.spec.prob
            level = self._magnitude(b, dev, generator) / _LEVEL_DENOM
            sign = torch.where(torch.rand(b, device=dev, generator=generator) > 0.5, -1.0, 1.0)
            op = torch.where(on, op, -1)
            if self.subsets if self.subsets is not None else dev.type == "cpu":
                x = self._layer_by_subsets(x, op, level, sign, fill)
                continue
            pix, geo = eye, torch.zeros(b, dtype=torch.bool, device=dev)
            lut = torch.arange(256, device=dev, dtype=x.dtype).expand(b, c, 256)
            blend_deg, factor = x, torch.ones(b, device=dev)
            for k, name in enumerate(self.ops):
                sel = op == k
                arg = _level_to_arg(name, level, sign, (h, w))
                if name in _GEOMETRIC:
                    pix = torch.where(sel.view(b, 1, 1), _pil_affine(name, arg, (h, w)), pix)
                    geo = geo | sel
                elif name in _POINT:
                    lut = torch.where(sel.view(b, 1, 1), _point_lut(name, x, arg), lut)
                else:
                    blend_deg = torch.where(sel.view(b, 1, 1, 1), _degenerate(name, x), blend_deg)
                    factor = torch.where(sel, arg, factor)
            # each image has one op per layer: geometric, point (LUT) or enhance (blend) - apply all three
            if any(n in _GEOMETRIC for n in self.ops):
                x = torch.where(geo.view(b, 1, 1, 1), _warp(x, pix, fill, self.interpolation), x)
            x = lut.gather(2, x.flatten(2).long()).view(b, c, h, w)
            # PIL's Image.blend: degenerate + factor * (image - degenerate), truncated to uint8
            f = factor.view(b, 1, 1, 1)
            x = torch.where(f == 1, x, torch.trunc(blend_deg + f * (x - blend_deg)).clamp_(0, 255))
        return x


def pil_posterize(img, bits_to_keep, **_):
    """timm's posterize, 0 bits kept giving a black image as Pillow < 10 did: Pillow >= 10 raises for 0 bits, which
    timm's PosterizeIncreasing asks for whenever a noisy magnitude is clipped to 10 (about 0.2 % of images)."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    return ImageOps.posterize(img, bits_to_keep) if bits_to_keep >= 1 else Image.new(img.mode, img.size, 0)


def fix_timm_posterize(transform):
    """Point every timm Posterize op inside `transform` (a Compose, a RandAugment or an AugmentOp) at pil_posterize;
    returns `transform`."""
    if getattr(transform, "name", "").startswith("Posterize") and hasattr(transform, "aug_fn"):
        transform.aug_fn = pil_posterize
    for child in [*getattr(transform, "transforms", []), *getattr(transform, "ops", [])]:
        fix_timm_posterize(child)
    return transform


# ------------------------------------------------------------------------------------------------ the batch
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
        device="cpu",
    ):
        self.img_size, self.hflip, self.translate = img_size, hflip, translate
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        ra = parse_randaug(randaug)
        # timm's create_transform fills RandAugment's geometric ops with the data set mean in 0-255 ('img_mean')
        fill = [min(255, round(255 * m)) for m in mean]
        self.randaug = BatchRandAugment(ra, fill) if ra else None
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
        """Random translation (+-translate * size, zero fill) and horizontal flip, resized to img_size, in one
        grid_sample; drawn on x's device (generator: an optional one on that device, for tests)."""
        b = x.shape[0]
        theta = torch.zeros(b, 2, 3, device=x.device)
        flip = torch.rand(b, generator=generator, device=x.device) < self.hflip
        theta[:, 0, 0] = torch.where(flip, -1.0, 1.0)
        theta[:, 1, 1] = 1.0
        theta[:, :, 2] = (torch.rand(b, 2, generator=generator, device=x.device) * 2 - 1) * 2 * self.translate
        grid = F.affine_grid(theta, [b, x.shape[1], self.img_size, self.img_size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None):
        """Augment one batch; returns (images, targets): targets are soft (B, classes) when Mixup/CutMix is on."""
        x = self.geometry(x.float().div_(255), generator)  # timm: RandomResizedCrop + flip come first
        if self.randaug is not None:
            x = self.randaug(x.mul_(255).round_(), generator).div_(255)
        return self.finish(x, y)

    def decoded(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None):
        """A batch decoded, cropped and flipped on the device (data.decode=device; x float in 0..255, whole values):
        RandAugment, then finish."""
        if self.randaug is not None:
            x = self.randaug(x, generator)
        return self.finish(x.div_(255), y)

    def finish(self, x: torch.Tensor, y: torch.Tensor):
        """The batch stages after the per-image ones (x float in [0, 1]): normalisation, random erasing, Mixup/CutMix;
        image-folder batches, cropped and RandAugmented by the loader's workers, start here (timm's prefetcher)."""
        x = normalize(x, self.mean, self.std)
        if self.erase is not None:
            x = self.erase(x)  # timm erases each image in its per-image transform, before batching
        if self.mixup is not None:
            x, y = self.mixup(x, y)  # ... and mixes the collated batch last
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
