"""Training: recipes run, loss falls, resume is exact, kills lose nothing, DDP matches one process, errors are clear."""

from __future__ import annotations

import json
import os
import pickle
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
    assert 0 <= s["top1"] <= 100 and set(metrics(tmp_path)[0]) >= {
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


def test_ddp_two_gloo_processes_match_one(tmp_path):
    common = [
        "step=separate_downsampling",
        "data=synthetic",
        *SMOKE,
        "device=cpu",
        "max_steps=1",
        "train.batch_size=16",
        "train.hflip=0",
        "train.translate=0",
        "train.label_smoothing=0",
    ]
    one = run(*common, f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29517",
            "run_ablation.py",
            *common,
            f"hydra.run.dir={tmp_path / 'two'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    l1, l2 = metrics(tmp_path / "one")[0]["train_loss"], metrics(tmp_path / "two")[0]["train_loss"]
    assert l1 == pytest.approx(l2, abs=2e-4)
    assert json.loads((tmp_path / "two/summary.json").read_text())["world_size"] == 2


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


@pytest.mark.parametrize(
    "args,expect",
    [
        (["data=fashion_mnist", "data.root=/nonexistent/fmnist"], "Fashion-MNIST not found in data.root='/nonexistent"),
        (["data=cifar10", "data.root=/nonexistent"], "cifar10 not found"),
        (["data=imagefolder", "data.root=/nonexistent"], "does not exist"),
        (["data=synthetic", "model.kernel_size=0"], "kernel_size must be a positive integer"),
        (["data=synthetic", "data.img_size=8"], "data.img_size=8 is too small"),
        (["data=synthetic", "train.epochs=0"], "train.epochs must be a whole number"),
        (["data=synthetic", "device=tpu"], "unknown device 'tpu'; valid choices: auto, cpu, cuda"),
    ],
)
def test_user_mistakes_are_one_paragraph(tmp_path, args, expect):
    out = run("step=baseline", *SMOKE, *args, f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2 and expect in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_empty_data_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    out = run("step=baseline", *SMOKE, f"data.root={tmp_path / 'empty'}", f"hydra.run.dir={tmp_path / 'r1'}")
    assert out.returncode == 2 and "Fashion-MNIST not found" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "nocls/train").mkdir(parents=True)
    (tmp_path / "nocls/val").mkdir(parents=True)
    out = run(
        "step=baseline",
        "data=imagefolder",
        f"data.root={tmp_path / 'nocls'}",
        *SMOKE,
        f"hydra.run.dir={tmp_path / 'r2'}",
    )
    assert out.returncode == 2 and "no usable class folders" in out.stderr and "Traceback" not in out.stderr


def test_folder_with_other_config_is_not_clobbered(tmp_path):
    assert run("step=baseline", "data=synthetic", *SMOKE, f"hydra.run.dir={tmp_path}").returncode == 0
    before = (tmp_path / "summary.json").read_text()
    out = run("step=gelu", "data=synthetic", *SMOKE, f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2 and "different config" in out.stderr and "step: 'baseline' -> 'gelu'" in out.stderr
    assert (tmp_path / "summary.json").read_text() == before


def test_nan_loss_stops_with_message(tmp_path):
    out = run(
        "step=baseline",
        "data=synthetic",
        *SMOKE,
        "train.lr=1e30",
        "train.lr_scaling=none",
        "train.optimizer=sgd",
        "train.epochs=2",
        "max_steps=60",
        "data.synthetic_size=1024",
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
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
