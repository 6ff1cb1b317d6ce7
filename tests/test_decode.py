"""data.decode=device (ablations/decode.py, issue 24): workers read bytes and draw boxes, the batch is decoded and
cropped on the device. Its crops against timm's PIL transforms for the same boxes, the host fallback (CMYK, grey,
PNG, a failing decoder), the CPU RandAugment by subsets against the masked one, and exact resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ablations.decode import HOST, EncodedFolder, collate_encoded, decode_batch, decode_images, unpack_files
from ablations.loader_bench import make_jpeg_folder

# the device path against PIL for the same box, in grey levels of 0..255 (measured here: mean |diff| 0.003-0.25 per
# image, the larger where a small box is enlarged; max 2)
MEAN_TOL, MAX_TOL = 0.5, 3


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_jpeg_folder(tmp_path_factory.mktemp("jpegs"), per_class=4, val_per_class=2)


def _pair(compose_cfg, root, split, *extra):
    """The same folder through the PIL path and the device path, as SeededSamples (the run's per-sample seeding)."""
    from ablations.data import SeededSamples, image_folder

    base = ("data=imagefolder", f"data.root={root}", "data.img_size=224", "train.randaug=null", *extra)
    out = []
    for decode in ("pil", "device"):
        cfg = compose_cfg(*base, f"data.decode={decode}")
        out.append(SeededSamples(image_folder(cfg.data, split, cfg.train if split == "train" else None)))
    return out


def _files(batch):
    """A collated device-path batch's files (views of its packed bytes) and boxes."""
    data, lengths, boxes, _ = batch
    return unpack_files(data, lengths), boxes


@pytest.mark.parametrize("split", ["train", "val"])
def test_device_crops_equal_timms_pil_crops(compose_cfg, photos, split):
    """Train: the same RandomResizedCrop box and flip from the sample's seed, resized bicubic with antialiasing;
    val: resize the shorter side to 256 and centre-crop 224 (timm's eval transform at crop_pct 0.875)."""
    pil, dev = _pair(compose_cfg, photos, split)
    flips = []
    for i in range(len(pil.dataset)):
        ref, _ = pil[(i, 1000 + i)]
        data, box, label = dev[(i, 1000 + i)]
        x = decode_batch([data], box[None], "cpu", 224, train=split == "train")[0]
        assert x.shape == ref.shape == (3, 224, 224) and label == pil.dataset.samples[i][1]
        diff = (x - ref.float()).abs()
        assert diff.mean() < MEAN_TOL and diff.max() <= MAX_TOL, (i, diff.mean(), diff.max())
        flips.append(bool(box[4]))
    if split == "train":
        assert len(set(flips)) == 2  # both flip states were drawn, so the flip's draw order is tested too


def test_a_cpu_batch_decoded_by_threads_equals_one_by_one(compose_cfg, photos):
    """On a CPU with several torch threads the batch is decoded and cropped by a thread pool: the same numbers as
    with one thread."""
    _, dev = _pair(compose_cfg, photos, "train")
    datas, boxes = _files(collate_encoded([dev[(i, 77 + i)] for i in range(len(dev.dataset))]))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_batch(datas, boxes, "cpu", 96, train=True)
        torch.set_num_threads(2)
        pooled = decode_batch(datas, boxes, "cpu", 96, train=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, pooled) and one.shape == (len(datas), 3, 96, 96)


def _odd_folder(root: Path) -> Path:
    """One class with a CMYK JPEG, a greyscale JPEG and a PNG (ImageNet has all three), one RGB JPEG."""
    rng = np.random.default_rng(1)
    (root / "train" / "a").mkdir(parents=True)
    rgb = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    rgb.save(root / "train/a/rgb.jpg", quality=95)
    rgb.convert("CMYK").save(root / "train/a/cmyk.jpg", quality=95)
    rgb.convert("L").save(root / "train/a/grey.jpg", quality=95)
    rgb.save(root / "train/a/photo.png")
    return root


def _pil_rgb(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("cuda", [False, True])
def test_what_the_device_decoder_refuses_is_decoded_on_the_host(tmp_path, cuda):
    from torchvision.datasets import ImageFolder

    root = _odd_folder(tmp_path)
    ds = EncodedFolder(ImageFolder(str(root / "train")), train=False, cuda=cuda)
    names = [Path(p).name for p, _ in ds.samples]
    datas, boxes = _files(collate_encoded([ds[i] for i in range(len(ds))]))
    host = dict(zip(names, boxes[:, HOST].bool().tolist()))
    # the PNG always; CMYK only where the device is a GPU (nvjpeg does not convert it; the CPU decoder does)
    assert host == {"cmyk.jpg": cuda, "grey.jpg": False, "photo.png": True, "rgb.jpg": False}
    images = decode_images(datas, list(host.values()), "cpu")
    for name, img in zip(names, images):
        ref = _pil_rgb(root / "train/a" / name)
        assert img.shape == ref.shape == (3, 60, 80) and img.dtype == torch.uint8
        if name == "photo.png" or host[name]:
            assert torch.equal(img, ref)  # PIL decoded it: the ImageFolder loader's pixels exactly
        else:
            assert (img.float() - ref.float()).abs().mean() < 1.0, name  # libjpeg-turbo vs Pillow's libjpeg
    grey = images[names.index("grey.jpg")]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_a_batch_the_decoder_fails_on_is_retried_image_by_image(tmp_path, monkeypatch):
    """A file the decoder cannot read (here: the decoder refuses lists and one file) fails the batched call; the
    batch is retried one by one and that file decoded by PIL."""
    import torchvision.io as tio
    from torchvision.datasets import ImageFolder

    root = _odd_folder(tmp_path)
    ds = EncodedFolder(ImageFolder(str(root / "train")), train=False)
    keep = [i for i, (p, _) in enumerate(ds.samples) if p.endswith(".jpg")]
    datas = [ds[i][0] for i in keep]
    real, bad = tio.decode_jpeg, datas[1]

    def flaky(data, *a, **k):
        if isinstance(data, list) or data is bad:
            raise RuntimeError("decode failed")
        return real(data, *a, **k)

    monkeypatch.setattr(tio, "decode_jpeg", flaky)
    out = decode_images(datas, [False] * len(datas), "cpu")
    for i, img in zip(keep, out):
        ref = _pil_rgb(Path(ds.samples[i][0]))
        exact = ds.samples[i][0] == ds.samples[keep[1]][0]
        assert torch.equal(img, ref) if exact else (img.float() - ref.float()).abs().mean() < 1.0


def test_cpu_randaugment_by_subsets_equals_the_masked_one():
    """On a CPU each op runs on the images that drew it, the ops side by side in threads when torch has several;
    the masked version (every op on every image, the GPU's) gives the same numbers for the same draws."""
    from ablations.augment import BatchRandAugment, parse_randaug

    x = torch.randint(0, 256, (96, 3, 24, 24)).float()  # 96 images: every op drawn (planted: one op skipped fails)
    spec = parse_randaug("rand-m9-mstd0.5-inc1")
    outs, threads = [], torch.get_num_threads()
    try:
        for subsets, n in ((True, 1), (True, 2), (False, 2)):
            torch.set_num_threads(n)
            g = torch.Generator().manual_seed(7)
            outs.append(BatchRandAugment(spec, [124, 116, 104], subsets=subsets)(x.clone(), g))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2]) and not torch.equal(outs[0], x)


