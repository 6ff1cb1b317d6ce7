"""The cluster and ImageNet path, round 2, on CPU: the per-device batch, preemption of image-folder runs with loader
workers, plain srun launches, thread shares under torchrun in a SLURM task, evaluation with one set of BatchNorm
statistics, the official lr schedule, EMA and best epoch, TF32, the image-folder data path, cluster sweeps naming
their profile, and every GPU code path (bf16, compile + DDP, the gpu / imagenet profiles) run on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ddp_helpers import DDP_RUN, _assert_same_training, _env, _lines, _run, _torchrun, _weights
from ddp_helpers import free_port as _free_port

ROOT = Path(__file__).resolve().parents[1]


def _jpeg_folder(root: Path, classes=("cat", "dog"), train: int = 200, val: int = 16, size=(96, 72)) -> Path:
    """A tiny ImageNet-layout folder of JPEGs (colour and grey)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for k, c in enumerate(classes):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n // len(classes)):
                arr = rng.integers(0, 80, (size[1], size[0], 3), dtype=np.uint8)
                arr[:, 10 * k : 10 * k + 20] = 255  # learnable: a bright band per class
                img = Image.fromarray(arr)
                (img.convert("L") if i % 5 == 0 else img).save(root / split / c / f"{i}.jpg", quality=90)
    return root


# 1. the per-device batch ------------------------------------------------------------------------------------
def test_batch_per_device_gives_grad_accum_on_any_gpu_count(compose_cfg):
    """profile=imagenet: 4096 images per step as 128 per GPU on 1, 8 or 32 GPUs; a batch that does not divide is
    one clear error."""
    from ablations.train import BatchSplit, batch_split
    from models import ConfigError

    t = compose_cfg("profile=imagenet").train
    assert (t.batch_size, t.batch_per_device) == (4096, 128)
    assert [batch_split(t, w) for w in (1, 8, 32)] == [BatchSplit(32, 128), BatchSplit(4, 128), BatchSplit(1, 128)]
    with pytest.raises(ConfigError, match=r"multiple of processes x train.batch_per_device = 3 x 128 = 384"):
        batch_split(t, 3)
    with pytest.raises(ConfigError, match="disagree"):
        batch_split(compose_cfg("profile=imagenet", "train.grad_accum=2").train, 1)
    gpu = compose_cfg("profile=gpu").train  # no batch_per_device: grad_accum as given (one GPU, 512)
    assert batch_split(gpu, 1) == BatchSplit(1, 512) and batch_split(gpu, 4) == BatchSplit(1, 128)


def test_a_run_folder_resumes_on_another_gpu_count(compose_cfg, tmp_path):
    """The folder compare ignores how the global batch is split (grad_accum, batch_per_device, workers), not the
    global batch itself."""
    from ablations.run_folder import RunFolderError, prepare

    base = ("step=gelu", "profile=smoke", "data=synthetic")
    assert prepare(compose_cfg(*base, "train.grad_accum=4"), str(tmp_path)) is None
    assert prepare(compose_cfg(*base, "train.grad_accum=2", "train.batch_per_device=16"), str(tmp_path)) is None
    with pytest.raises(RunFolderError, match=r"train.batch_size: 64 -> 128"):
        prepare(compose_cfg(*base, "train.batch_size=128"), str(tmp_path))


# 2. preemption of an image-folder run with loader workers -----------------------------------------------------
JPEG_RUN = ["step=patchify_stem", "data=imagefolder", "data.workers=2", "profile=smoke", "progress=false",
            "max_steps=null", "data.train_subset=null", "data.test_subset=null", "train.batch_size=4",
            "train.epochs=1", "data.img_size=32", "log_every=1"]  # fmt: skip


