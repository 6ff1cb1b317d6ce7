"""data.decode=device: image folders decoded and cropped on the training device, so loader workers do almost nothing.

The PIL path (data.decode=pil, ablations.data.image_folder) decodes, crops, resizes and RandAugments every JPEG in
DataLoader workers: about 4 ms of CPU per ImageNet image, so a fast GPU needs 10+ worker cores. Here a worker only
reads the file's bytes and its header (PIL parses the header without decoding) and draws the sample's crop box and
flip, with the same calls and in the same order as timm's train transform (RandomResizedCropAndInterpolation
.get_params, then torchvision's RandomHorizontalFlip draw), from the sample's own seed (ablations.data.EpochSampler),
so exact resume still holds and the boxes are those the PIL path would cut. The batch is then decoded at once by
`torchvision.io.decode_jpeg(list, device=...)` (batched nvjpeg on CUDA, libjpeg-turbo on the CPU), each image is
cropped and resized there (bicubic, antialiased: torch's closest match to PIL's resize), flipped, and the existing
device RandAugment, erasing and Mixup/CutMix (ablations.augment.BatchAugment.decoded) run on the batch.

What a device decoder refuses is decoded on the host with PIL (as torchvision's ImageFolder loader does), then
cropped the same way: files that are not JPEG (ImageNet's train set holds one PNG) and, on CUDA, JPEGs that are not
RGB or greyscale (ImageNet has CMYK ones, which nvjpeg does not convert); a batch the decoder fails on is retried
image by image, and an image that still fails goes to the host.
"""

from __future__ import annotations

import io
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

RRC_SCALE = (0.08, 1.0)  # timm's create_transform defaults for RandomResizedCropAndInterpolation
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
DEVICE_MODES = ("RGB", "L")  # JPEG colour modes nvjpeg decodes to RGB; others (CMYK, YCCK) go to the host
# a sample's box row: crop top, left, height, width (source pixels), flip (0/1), host (0/1: decode with PIL)
TOP, LEFT, HEIGHT, WIDTH, FLIP, HOST = range(6)


def eval_crop_pct(img_size: int) -> float:
    """The share of the resized image the evaluation crop keeps: timm's 0.875 at ImageNet sizes, all of it for the
    small images of the proxies (a centre crop of a 32 px image would throw away its border)."""
    return 0.875 if img_size >= 160 else 1.0


class EncodedFolder(torch.utils.data.Dataset):
    """An ImageFolder's samples as (file bytes uint8 [n], box float64 [6], label): the worker reads the file and its
    header and, for training, draws the crop box and flip (timm's order and calls); evaluation boxes are the whole
    image (the centre crop is cut after the resize, as timm's eval transform does)."""

    def __init__(self, folder, train: bool, hflip: float = 0.5, cuda: bool = False):
        self.samples = folder.samples  # (path, label) in ImageFolder's order, data.classes applied
        self.classes = folder.classes
        self.train, self.hflip, self.cuda = train, hflip, cuda

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        from PIL import Image
        from timm.data.transforms import RandomResizedCropAndInterpolation

        path, label = self.samples[index]
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:  # the header only: no pixel is decoded here
            w, h = im.size
            host = im.format != "JPEG" or (self.cuda and im.mode not in DEVICE_MODES)
            if self.train:
                top, left, ch, cw = RandomResizedCropAndInterpolation.get_params(im, RRC_SCALE, RRC_RATIO)
                flip = bool(torch.rand(1) < self.hflip)  # torchvision's RandomHorizontalFlip draw, after the crop's
            else:
                top, left, ch, cw, flip = 0, 0, h, w, False
        box = torch.tensor([top, left, ch, cw, flip, host], dtype=torch.float64)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), box, label


def collate_encoded(batch):
    """(file bytes uint8 [total], lengths int64 [B], boxes [B, 6], labels [B]): the files packed end to end in one
    tensor, so a batch crosses from a worker to the trainer as one shared-memory block, not one per file (a list of
    32 files cost the trainer ~15 ms of a 32-image batch here, the packed batch ~5 ms); `unpack_files` splits it."""
    datas, boxes, labels = zip(*batch)
    lengths = torch.tensor([len(d) for d in datas], dtype=torch.int64)
    return torch.cat(datas), lengths, torch.stack(boxes), torch.tensor(labels, dtype=torch.int64)