@pytest.mark.parametrize("decode", ["device", "pil"])
def test_a_device_decode_run_resumes_exactly(tmp_path, compose_cfg, ctrl_c_at, photos, decode):
    """Ctrl-C mid-epoch with RandAugment, erasing and Mixup/CutMix on: the resumed run ends with the weights and
    metrics of the straight one (boxes from the sample's seed, device augmentation from the step's)."""
    import ablations.train as T
    from ablations.dist import Preempted

    args = ("step=patchify_stem", "profile=smoke", "progress=false", "data=imagefolder", f"data.root={photos}",
            f"data.decode={decode}", "data.workers=1", "data.img_size=32", "data.train_subset=null",
            "data.test_subset=null", "train.batch_size=2", "train.epochs=2", "max_steps=3",
            "train.randaug=rand-m9-mstd0.5-inc1", "train.reprob=0.25", "train.mixup=0.8",
            "train.cutmix=1.0")  # fmt: skip

    def run(d):
        return T.train(compose_cfg(*args), str(tmp_path / d))

    run("straight")
    undo = ctrl_c_at(1 + 3 + 2)  # Ctrl-C during epoch 2, step 2
    with pytest.raises(Preempted):
        run("run")
    undo()
    assert torch.load(tmp_path / "run/last.pt", weights_only=True)["step"] == 2
    run("run")
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True)["model"] for d in ("straight", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = {"epoch_s", "img_per_s"}
    rows = [[{k: v for k, v in json.loads(x).items() if k not in drop}
             for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("straight", "run")]  # fmt: skip
    assert rows[0] == rows[1] and len(rows[0]) == 2


def test_an_unknown_decode_is_one_clear_error(compose_cfg, photos):
    from ablations.data import image_folder
    from models import ConfigError

    cfg = compose_cfg("data=imagefolder", f"data.root={photos}", "data.decode=gpu")
    with pytest.raises(ConfigError, match="unknown data.decode 'gpu'; valid choices: pil, device"):
        image_folder(cfg.data, "train", cfg.train)


def test_the_jpeg_bytes_are_the_file(photos):
    """What a worker hands over is the file as it is on disk (no re-encode), with its label."""
    from torchvision.datasets import ImageFolder

    ds = EncodedFolder(ImageFolder(str(photos / "train")), train=True)
    data, box, label = ds[3]
    path, want = ds.samples[3]
    assert data.numpy().tobytes() == Path(path).read_bytes() and label == want
    with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
        top, left, h, w = (int(v) for v in box[:4])
        assert 0 <= top and top + h <= im.size[1] and 0 <= left and left + w <= im.size[0]


def test_a_batch_packs_its_files_into_one_tensor_and_unpacks_them_as_they_were(photos):
    """A worker hands the trainer one packed tensor per batch (one shared-memory block); split again, each file is
    its bytes on disk, beside its box and label."""
    from torchvision.datasets import ImageFolder

    ds = EncodedFolder(ImageFolder(str(photos / "train")), train=True)
    items = [ds[i] for i in range(len(ds))]
    data, lengths, boxes, labels = collate_encoded(items)
    assert data.dim() == 1 and data.dtype == torch.uint8 and len(data) == sum(len(d) for d, _, _ in items)
    files = unpack_files(data, lengths)
    assert len(files) == len(ds) == len(set(Path(p).read_bytes() for p, _ in ds.samples))
    for f, (path, label), box, y in zip(files, ds.samples, boxes, labels):
        assert f.numpy().tobytes() == Path(path).read_bytes() and int(y) == label and box.shape == (6,)


# ------------------------------------------------------------------------------------------ progressive resolution
def sched(start, end, ramp0, ramp1) -> tuple[str, ...]:
    return (
        f"data.res_schedule.start={start}",
        f"data.res_schedule.end={end}",
        f"data.res_schedule.ramp=[{ramp0},{ramp1}]",
    )


def test_train_resolution_follows_ffcvs_get_resolution(compose_cfg):
    """FFCV's rule (ffcv-imagenet train_imagenet.py get_resolution): min_res until start_ramp epochs are done,
    max_res from end_ramp, between them np.interp rounded to a multiple of 32; here its 16-epoch ResNet-50 ramp."""
    from ablations.data import train_resolution

    def ffcv(epoch, min_res=160, max_res=192, end_ramp=13, start_ramp=11):  # epoch: 0-based, as FFCV counts
        if epoch <= start_ramp:
            return min_res
        if epoch >= end_ramp:
            return max_res
        return int(np.round(np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])[0] / 32)) * 32

    d = compose_cfg(*sched(160, 192, 11, 13)).data
    assert [train_resolution(d, e + 1) for e in range(16)] == [ffcv(e) for e in range(16)]
    d = compose_cfg(*sched(96, 224, 0, 8)).data  # a long ramp: FFCV's np.round rounds halves to even
    ffcv_long = [ffcv(e, 96, 224, 8, 0) for e in range(10)]
    assert (
        [train_resolution(d, e + 1) for e in range(10)]
        == ffcv_long
        == [96, 128, 128, 128, 160, 192, 192, 192, 224, 224]
    )
    assert train_resolution(compose_cfg().data, 5) == 32  # no schedule: data.img_size


