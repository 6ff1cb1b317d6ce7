"""Training: recipes run, loss falls, resume is exact, kills lose nothing, DDP matches one process, errors are clear."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["profile=smoke", "progress=false"]


def run(*args, env=None, timeout=300):
    """run_ablation.py in a subprocess (one torch thread: the CI machine has two cores)."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "run_ablation.py", *args], cwd=ROOT, capture_output=True, text=True, env=e, timeout=timeout
    )


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe", ["modern", "classic"])
def test_recipe_runs_on_synthetic(tmp_path, recipe):
    # modern with its full augmentation (RandAugment, Mixup/CutMix, erasing, drop path) switched back on
    extra = (
        [
            "train.mixup=0.8",
            "train.cutmix=1.0",
            "train.randaug=rand-m9-mstd0.5-inc1",
            "train.reprob=0.25",
            "train.drop_path_rate=0.1",
            "train.ema=true",
        ]
        if recipe == "modern"
        else []
    )
    out = run(
        "step=separate_downsampling",
        "data=synthetic",
        f"train={recipe}",
        *SMOKE,
        *extra,
        "max_steps=2",
        f"hydra.run.dir={tmp_path}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "finished" and s["recipe"] == recipe and s["epochs"] == 1
    assert s["gflops"] == pytest.approx(4.456, abs=1e-3) and 0 < s["train_gflops"] < 0.01
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    if head.returncode == 0:  # a git checkout (CI's clean clone is one): the run names the code that produced it
        assert s["code"] in (head.stdout.strip(), head.stdout.strip() + "+dirty")
    else:
        assert s["code"] is None
    assert s["top1"] == metrics(tmp_path)[-1]["top1"] and set(metrics(tmp_path)[0]) >= {
        "epoch",
        "train_loss",
        "lr",
        "top1",
        "top5",
        "epoch_s",
        "img_per_s",
    }
    ck = torch.load(tmp_path / "last.pt", weights_only=True)  # checkpoints are plain tensors and containers
    assert ck["epoch"] == 1 and "model" in ck and "optimizer" in ck and (ck["ema"] is not None) == (recipe == "modern")
    saved = (tmp_path / "config.yaml").read_text()
    assert f"name: {recipe}" in saved and "${" not in saved  # composed and resolved


@pytest.mark.slow
def test_loss_goes_down_on_real_format_data(tmp_path, fmnist_dir):
    out = run(
        "step=separate_downsampling",
        f"data.root={fmnist_dir}",
        *SMOKE,
        "max_steps=null",
        "data.train_subset=null",
        "data.test_subset=null",
        "train.epochs=6",
        "train.batch_size=20",
        "train.lr=4e-3",
        "train.lr_scaling=none",
        f"hydra.run.dir={tmp_path}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    m = metrics(tmp_path)
    assert [r["epoch"] for r in m] == [1, 2, 3, 4, 5, 6]
    assert m[-1]["train_loss"] < 0.8 * m[0]["train_loss"]
    assert m[-1]["top1"] > 30  # chance is 10 %


def _train_in_process(compose_cfg, run_dir, *overrides):
    from ablations.train import train

    cfg = compose_cfg("step=fewer_norms", "data=synthetic", "profile=smoke", "max_steps=3", *overrides)
    return train(cfg, str(run_dir))


class Killed(Exception):
    pass


def test_resume_restores_identical_state(tmp_path, compose_cfg, monkeypatch):
    import ablations.train as T

    _train_in_process(compose_cfg, tmp_path / "straight", "train.epochs=2")
    save = T.atomic_save

    def save_then_die(obj, path):  # the process "dies" right after the first epoch's checkpoint
        save(obj, path)
        raise Killed

    monkeypatch.setattr(T, "atomic_save", save_then_die)
    with pytest.raises(Killed):
        _train_in_process(compose_cfg, tmp_path / "resumed", "train.epochs=2")
    monkeypatch.setattr(T, "atomic_save", save)
    assert torch.load(tmp_path / "resumed/last.pt", weights_only=True)["epoch"] == 1
    _train_in_process(compose_cfg, tmp_path / "resumed", "train.epochs=2")
    a = torch.load(tmp_path / "straight/last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed/last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])
    assert [r["epoch"] for r in metrics(tmp_path / "resumed")] == [1, 2]


@pytest.mark.slow
def test_sigkill_after_first_epoch_then_restart(tmp_path):
    args = [
        "step=bn_to_ln",
        "data=synthetic",
        *SMOKE,
        "data.synthetic_size=2048",
        "max_steps=null",
        "train.epochs=3",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "run_ablation.py", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (tmp_path / "last.pt").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "last.pt").exists() and not (tmp_path / "summary.json").exists()
    out = run(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["epoch"] for r in metrics(tmp_path)] == [1, 2, 3]
    assert "resuming" in out.stderr + out.stdout
    again = run(*args)  # a finished run is reported, not redone
    assert again.returncode == 0 and "already finished" in again.stderr + again.stdout


def _png_folder(root: Path, classes: list[str], per_class: int = 6) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                mode = "L" if i % 2 else "RGB"  # grey and colour files mixed, as in real folders
                arr = rng.integers(0, 255, (40, 48) if mode == "L" else (40, 48, 3), dtype=np.uint8)
                Image.fromarray(arr, mode).save(root / split / c / f"{i}.png")


def test_imagefolder_format(tmp_path):
    _png_folder(tmp_path / "data", ["cat", "dog", "fish"])
    out = run(
        "step=patchify_stem",
        "data=imagefolder",
        f"data.root={tmp_path / 'data'}",
        "data.workers=0",
        *SMOKE,
        "train.batch_size=6",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "run/summary.json").read_text())["num_classes"] == 3


def test_subset_is_a_fixed_random_choice_across_classes(tmp_path, compose_cfg):
    from ablations.data import image_folder, load_tensors

    _png_folder(tmp_path / "data", ["a", "b", "c", "d"])  # listed class by class: the first 12 would be a-b only
    cfg = compose_cfg("data=imagefolder", f"data.root={tmp_path / 'data'}", "data.train_subset=12")
    sub = image_folder(cfg.data, "train")
    assert len(sub) == 12 and {sub.dataset.targets[i] for i in sub.indices} == {0, 1, 2, 3}
    assert sub.indices == sorted(sub.indices) == image_folder(cfg.data, "train").indices
    syn = compose_cfg("data=synthetic", "data.synthetic_size=64", "data.train_subset=40")
    full = load_tensors(compose_cfg("data=synthetic", "data.synthetic_size=64").data, "train", seed=3)
    a, b = load_tensors(syn.data, "train", seed=3), load_tensors(syn.data, "train", seed=3)
    assert len(a) == 40 and torch.equal(a.images, b.images)
    rows = [int((full.images == img).flatten(1).all(1).nonzero()) for img in a.images]
    assert rows == sorted(rows) and rows != list(range(40))  # a random choice, kept in order


def test_cifar_format(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, n in [*[(f"data_batch_{i}", 20) for i in range(1, 6)], ("test_batch", 30)]:
        batch = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    from ablations.data import load_cifar

    d = load_cifar("cifar10", str(tmp_path), "train")
    assert d.images.shape == (100, 3, 32, 32) and d.labels.shape == (100,)
    out = run(
        "step=depthwise_conv",
        "data=cifar10",
        f"data.root={tmp_path}",
        *SMOKE,
        "train.batch_size=20",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]


USER_MISTAKES = [
    (["data=fashion_mnist", "data.root=/nonexistent/fmnist"], "Fashion-MNIST not found in data.root='/nonexistent"),
    (["data=cifar10", "data.root=/nonexistent"], "cifar10 not found"),
    (["data=imagefolder", "data.root=/nonexistent"], "does not exist"),
    (["data=synthetic", "model.kernel_size=0"], "kernel_size must be a positive integer"),
    (["data=synthetic", "data.img_size=8"], "data.img_size=8 is too small"),
    (["data=synthetic", "train.epochs=0"], "train.epochs must be a whole number"),
    (["data=synthetic", "device=tpu"], "unknown device 'tpu'; valid choices: auto, cpu, cuda"),
    (["data=imagefolder", "profile=imagenet"], "data=imagefolder needs data.root="),
    (["data=fashion_mnist", "profile=imagenet"], "profile=imagenet trains ImageNet-format data"),
]


@pytest.mark.parametrize("args,expect", USER_MISTAKES)
def test_user_mistakes_are_config_errors(tmp_path, compose_cfg, args, expect):
    """Each mistake is a ConfigError with its message (the CLI prints those as one paragraph: next test)."""
    from ablations.train import train
    from models import ConfigError

    with pytest.raises(ConfigError, match=re.escape(expect)):
        train(compose_cfg("step=baseline", *SMOKE, *args), str(tmp_path))


@pytest.mark.parametrize("args,expect", [USER_MISTAKES[0], USER_MISTAKES[4]])
def test_user_mistakes_are_one_paragraph(tmp_path, args, expect):
    out = run("step=baseline", *SMOKE, *args, f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2 and expect in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0


def test_empty_data_folders(tmp_path, compose_cfg):
    from ablations.train import train
    from models import ConfigError

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="Fashion-MNIST not found"):
        train(compose_cfg("step=baseline", *SMOKE, f"data.root={tmp_path / 'empty'}"), str(tmp_path / "r1"))
    (tmp_path / "nocls/train").mkdir(parents=True)
    (tmp_path / "nocls/val").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no usable class folders"):
        train(
            compose_cfg("step=baseline", "data=imagefolder", f"data.root={tmp_path / 'nocls'}", *SMOKE), str(tmp_path)
        )


def test_folder_with_other_config_is_not_clobbered(tmp_path, compose_cfg):
    from ablations.run_folder import prepare
    from ablations.train import train

    first = compose_cfg("step=baseline", "data=synthetic", *SMOKE)  # in-process, as run_ablation.py does it
    assert prepare(first, str(tmp_path)) is None
    train(first, str(tmp_path))
    before = (tmp_path / "summary.json").read_text()
    out = run("step=gelu", "data=synthetic", *SMOKE, f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2 and "different config" in out.stderr and "step: 'baseline' -> 'gelu'" in out.stderr
    assert (tmp_path / "summary.json").read_text() == before


def test_nan_loss_stops_with_message(tmp_path):
    """The CLI's message and 'failed' summary (this diverges in epoch 1; the next test diverges later)."""
    out = run(
        "step=baseline",
        "data=synthetic",
        *SMOKE,
        "train.lr=1e30",
        "train.lr_scaling=none",
        "train.optimizer=sgd",
        f"hydra.run.dir={tmp_path}",
    )
    err = out.stderr.lower()
    assert out.returncode == 2 and ("loss became nan" in err or "loss became inf" in err), out.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


def test_gpu_profile_runs_on_cpu(tmp_path, fmnist_dir):
    """The gpu profile's models and data path (full width, ImageNet stems, 28 px upsampled to 128), one step each."""
    out = run(
        "step=separate_downsampling",
        "profile=gpu",
        "device=cpu",
        f"data.root={fmnist_dir}",
        "train.epochs=1",
        "train.warmup_epochs=0.5",
        "train.batch_size=8",
        "max_steps=1",
        "data.test_subset=16",
        "progress=false",
        f"hydra.run.dir={tmp_path}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["img_size"] == 128 and s["params"] == 28_589_128 - 769 * 990  # ConvNeXt-T, 10-class head
    assert s["train_gflops"] == pytest.approx(4.4555 * (128 / 224) ** 2, rel=0.01)


@pytest.mark.cuda
def test_gpu_bf16_channels_last(tmp_path):
    out = run(
        "step=separate_downsampling",
        "data=synthetic",
        *SMOKE,
        "device=cuda",
        "amp=true",
        "channels_last=true",
        f"hydra.run.dir={tmp_path}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cpu" not in json.loads((tmp_path / "summary.json").read_text())["device"]


def test_divergence_after_a_finished_epoch_keeps_that_epochs_checkpoint(tmp_path, compose_cfg, monkeypatch):
    import ablations.train as T
    from models import RoadmapNet

    real_save = T.RunState.save

    def save_then_poison(self, path, *a):  # after epoch 1's checkpoint, a weight becomes NaN: epoch 2 diverges
        real_save(self, path, *a)
        if self.epoch == 1:
            next(self.model.parameters()).data.fill_(float("nan"))

    monkeypatch.setattr(T.RunState, "save", save_then_poison)
    with pytest.raises(T.TrainingDiverged, match="epoch 2, step 1"):
        _train_in_process(compose_cfg, tmp_path, "train.epochs=3")
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["step"] == 0
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    cfg = compose_cfg("step=fewer_norms", "data=synthetic", "profile=smoke")
    model = RoadmapNet(T.model_config(cfg), num_classes=10)
    model.load_state_dict(ck["model"])  # intact and loadable
    assert [r["epoch"] for r in metrics(tmp_path)] == [1]


def test_clip_grad_bounds_the_update(tmp_path, compose_cfg):
    """Plain SGD, one step, lr 1: the weights move by exactly the clipped gradient (norm <= clip)."""
    import ablations.train as T
    from models import RoadmapNet

    common = ("max_steps=1", "train.optimizer=momentum", "train.momentum=0", "train.lr=1", "train.lr_scaling=none",
              "train.warmup_epochs=0", "train.weight_decay=0", "train.decay_epochs=100")  # fmt: skip
    cfg = compose_cfg("step=fewer_norms", "data=synthetic", "profile=smoke")
    torch.manual_seed(0)
    from ablations.data import derive_seed, seed_all

    seed_all(derive_seed(0))
    start = RoadmapNet(T.model_config(cfg), num_classes=10).state_dict()

    def moved(run):
        end = torch.load(run / "last.pt", weights_only=True)["model"]
        return torch.cat([(end[k] - start[k]).flatten() for k in start if start[k].is_floating_point()
                          and "running" not in k]).norm().item()  # fmt: skip

    _train_in_process(compose_cfg, tmp_path / "free", *common)
    _train_in_process(compose_cfg, tmp_path / "clip", *common, "train.clip_grad=0.01")
    assert moved(tmp_path / "free") > 0.1
    assert moved(tmp_path / "clip") == pytest.approx(0.01, rel=1e-3)


def test_eval_every_skips_evaluation_between(tmp_path, compose_cfg):
    _train_in_process(compose_cfg, tmp_path, "train.epochs=3", "train.eval_every=2", "max_steps=1")
    m = metrics(tmp_path)
    assert [r["top1"] is None for r in m] == [True, False, False]  # epoch 2 (every 2nd) and the last


def test_pretrained_checkpoint_starts_a_training_run(tmp_path, compose_cfg):
    """This project's own last.pt as pretrained=: the new run starts from exactly those weights."""
    _train_in_process(compose_cfg, tmp_path / "first", "max_steps=2")
    first = torch.load(tmp_path / "first/last.pt", weights_only=True)["model"]
    tiny = ("train.optimizer=momentum", "train.momentum=0", "train.lr=1e-30", "train.lr_scaling=none",
            "train.warmup_epochs=0", "train.weight_decay=0", "max_steps=1")  # fmt: skip
    _train_in_process(compose_cfg, tmp_path / "second", f"pretrained={tmp_path / 'first/last.pt'}", *tiny)
    second = torch.load(tmp_path / "second/last.pt", weights_only=True)["model"]
    for k in first:
        if "running" not in k and "num_batches" not in k:  # BatchNorm statistics follow the new batch
            assert torch.equal(first[k], second[k]), k


@pytest.mark.parametrize(
    "overrides,expect",
    [
        (("train.batch_size=10", "train.grad_accum=3"), "must divide by processes x grad_accum = 1 x 3"),
        (
            ("train.batch_size=6", "train.grad_accum=2", "train.mixup=0.8"),
            "Mixup/CutMix need an even per-process batch, got 3",
        ),
        (("data.train_subset=10",), "fewer images per process (10) than one batch (64)"),
        (("train.optimizer=adamx",), "train.optimizer='adamx'"),
        (("train.randaug=rand-m9-q",), "train.randaug"),
    ],
)
def test_training_mistakes_are_clear(tmp_path, compose_cfg, overrides, expect):
    from models import ConfigError

    with pytest.raises(ConfigError, match=re.escape(expect)):
        _train_in_process(compose_cfg, tmp_path, *overrides)


def test_gpu_profile_is_picked_when_cuda_is_present(monkeypatch):
    import run_ablation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run_ablation._default_profile(["run_ablation.py", "step=gelu"]) == [
        "run_ablation.py",
        "step=gelu",
        "profile=gpu",
    ]
    assert run_ablation._default_profile(["x", "profile=cpu"]) == ["x", "profile=cpu"]  # an explicit choice wins
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_ablation._default_profile(["x", "step=gelu"]) == ["x", "step=gelu"]


def test_paper_scale_complexity_is_cached_per_model(tmp_path, monkeypatch):
    import ablations.train as T
    from models import step_config

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    counted = []
    real = T.complexity
    monkeypatch.setattr(T, "complexity", lambda m, s: counted.append(s) or real(m, s))
    a = T._paper_complexity(step_config("gelu"))
    assert T._paper_complexity(step_config("gelu")) == a and counted == [224]  # the second call reads the cache
    b = T._paper_complexity(step_config("gelu", kernel_size=5))  # another model: counted again
    assert counted == [224, 224] and b["gflops"] < a["gflops"]
    assert round(a["gflops"], 2) == 4.15 and len(list((tmp_path / "convnext-roadmap").glob("*.json"))) == 2