@pytest.mark.slow
def test_killpg_sigterm_checkpoints_an_image_folder_run_with_workers(tmp_path):
    """SLURM signals the whole process group: the workers must not die of it. The run saves its exact step, exits
    143, and the rerun ends with the metrics and weights of the uninterrupted run."""
    data = _jpeg_folder(tmp_path / "data", train=400)
    args = [*JPEG_RUN, f"data.root={data}"]
    ref = _run([*args, f"hydra.run.dir={tmp_path / 'ref'}"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "run_ablation.py", *args, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    log = run_dir / "run_ablation.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "training epochs" in log.read_text()):
        time.sleep(0.05)
    time.sleep(0.5)  # the loader's workers are up and some of the 100 steps are done
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group: the trainer and its two workers
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "killed by signal" not in err and "Traceback" not in err
    ck = torch.load(run_dir / "last.pt", weights_only=True)
    assert ck["epoch"] == 0 and 0 < ck["step"] < 100, (ck["epoch"], ck["step"])  # mid-epoch, at its exact step
    again = _run([*args, f"hydra.run.dir={run_dir}"])
    assert again.returncode == 0, again.stderr[-3000:]
    timing = {"epoch_s", "img_per_s"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(_lines(run_dir)) == strip(_lines(tmp_path / "ref"))
    a, b = _weights(run_dir), _weights(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loader_workers_ignore_stop_signals(tmp_path, compose_cfg):
    """The image-folder loaders' workers are started with a worker_init_fn that ignores SIGTERM / SIGUSR1 / SIGINT,
    and hand over uint8 batches."""
    from ablations.data import Data
    from ablations.dist import ignore_stop_signals

    cfg = compose_cfg(*JPEG_RUN[:-1], f"data.root={_jpeg_folder(tmp_path, train=8, val=4)}")
    data = Data(cfg, torch.device("cpu"), 0, 1, 4)
    assert data.train.worker_init_fn is ignore_stop_signals and data.test.worker_init_fn is ignore_stop_signals
    x, _ = next(iter(data.train))
    assert x.dtype == torch.uint8  # a quarter of float32 through /dev/shm
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        ignore_stop_signals(0)
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in before)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


# 3. a plain srun launch --------------------------------------------------------------------------------------
def _srun_env(rank: int, port: int, **extra) -> dict:
    env = _env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="1",
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port), **extra)  # fmt: skip
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "SUBMITIT_EXECUTOR"):
        env.pop(k, None)
    return env


@pytest.mark.slow
def test_plain_srun_tasks_form_one_ddp_group(single, tmp_path):
    """`srun --ntasks-per-node=2 python run_ablation.py ...`: SLURM's variables make the two tasks one DDP group
    (rank / world / local rank, MASTER_ADDR from the node list): one folder, the single process's training."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "run_ablation.py", *DDP_RUN, f"hydra.run.dir={tmp_path}"], cwd=ROOT,
                              env=_srun_env(r, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["world_size"] == 2 and s["status"] == "finished"
    _assert_same_training(single, tmp_path)


def test_plain_srun_without_a_readable_node_list_says_what_to_export(monkeypatch):
    from ablations import dist as D
    from models import ConfigError

    for k, v in _srun_env(1, 12345).items():
        monkeypatch.setenv(k, v)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")  # recorded, so that what _export_slurm exports is undone after the test
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[01-0")  # unparsable, and no scontrol here
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match=r"export MASTER_ADDR=\$\(scontrol show hostnames"):
        D._export_slurm()
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08,11]")
    D._export_slurm()
    env = os.environ
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("1", "2", "1", "gpu07")
    assert 20000 <= int(env["MASTER_PORT"]) <= 60000
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")  # python started in the batch script itself: one process
    D._export_slurm()
    assert "RANK" not in os.environ


# 5. threads under torchrun inside one SLURM task -------------------------------------------------------------
def test_torchrun_processes_inside_one_slurm_task_share_its_cpus(monkeypatch):
    from ablations.dist import cpu_share

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "96")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")  # srun -c96 torchrun --nproc_per_node 8
    assert cpu_share(8) == (12, "SLURM_CPUS_PER_TASK / 8 torchrun processes")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # srun --ntasks-per-node 8 -c12: one process per task
    assert cpu_share(8) == (96, "SLURM_CPUS_PER_TASK")


# 6. evaluation with one set of BatchNorm statistics ----------------------------------------------------------
@pytest.mark.slow
def test_ddp_evaluation_uses_rank0_batchnorm_statistics(compose_cfg, tmp_path):
    """A BatchNorm step on 2 processes: the sharded top-1 / top-5 are exactly what one process gives with the saved
    weights and buffers (each rank's own running statistics would give other counts)."""
    from ablations.data import Data
    from ablations.train import evaluate, model_config
    from models import RoadmapNet

    args = [a if not a.startswith("step=") else "step=baseline" for a in DDP_RUN] + ["train.lr=0.05"]
    out = _run([*args, f"hydra.run.dir={tmp_path}"], _torchrun(2, _free_port()))
    assert out.returncode == 0, out.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    cfg = compose_cfg(*args)
    data = Data(cfg, torch.device("cpu"), 0, 1, 8)
    model = RoadmapNet(model_config(cfg), num_classes=10)
    model.load_state_dict(_weights(tmp_path))
    model.to(memory_format=torch.channels_last)
    top1, top5 = evaluate(model, data, lambda: torch.autocast("cpu", enabled=False))
    assert (s["top1"], s["top5"]) == (top1, top5)


def test_evaluation_copies_to_the_device_once_not_per_batch(compose_cfg, monkeypatch):
    from ablations.data import Data
    from ablations.train import evaluate, model_config
    from models import RoadmapNet

    cfg = compose_cfg("step=gelu", "data=synthetic", "profile=smoke", "data.test_subset=600")  # 3 batches of 256
    data = Data(cfg, torch.device("cpu"), 0, 1, 8)
    model = RoadmapNet(model_config(cfg), num_classes=10)
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(k.get("device")) or real(*a, **k))
    evaluate(model, data, lambda: torch.autocast("cpu", enabled=False))
    assert len(made) == 1  # the image count, once per evaluation