def test_a_run_trains_at_the_scheduled_sizes_and_records_them(tmp_path, compose_cfg, monkeypatch, photos):
    """In-memory data and a device-decoded folder: each epoch's batches at its resolution, evaluation at
    data.eval_img_size, both in metrics.jsonl."""
    import ablations.data as D
    from ablations.train import train

    seen, real = [], D.Data.train_batches

    def spy(self):
        for x, y in real(self):
            seen.append((self.cfg.name, x.shape[-1]))
            yield x, y

    monkeypatch.setattr(D.Data, "train_batches", spy)
    args = (*sched(32, 64, 0, 2), "data.eval_img_size=48", "train.epochs=3",
             "max_steps=2", "progress=false", "profile=smoke", "step=patchify_stem")  # fmt: skip
    folder = ("data=imagefolder", f"data.root={photos}", "data.decode=device", "data.workers=0",
              "data.train_subset=null", "data.test_subset=null", "train.batch_size=2")  # fmt: skip
    for name, extra in (("synthetic", ("data=synthetic",)), ("imagefolder", folder)):
        train(compose_cfg(*args, *extra), str(tmp_path / name))
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [(r["img_size"], r["eval_img_size"]) for r in rows] == [(32, 48), (64, 48), (64, 48)]
        assert [s for n, s in seen if n == name] == [32, 32, 64, 64, 64, 64]


