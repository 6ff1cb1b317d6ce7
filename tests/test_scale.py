"""The cluster path on CPU: DDP through torchrun and submitit (gloo), rank-agreed decisions, sharded evaluation,
seed streams, GPU leases, core shares, and exact resume after a mid-epoch stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ddp_helpers import DDP_RUN, _assert_same_training, _env, _lines, _run, _torchrun
from ddp_helpers import free_port as _free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_grad_accum_alone_equals_one_big_batch(single, tmp_path):
    out = _run([*DDP_RUN, "train.grad_accum=2", f"hydra.run.dir={tmp_path}"])
    assert out.returncode == 0, out.stderr[-3000:]
    _assert_same_training(single, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_torchrun_two_processes_train_like_one(single, tmp_path, accum):
    """Weights after 3 SGD steps x 2 epochs equal the single-process run's (they would not without the gradient
    all-reduce; grad_accum=2 goes through DDP's no_sync); the sharded top-1 equals the single-process top-1."""
    out = _run([*DDP_RUN, f"train.grad_accum={accum}", f"hydra.run.dir={tmp_path}"], _torchrun(2, 29521 + accum))
    assert out.returncode == 0, out.stderr[-3000:]
    _assert_same_training(single, tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["world_size"] == 2 and s["status"] == "finished"
    if accum == 1:  # re-running the finished job: every rank reports it and exits (no rank waits in training)
        t0 = time.time()
        again = _run([*DDP_RUN, f"train.grad_accum={accum}", f"hydra.run.dir={tmp_path}"], _torchrun(2, 29529), 60)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "already finished" in again.stderr + again.stdout and time.time() - t0 < 60


@pytest.mark.slow
def test_submitit_local_two_tasks_form_one_ddp_group(single, tmp_path):
    """Also with MASTER_PORT already exported (a user's, or a parent job's): submitit's own export() refuses to
    overwrite it, so the port the user set is kept instead."""
    env = _env(MASTER_PORT=str(_free_port()))
    env.pop("OMP_NUM_THREADS")  # each task must take its own share of the cores (2 cores / 2 tasks here)
    out = subprocess.run(
        [sys.executable, "run_ablation.py", "-m", *DDP_RUN, "hydra/launcher=submitit_local",
         "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=5", f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    runs = [p.parent for p in tmp_path.glob("*/seed0/summary.json")]
    assert len(runs) == 1, runs  # one run folder for the two tasks
    s = json.loads((runs[0] / "summary.json").read_text())
    assert s["world_size"] == 2 and s["status"] == "finished"
    _assert_same_training(single, runs[0])  # one metrics line per epoch, same weights and top-1
    log = (runs[0] / "run_ablation.log").read_text()
    cores = len(os.sched_getaffinity(0))
    assert f"process 1/2 (local 1/2): {max(1, cores // 2)} threads ({cores} cores / 2 processes)" in log


# --------------------------------------------------------------------------------------- sharded evaluation
def _eval_worker(rank: int, world: int, port: int, cfg_dict: dict, out: str) -> None:
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from ablations.data import Data
    from ablations.train import evaluate, model_config
    from models import RoadmapNet

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = OmegaConf.create(cfg_dict)
    data = Data(cfg, torch.device("cpu"), rank, world, 8)
    torch.manual_seed(0)
    model = RoadmapNet(model_config(cfg), num_classes=10)
    top1, top5 = evaluate(model, data, lambda: torch.autocast("cpu", enabled=False))
    local = sum(len(y) for _, y in data.test_batches())  # this rank's shard
    if rank == 0:
        Path(out).write_text(json.dumps([top1, top5, data.test_size, local]))
    if world > 1:
        dist.destroy_process_group()


def test_sharded_evaluation_equals_one_process(compose_cfg, tmp_path):
    from omegaconf import OmegaConf

    cfg = compose_cfg("step=gelu", "data=synthetic", "profile=smoke", "data.test_subset=101")
    d = OmegaConf.to_container(cfg, resolve=True)
    _eval_worker(0, 1, 0, d, str(tmp_path / "one.json"))
    torch.multiprocessing.spawn(_eval_worker, args=(2, 29541, d, str(tmp_path / "two.json")), nprocs=2)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one[2:] == [101, 101] and two[2:] == [101, 51]  # rank 0 evaluated its shard only (51 of 101)
    assert one[:2] == two[:2]  # top-1 and top-5 from summed integer counts: exactly the single-process numbers
    assert 0 < one[1] <= 100 and one[0] != one[1]


# ------------------------------------------------------------------------------------------ seed streams
def test_seed_streams_never_collide():
    from ablations.data import AUGMENT, derive_seed

    keys = [(s, e, r) for s in range(8) for e in range(301) for r in range(32)]
    seeds = {derive_seed(s, AUGMENT, e, 0, r) for s, e, r in keys}
    assert len(seeds) == len(keys)
    steps = {derive_seed(0, AUGMENT, 1, k, 0) for k in range(5000)}
    assert len(steps) == 5000
    # the old scheme, for contrast: seed s at epoch e+100 was seed s+1 at epoch e, and ranks >= 10 crossed epochs
    old = {s * 1000 + e * 10 + r for s, e, r in keys}
    assert len(old) < len(keys)


def test_data_order_is_one_permutation_split_over_ranks():
    from ablations.data import epoch_order

    one = epoch_order(103, 3, 5, True)
    parts = [epoch_order(103, 3, 5, True, r, 4) for r in range(4)]
    assert torch.equal(torch.stack(parts, 1).flatten(), one[:100])  # the ranks' batches interleave to one
    assert not torch.equal(epoch_order(103, 3, 6, True), one) and not torch.equal(epoch_order(103, 4, 5, True), one)


# ------------------------------------------------------------------------------------------ cores and GPUs
def test_each_process_takes_its_share_of_the_cores(monkeypatch):
    from ablations.dist import cpu_share

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert cpu_share(4) == (4, "16 cores / 4 processes")
    assert cpu_share(1) == (16, "16 cores / 1 processes")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")  # the scheduler's number wins over the cores torch sees
    assert cpu_share(8) == (6, "SLURM_CPUS_PER_TASK")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_share(8) == (3, "OMP_NUM_THREADS")


def test_gpu_leases_give_each_job_a_free_gpu(tmp_path):
    from ablations.dist import gpu_lease

    got = []
    with gpu_lease(2, str(tmp_path), poll_s=0.05) as a, gpu_lease(2, str(tmp_path), poll_s=0.05) as b:
        assert {a, b} == {0, 1}

        def third():
            with gpu_lease(2, str(tmp_path), poll_s=0.05) as c:
                got.append(c)

        t = threading.Thread(target=third)
        t.start()
        time.sleep(0.3)
        assert got == []  # both GPUs busy: the third job waits instead of doubling up on one
    t.join(5)
    assert got and got[0] in (0, 1)


# -------------------------------------------------------------------------------- exact resume mid-epoch
MODERN_RANDOMNESS = (
    "train.mixup=0.8",
    "train.cutmix=1.0",
    "train.randaug=rand-m9-mstd0.5-inc1",
    "train.reprob=0.25",
    "train.drop_path_rate=0.1",
    "train.ema=true",
    "train.ema_decay=0.9",
    "train.translate=0.125",
)


def _train(compose_cfg, run_dir, *overrides):
    from ablations.train import train

    cfg = compose_cfg("step=fewer_norms", "data=synthetic", "profile=smoke", "max_steps=6", "train.epochs=2",
                      *MODERN_RANDOMNESS, *overrides)  # fmt: skip
    return train(cfg, str(run_dir))


def _same_run(a: Path, b: Path) -> None:
    ca, cb = (torch.load(p / "last.pt", weights_only=True) for p in (a, b))
    assert ca["epoch"] == cb["epoch"] == 2 and ca["step"] == cb["step"] == 0
    for part in ("model", "ema"):
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), (part, k)
    for k, v in ca["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], cb["optimizer"]["state"][k]["exp_avg"]), k
    timing = {"epoch_s", "img_per_s"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(_lines(a)) == strip(_lines(b)) and len(_lines(a)) == 2


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 2-epoch run with the modern recipe's randomness and EMA on."""
    import hydra

    d = tmp_path_factory.mktemp("straight")
    with hydra.initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        from ablations.train import train

        cfg = hydra.compose("config", overrides=["step=fewer_norms", "data=synthetic", "profile=smoke",
                                                 "max_steps=6", "train.epochs=2", *MODERN_RANDOMNESS])  # fmt: skip
        train(cfg, str(d))
    return d


def test_sigterm_mid_epoch_then_resume_is_exact(straight, tmp_path, compose_cfg, monkeypatch):
    import ablations.train as T
    from ablations.dist import Preempted

    calls = {"n": 0}
    real = T.seed_all

    def seed_then_signal(seed):  # seed_all runs once per optimizer step: signal during epoch 2, step 3
        calls["n"] += 1
        if calls["n"] == 1 + 6 + 3:
            os.kill(os.getpid(), signal.SIGTERM)
        real(seed)

    monkeypatch.setattr(T, "seed_all", seed_then_signal)
    with pytest.raises(Preempted, match="run the same command again"):
        _train(compose_cfg, tmp_path)
    monkeypatch.setattr(T, "seed_all", real)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (ck["epoch"], ck["step"]) == (1, 3) and "rng" not in ck  # the exact position, no per-device RNG state
    assert signal.getsignal(signal.SIGTERM) is not None  # the guard put the previous handler back
    _train(compose_cfg, tmp_path)
    _same_run(straight, tmp_path)


def test_timed_checkpoint_then_kill_resumes_exactly(straight, tmp_path, compose_cfg, monkeypatch):
    import ablations.train as T

    saves = []
    real = T.atomic_save

    def save_then_die_mid_epoch(obj, path):
        real(obj, path)
        saves.append((obj["epoch"], obj["step"]))
        if obj["step"] == 4 and obj["epoch"] == 0:  # a timed save in the middle of epoch 1: then the node dies
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "atomic_save", save_then_die_mid_epoch)
    with pytest.raises(KeyboardInterrupt):
        _train(compose_cfg, tmp_path, "train.ckpt_every_min=1e-9")
    assert saves == [(0, 1), (0, 2), (0, 3), (0, 4)]  # every step, since the interval is tiny
    monkeypatch.setattr(T, "atomic_save", real)
    _train(compose_cfg, tmp_path)
    _same_run(straight, tmp_path)


def test_resume_after_a_finished_epoch_is_exact(straight, tmp_path, compose_cfg, monkeypatch):
    import ablations.train as T

    real = T.atomic_save

    def save_then_die(obj, path):
        real(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "atomic_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _train(compose_cfg, tmp_path)
    monkeypatch.setattr(T, "atomic_save", real)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    _train(compose_cfg, tmp_path)
    _same_run(straight, tmp_path)


@pytest.mark.slow
def test_sigterm_from_outside_saves_and_says_how_to_resume(tmp_path):
    args = ["step=bn_to_ln", "data=synthetic", "profile=smoke", "progress=false", "data.synthetic_size=4096",
            "data.train_subset=null", "max_steps=null", "train.epochs=2", f"hydra.run.dir={tmp_path}"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "run_ablation.py", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "complexity.json").exists():
        time.sleep(0.1)
    time.sleep(2.0)  # into epoch 1 (64 steps of ~0.05 s)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "preempted" in err and "run the same command again" in err and "Traceback" not in err
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["epoch"] == 0 and 0 < ck["step"] < 64
    assert not (tmp_path / "summary.json").exists()


# ------------------------------------------------------------------------------------- the recipes' details
def test_imagenet_profile_trains_image_folders_only(compose_cfg):
    from ablations.train import check_numbers
    from models import ConfigError

    assert compose_cfg("profile=imagenet").data.name == "imagefolder"
    with pytest.raises(ConfigError, match="data.root"):
        check_numbers(compose_cfg("profile=imagenet"))
    with pytest.raises(ConfigError, match="profile=imagenet trains ImageNet-format data, but data=fashion_mnist"):
        check_numbers(compose_cfg("profile=imagenet", "data=fashion_mnist"))


def test_classic_recipe_decays_every_parameter_and_modern_does_not(compose_cfg):
    from ablations.train import _optimizer
    from models import build_model

    model = build_model("baseline", num_classes=10)
    classic = _optimizer(model, compose_cfg("train=classic"))
    assert type(classic) is torch.optim.SGD and [g["weight_decay"] for g in classic.param_groups] == [1e-4]
    assert classic.defaults["momentum"] == 0.9 and classic.defaults["nesterov"] is False  # the 2015 recipe
    assert sum(p.numel() for g in classic.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )
    modern = _optimizer(model, compose_cfg("train=modern"))
    assert sorted(g["weight_decay"] for g in modern.param_groups) == [0.0, 0.05]  # biases and norms excluded


def test_image_folder_augmentation_is_the_papers(compose_cfg, tmp_path):
    """Workers crop, flip and RandAugment into uint8 (timm's prefetcher convention); random erasing in pixel mode
    runs on the device batch; the original recipe has neither RandAugment nor erasing."""
    from test_train import _png_folder
    from timm.data.random_erasing import RandomErasing
    from torchvision import transforms as T

    from ablations.data import Data, image_folder

    _png_folder(tmp_path, ["a", "b"])
    modern = compose_cfg("profile=imagenet", f"data.root={tmp_path}", "data.img_size=32", "data.workers=0")
    tf = image_folder(modern.data, "train", modern.train).transform.transforms
    names = [type(t).__name__ for t in tf]
    assert names[-1] == "MaybePILToTensor" and any("RandAugment" in n for n in names), names
    assert not any(isinstance(t, (RandomErasing, T.Normalize)) for t in tf)  # both on the device
    data = Data(modern, torch.device("cpu"), 0, 1, 4)
    assert isinstance(data.augment.erase, RandomErasing)
    assert data.augment.erase.mode == "pixel" and data.augment.erase.probability == 0.25
    x, y = next(iter(data.train))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32)  # uint8 through the workers' shared memory
    classic = compose_cfg("data=imagefolder", f"data.root={tmp_path}", "data.img_size=32", "train=classic")
    names = [type(t).__name__ for t in image_folder(classic.data, "train", classic.train).transform.transforms]
    assert not any(isinstance(t, T.ColorJitter) for t in tf) and "ColorJitter" not in names
    assert names[:2] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"], names
    assert not any("RandAugment" in n or "Erasing" in n for n in names)
    assert Data(classic, torch.device("cpu"), 0, 1, 4).augment.erase is None


def test_stochastic_depth_follows_the_regime_and_can_be_overridden(compose_cfg):
    assert compose_cfg("regime=r50", "profile=imagenet").train.drop_path_rate == 0.1  # ConvNeXt-T
    assert compose_cfg("regime=r200", "profile=imagenet").train.drop_path_rate == 0.5  # ConvNeXt-B
    assert compose_cfg("regime=r200", "profile=imagenet", "train.drop_path_rate=0.3").train.drop_path_rate == 0.3
    assert compose_cfg("regime=r200", "profile=imagenet", "train=classic").train.drop_path_rate == 0.0


@pytest.mark.slow
def test_mixup_on_an_image_folder_uses_the_classes_found(tmp_path):
    from test_train import _png_folder

    _png_folder(tmp_path / "data", ["cat", "dog", "fish"])
    for n_cfg in (1000, 2):  # ImageNet's config on a 3-class folder, and a config that says fewer classes
        run_dir = tmp_path / str(n_cfg)
        out = _run(["step=patchify_stem", "data=imagefolder", f"data.root={tmp_path / 'data'}", "data.workers=0",
                    "profile=smoke", "progress=false", f"data.num_classes={n_cfg}", "train.batch_size=6",
                    "train.mixup=0.8", "train.cutmix=1.0", "train.reprob=0.25",
                    f"hydra.run.dir={run_dir}"])  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        assert json.loads((run_dir / "summary.json").read_text())["num_classes"] == 3


def test_checkpoint_holds_nothing_tied_to_the_device_count(tmp_path, compose_cfg):
    _train(compose_cfg, tmp_path, "train.epochs=1", "max_steps=1")
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert set(ck) == {"model", "optimizer", "scheduler", "ema", "epoch", "step", "partial", "history", "wall_s",
                       "model_config", "config"}  # fmt: skip
    assert np.isfinite(ck["wall_s"])