def test_test_batches_come_in_the_runs_memory_format(compose_cfg):
    from ablations.data import Data

    for cl in (True, False):
        cfg = compose_cfg("step=gelu", "data=synthetic", "profile=smoke", f"channels_last={cl}")
        x, _ = next(Data(cfg, torch.device("cpu"), 0, 1, 8).test_batches())
        assert x.is_contiguous(memory_format=torch.channels_last) == cl


def test_loader_workers_follow_the_core_share(compose_cfg, monkeypatch):
    from ablations.data import loader_workers
    from models import ConfigError

    d = compose_cfg("data=imagefolder", "data.root=/x").data
    assert d.workers is None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 10)  # dist.setup set this process's share: 10 cores
    assert loader_workers(d) == 9
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert loader_workers(d) == 1
    assert loader_workers(compose_cfg("data=imagefolder", "data.root=/x", "data.workers=3").data) == 3
    with pytest.raises(ConfigError, match="data.workers must be >= 0"):
        loader_workers(compose_cfg("data=imagefolder", "data.root=/x", "data.workers=-1").data)


# 7. the lr schedule ------------------------------------------------------------------------------------------
def official_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """facebookresearch/ConvNeXt utils.cosine_scheduler, as written there (warmup_steps=-1)."""
    import math

    warmup_schedule = np.array([])
    warmup_iters = int(warmup_epochs * niter_per_ep)
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = np.array(
        [final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * i / (len(iters)))) for i in iters]
    )
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


@pytest.mark.parametrize("epochs,steps,warmup", [(2, 375, 0.2), (5, 100, 1), (300, 312, 20)])
def test_lr_schedule_is_the_official_cosine(compose_cfg, epochs, steps, warmup):
    """The lr of every optimizer step (as the official engine applies schedule[it] before update it) against the
    official formula: the peak is reached, and the largest difference is the one-step convention of the warm-up's
    end (timm's warm-up reaches the peak one step after np.linspace does): 1 / warm-up steps of the peak."""
    from ablations.train import setup_schedule

    t = compose_cfg("train=modern", f"train.epochs={epochs}", f"train.warmup_epochs={warmup}").train
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=t.lr)
    sched = setup_schedule(opt, t, steps)
    ours = []
    for it in range(epochs * steps):
        ours.append(opt.param_groups[0]["lr"])
        sched.step_update(it + 1)  # as train_step: after update it+1
    ours = np.array(ours)
    official = official_cosine_scheduler(t.lr, t.min_lr, epochs, steps, warmup)
    worst = np.abs(ours - official).max() / t.lr
    assert ours.max() == pytest.approx(t.lr, rel=1e-9)  # the peak is reached
    assert worst <= 1 / (warmup * steps) + 1e-9, worst
    after = int(warmup * steps)
    assert np.abs(ours[after:] - official[after:]).max() <= 1e-9 * t.lr  # the cosine part: the same numbers


# 8. EMA: both evaluated, best epoch reported ------------------------------------------------------------------
def test_ema_and_model_are_both_evaluated_and_the_best_epoch_is_reported(compose_cfg, tmp_path):
    from ablations.data import Data
    from ablations.train import evaluate, model_config, train
    from models import RoadmapNet

    overrides = ("step=fewer_norms", "data=synthetic", "profile=smoke", "max_steps=3", "train.epochs=3",
                 "train.ema=true", "train.ema_decay=0.9999")  # fmt: skip
    s = train(compose_cfg(*overrides), str(tmp_path))
    rows = _lines(tmp_path)
    assert all(r["top1"] is not None and r["top1_ema"] is not None for r in rows)
    best = max(r["top1"] for r in rows)
    assert s["best_top1"] == best and s["best_epoch"] == next(r["epoch"] for r in rows if r["top1"] == best)
    assert s["top1"] == rows[-1]["top1"] and s["top1_ema"] == rows[-1]["top1_ema"]
    assert s["best_top1_ema"] == max(r["top1_ema"] for r in rows)
    cfg = compose_cfg(*overrides)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    data = Data(cfg, torch.device("cpu"), 0, 1, 8)
    for part, key in (("model", "top1"), ("ema", "top1_ema")):  # each number is its own weights'
        model = RoadmapNet(model_config(cfg), num_classes=10).to(memory_format=torch.channels_last)
        model.load_state_dict({k.removeprefix("module."): v for k, v in ck[part].items()})
        assert evaluate(model, data, lambda: torch.autocast("cpu", enabled=False))[0] == rows[-1][key], part