def test_a_resolution_schedule_with_the_pil_path_is_refused(compose_cfg):
    from ablations.train import check_numbers
    from models import ConfigError

    cfg = compose_cfg("data=imagefolder", "data.root=/x", *sched(160, 192, 2, 5))
    with pytest.raises(ConfigError, match="data.res_schedule needs .* data.decode=device"):
        check_numbers(cfg)
    bad = compose_cfg(*sched(160, 192, 5, 2))
    with pytest.raises(ConfigError, match=r"ramp=\[5.0, 2.0\] must be two epochs \[from, to\]"):
        check_numbers(bad)


def test_the_whole_device_augmentation_changes_images_as_timms_pil_pipeline(compose_cfg, photos):
    """RandAugment after the crop, at 160 px on the photos: the per-image change (mean |with - without|, 0-255)
    over 300 samples, timm's PIL pipeline (random-resized crop, flip, rand-m9-mstd0.5-inc1) against the device path
    (decode, the same crop and flip, BatchRandAugment), with docs/randaugment_compare.md's tolerances: means and the
    median / 75 % quantiles within 15 %, the 25 % quantiles within 8 grey levels, the unchanged fractions within
    0.05. Plant: the device path's RandAugment at probability 1.0 fails (unchanged)."""
    from ablations.augment import BatchRandAugment, parse_randaug
    from ablations.data import SeededSamples, image_folder
    from ablations.randaug_compare import summary

    n, spec = 300, "rand-m9-mstd0.5-inc1"
    base = ("data=imagefolder", f"data.root={photos}", "data.img_size=160")
    plain, dev = _pair(compose_cfg, photos, "train", "data.img_size=160")
    cfg = compose_cfg(*base, f"train.randaug={spec}")
    pil_ra = SeededSamples(image_folder(cfg.data, "train", cfg.train))
    keys = [(k % len(plain.dataset), 5000 + k) for k in range(n)]
    crops = torch.stack([plain[key][0] for key in keys]).float()
    pil_change = (torch.stack([pil_ra[key][0] for key in keys]).float() - crops).abs().mean((1, 2, 3))
    datas, boxes = _files(collate_encoded([dev[key] for key in keys]))
    x = decode_batch(datas, boxes, "cpu", 160, train=True)
    assert (x - crops).abs().mean() < MEAN_TOL  # the same crops before RandAugment
    fill = [min(255, round(255 * m)) for m in cfg.data.mean]
    torch.manual_seed(0)
    dev_change = (BatchRandAugment(parse_randaug(spec), fill)(x.clone()) - x).abs().mean((1, 2, 3))
    ref, ours = summary(pil_change), summary(dev_change)
    assert abs(ours["mean"] / ref["mean"] - 1) < 0.15, (ours, ref)
    assert all(abs(ours[q] / ref[q] - 1) < 0.15 for q in ("q50", "q75")), (ours, ref)
    assert abs(ours["q25"] - ref["q25"]) <= 8 and abs(ours["unchanged"] - ref["unchanged"]) < 0.05, (ours, ref)