def unpack_files(data: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """A packed batch's files as views of it, one 1-D uint8 tensor each (what decode_jpeg takes)."""
    return list(data.split(lengths.tolist()))


def _host_decode(data: torch.Tensor) -> torch.Tensor:
    """One file decoded by PIL as RGB (what torchvision's ImageFolder loader does), uint8 [3, H, W]."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
        rgb = np.asarray(im.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def decode_images(datas: list[torch.Tensor], host: list[bool], device) -> list[torch.Tensor]:
    """Every file as uint8 [3, H, W] on device: the JPEGs in one decode_jpeg call there, the host ones (and any the
    decoder fails on) by PIL."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | None] = [None] * len(datas)
    on_device = [k for k, h in enumerate(host) if not h]
    if on_device:
        try:
            decoded = decode_jpeg([datas[k] for k in on_device], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the whole batch: retry one by one, the failures on the host
            decoded = []
            for k in on_device:
                try:
                    decoded.append(decode_jpeg(datas[k], mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
        for k, img in zip(on_device, decoded):
            out[k] = img
    for k, img in enumerate(out):
        if img is None:
            out[k] = _host_decode(datas[k]).to(device, non_blocking=True)
    return out


def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, h, w] -> float [3, *size] of whole values in 0..255 (RandAugment's point ops expect them), bicubic
    with antialiasing. On a CPU torch resizes uint8 itself (its PIL-like integer kernel, ~6x faster than float); on
    a GPU in float, then rounded and clipped as a uint8 image would be."""
    if img.device.type == "cpu":
        return F.interpolate(img[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0].float()
    x = F.interpolate(img[None].float(), size=size, mode="bicubic", antialias=True, align_corners=False)[0]
    return x.clamp_(0, 255).round_()


def crop_resize(img: torch.Tensor, box: torch.Tensor, img_size: int) -> torch.Tensor:
    """timm's RandomResizedCropAndInterpolation + flip for one decoded image and its box row: float [3, S, S]."""
    top, left, h, w = (int(v) for v in box[:4])
    x = _resize(img[:, top : top + h, left : left + w], (img_size, img_size))
    return x.flip(-1) if box[FLIP] else x


def resize_center_crop(img: torch.Tensor, img_size: int, crop_pct: float) -> torch.Tensor:
    """timm's eval transform for one decoded image: the shorter side resized to floor(img_size / crop_pct)
    (torchvision's Resize(int) arithmetic), then the centre img_size square (CenterCrop's rounding): float [3, S, S]."""
    h, w = img.shape[-2:]
    scale = math.floor(img_size / crop_pct)
    if h <= w:
        size = (scale, int(scale * w / h))
    else:
        size = (int(scale * h / w), scale)
    x = _resize(img, size) if size != (h, w) else img.float()
    top, left = int(round((size[0] - img_size) / 2.0)), int(round((size[1] - img_size) / 2.0))
    return x[:, top : top + img_size, left : left + img_size]


_POOL: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    global _POOL
    _POOL = None  # a forked child has the pool object but none of its threads


os.register_at_fork(after_in_child=_forget_pool)


def thread_pool() -> ThreadPoolExecutor:
    """This process's CPU image threads, one per torch thread (made on first use, and again after a fork): the
    decode and crop of a batch's images, the ops of a CPU RandAugment layer."""
    global _POOL  # noqa: PLW0603
    if _POOL is None or _POOL._max_workers != torch.get_num_threads():
        _POOL = ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="decode")
    return _POOL


def decode_batch(datas, boxes: torch.Tensor, device, img_size: int, train: bool) -> torch.Tensor:
    """A collated batch of files as float [B, 3, S, S] in 0..255 on device: decoded there, then each image cropped
    and resized (train: its box and flip; eval: resize and centre crop).

    On a GPU the batch is one decode_jpeg call (nvjpeg's batched decoder). On a CPU the images are decoded and
    cropped one per thread of a pool as wide as torch's threads: libjpeg-turbo decodes one image at a time and the
    ops release the GIL, so the training process's cores share the work that DataLoader workers did before."""

    def finish(img: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        return crop_resize(img, box, img_size) if train else resize_center_crop(img, img_size, eval_crop_pct(img_size))

    host = [bool(h) for h in boxes[:, HOST]]
    if torch.device(device).type != "cpu" or len(datas) < 2 or torch.get_num_threads() < 2:
        return torch.stack([finish(img, box) for img, box in zip(decode_images(datas, host, device), boxes)])

    def one(k: int) -> torch.Tensor:
        return finish(decode_images([datas[k]], [host[k]], device)[0], boxes[k])

    return torch.stack(list(thread_pool().map(one, range(len(datas)))))


__all__ = [
    "EncodedFolder", "collate_encoded", "crop_resize", "decode_batch", "decode_images", "eval_crop_pct",
    "resize_center_crop", "thread_pool", "unpack_files",
]  # fmt: skip