# 9. TF32 ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_is_set_explicitly_on_cuda(compose_cfg, monkeypatch, tf32):
    import ablations.train as T

    monkeypatch.setattr(T, "pick_device", lambda name, index=0: torch.device("cuda", 0))
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = (not tf32), (not tf32)
        T.setup_env(compose_cfg("profile=smoke", f"tf32={tf32}"), None)
        assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = before


# 11. the profile of a cluster sweep ---------------------------------------------------------------------------
def test_a_cluster_sweep_must_name_its_profile(monkeypatch):
    import run_ablation
    from models import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a login node without a GPU
    argv = ["run_ablation.py", "-m", "+sweep=roadmap", "hydra/launcher=submitit_slurm"]
    with pytest.raises(ConfigError, match="name it, e.g. profile=gpu"):
        run_ablation._default_profile(argv)
    assert run_ablation._default_profile([*argv, "profile=gpu"]) == [*argv, "profile=gpu"]
    local = ["run_ablation.py", "-m", "+sweep=roadmap", "hydra/launcher=joblib"]
    assert run_ablation._default_profile(local) == local  # this machine's hardware is the jobs'


# every GPU code path on the CPU --------------------------------------------------------------------------------
@pytest.mark.parametrize("step", ["separate_downsampling", "baseline"])
def test_bf16_autocast_on_cpu_trains_like_fp32(compose_cfg, tmp_path, step):
    """amp_cpu=true: the CUDA path's bf16 autocast on the CPU (a LayerNorm and a BatchNorm step): the forward runs
    in bf16, and 3 steps end with a finite loss close to fp32's."""
    from ablations.train import setup_run, train

    base = (f"step={step}", "data=synthetic", "profile=smoke", "max_steps=3", "device=cpu")
    run = setup_run(compose_cfg(*base, "amp_cpu=true"), str(tmp_path / "probe"))
    with run.autocast():
        assert run.model(next(run.data.train_batches())[0]).dtype == torch.bfloat16
    fp32 = train(compose_cfg(*base), str(tmp_path / "fp32"))
    bf16 = train(compose_cfg(*base, "amp_cpu=true"), str(tmp_path / "bf16"))
    assert bf16["amp"] is True and fp32["amp"] is False
    a, b = (_lines(tmp_path / d)[0]["train_loss"] for d in ("fp32", "bf16"))
    assert np.isfinite(b) and abs(a - b) <= 0.02 * a, (a, b)


@pytest.mark.slow
def test_compile_with_ddp_and_no_sync_accumulation(single, tmp_path):
    """torch.compile around DDP (gloo, 2 processes) with grad_accum=2 (DDP's no_sync on the first micro-batch):
    the same training as one eager process. aot_eager captures the graphs (Dynamo, AOTAutograd, DDP's graph split)
    without generating code, which would take minutes on this CPU."""
    args = [*DDP_RUN, "train.grad_accum=2", "compile=true", "compile_backend=aot_eager", f"hydra.run.dir={tmp_path}"]
    out = _run(args, _torchrun(2, _free_port()))
    assert out.returncode == 0, out.stderr[-3000:]
    _assert_same_training(single, tmp_path)


@pytest.mark.slow
def test_imagenet_profile_runs_on_cpu_at_a_tiny_size(tmp_path):
    """profile=imagenet as composed (image folder, batch_per_device, full-width ConvNeXt-T, the modern recipe with
    RandAugment, Mixup/CutMix, erasing, drop path) for 2 steps on the CPU in bf16, 64 px JPEGs."""
    data = _jpeg_folder(tmp_path / "data", classes=("a", "b", "c", "d"), train=16, val=8, size=(80, 60))
    out = _run(["step=separate_downsampling", "profile=imagenet", f"data.root={data}", "device=cpu", "amp_cpu=true",
                "data.img_size=64", "train.batch_size=8", "train.batch_per_device=2", "train.epochs=2",
                "train.warmup_epochs=1", "max_steps=2", "progress=false",
                f"hydra.run.dir={tmp_path / 'run'}"])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    s = json.loads((tmp_path / "run/summary.json").read_text())
    assert (s["grad_accum"], s["batch_per_device"], s["num_classes"], s["amp"]) == (4, 2, 4, True)
    assert s["params"] == 28_589_128 - 769 * 996 and s["status"] == "finished"
    assert all(np.isfinite(r["train_loss"]) for r in _lines(tmp_path / "run"))