# ---------------------------------------------------------------------------------------------- profile=imagenet_fast
def test_the_imagenet_fast_profile(compose_cfg):
    """30 epochs on ImageNet folders decoded on the device, 160 -> 192 px, evaluated at 224, the paper's lr scaled
    to batch 1024, the long-schedule regularisers off for every step alike; one error paragraph without data.root."""
    from ablations.data import eval_resolution, train_resolution
    from ablations.train import batch_split, check_numbers, run_lr
    from models import ConfigError

    for step in ("baseline", "separate_downsampling"):
        cfg = compose_cfg("profile=imagenet_fast", "data.root=/imagenet", f"step={step}")
        check_numbers(cfg)
        d, t = cfg.data, cfg.train
        assert (d.name, d.decode, t.epochs, t.batch_size, t.warmup_epochs) == ("imagefolder", "device", 30, 1024, 2)
        sizes = [train_resolution(d, e) for e in range(1, 31)]
        assert sizes[0] == 160 and sizes[-1] == 192 and sizes == sorted(sizes) and eval_resolution(d) == 224
        assert run_lr(cfg) == pytest.approx(1e-3) and batch_split(t, 8).grad_accum == 1
        assert (t.mixup, t.cutmix, t.reprob, t.drop_path_rate, t.ema) == (0.0, 0.0, 0.0, 0.0, False)
        assert t.randaug == "rand-m9-mstd0.5-inc1" and t.label_smoothing == 0.1
    with pytest.raises(ConfigError, match="data=imagefolder needs data.root="):
        check_numbers(compose_cfg("profile=imagenet_fast"))


def test_the_imagenet_fast_estimate_page_is_what_its_script_writes(tmp_path):
    """docs/imagenet_fast.md is the output of scripts/imagenet_fast_estimate.py on docs/summary.csv and the profile
    as they are now (rerun the script after changing either)."""
    import runpy

    root = Path(__file__).resolve().parents[1]
    mod = runpy.run_path(str(root / "scripts" / "imagenet_fast_estimate.py"))
    rows, info = mod["estimate"](root / "docs" / "summary.csv")
    assert len(rows) == 17 and info["epochs"] == 30
    convnext = next(r for r in rows if r["bar"] == "separate_downsampling")
    assert 0 < convnext["h100_h_low"] < convnext["h100_h_high"]
    assert mod["markdown"](rows, info) == (root / "docs" / "imagenet_fast.md").read_text()


def test_a_run_folder_from_before_the_decode_and_resolution_keys_still_resumes(tmp_path, compose_cfg):
    """config.yaml and checkpoints written before data.decode / res_schedule / eval_img_size existed compare equal
    to a default run; a folder of another resolution schedule does not."""
    import re

    from omegaconf import OmegaConf

    from ablations.run_folder import RunFolderError, check_checkpoint, plain, prepare

    cfg = compose_cfg("step=gelu", "profile=smoke")
    old = plain(cfg)
    for key in ("decode", "res_schedule", "eval_img_size"):
        old["data"].pop(key)
    OmegaConf.save(OmegaConf.create(old), tmp_path / "config.yaml")
    assert prepare(cfg, str(tmp_path)) is None  # to be trained or resumed, not refused
    check_checkpoint({"config": old}, cfg, "last.pt")
    with pytest.raises(RunFolderError, match=re.escape("data.res_schedule: None -> {'start': 32")):
        prepare(compose_cfg("step=gelu", "profile=smoke", *sched(32, 64, 0, 1)), str(tmp_path))


def test_a_sample_seeds_the_host_streams_as_seed_all_does():
    """Workers seed each sample with seed_host (no accelerator generators, ~0.15 ms a call saved): python, numpy
    and torch's CPU streams are those seed_all gives, so old run folders' augmentation is unchanged."""
    import random

    import numpy as np

    from ablations.data import seed_all, seed_host

    draws = []
    for seed_fn in (seed_all, seed_host):
        seed_fn(123456789)
        draws.append((random.random(), np.random.rand(), torch.rand(3).tolist()))
    assert draws[0] == draws[1]
