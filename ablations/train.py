"""Train and evaluate one roadmap step: `train(cfg, run_dir)` with cfg the composed RunConfig (an OmegaConf node).

Run folder: config.yaml (resolved), complexity.json, metrics.jsonl (one line per finished epoch), summary.json,
TensorBoard event files (logger=tensorboard: loss and lr every log_every steps, top-1/top-5 and img/s per epoch),
last.pt (written atomically after every epoch, on SIGTERM / SIGUSR1 in the middle of one, and every
train.ckpt_every_min minutes if set). Restarting in the same folder resumes from last.pt at the exact step; a
finished run is reported, not redone.

`train()` reads as set-up, epoch loop, checkpoint: the data feed lives in ablations.data, the loop's whole state
(model, optimizer, scheduler, EMA, position in the epoch, partial epoch sums) in RunState, which saves and restores
itself. Randomness needs no saved RNG state: every optimizer step reseeds from (seed, epoch, step, rank).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from contextlib import nullcontext
from dataclasses import fields

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from tqdm import tqdm

from ablations import dist as D
from ablations.complexity import complexity
from ablations.data import AUGMENT, Data, derive_seed, seed_all
from ablations.tracking import Tracker, config_markdown
from models import ConfigError, ModelConfig, RoadmapNet
from models.layers import choice
from models.pretrained import load_pretrained

log = logging.getLogger("roadmap")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------------------- set-up helpers
def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """cuda when asked for or (auto) present, else cpu."""
    choice("device", name, ("auto", "cpu", "cuda"))
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=auto or device=cpu")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        index = local_rank % torch.cuda.device_count()  # GPUs per node or per task: both work
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def model_config(cfg) -> ModelConfig:
    """The run's ModelConfig (with the recipe's stochastic depth)."""
    m = OmegaConf.to_container(cfg.model, resolve=True)
    m["drop_path_rate"] = cfg.train.drop_path_rate
    return ModelConfig(**m).validate()


def paper_scale(mcfg: ModelConfig) -> ModelConfig:
    """The same step at ImageNet scale: the profile's width multiplier and stem adaptation undone."""
    values = {f.name: getattr(mcfg, f.name) for f in fields(ModelConfig)}
    return ModelConfig(**{**values, "width_mult": 1.0, "stem_stride": 4, "drop_path_rate": 0.0})


def lr_for(tcfg) -> float:
    """The recipe's lr scaled from lr_base_batch to the run's global batch (linear, sqrt or none)."""
    choice("train.lr_scaling", tcfg.lr_scaling, ("linear", "sqrt", "none"))
    ratio = tcfg.batch_size / tcfg.lr_base_batch
    return tcfg.lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[tcfg.lr_scaling]


def check_numbers(cfg) -> None:
    """Clear errors for values the trainer cannot use."""
    t = cfg.train
    if t.epochs < 1 or t.epochs != int(t.epochs):
        raise ConfigError(f"train.epochs must be a whole number >= 1, got {t.epochs}")
    if t.batch_size < 1 or t.grad_accum < 1:
        raise ConfigError(f"train.batch_size and train.grad_accum must be >= 1, got {t.batch_size}, {t.grad_accum}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    choice("train.sched", t.sched, ("cosine", "step"))
    if cfg.log_every < 1:
        raise ConfigError(f"log_every must be >= 1 (optimizer steps), got {cfg.log_every}")
    if cfg.profile == "imagenet" and cfg.data.name != "imagefolder":
        raise ConfigError(
            f"profile=imagenet trains ImageNet-format data, but data={cfg.data.name}: use data=imagefolder "
            "data.root=/path/to/imagenet (root/train/<class>/*, root/val/<class>/*), or another profile "
            "(cpu, gpu, smoke) for the small data sets"
        )
    if cfg.data.name == "imagefolder" and not OmegaConf.select(cfg, "data.root", throw_on_missing=False):
        raise ConfigError(
            "data=imagefolder needs data.root=/path/to/folder holding train/<class>/ and val/<class>/ "
            "(the ImageNet / Imagenette layout)"
        )


def atomic_save(obj, path: str) -> None:
    """torch.save to a temp file, then rename: a kill mid-write never leaves a broken checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    """Write JSON atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class RunState:
    """Everything resume needs, in one place: model, optimizer, scheduler, EMA, the position in the epoch
    (finished epochs + optimizer steps into the next), the partial epoch's sums and the metrics history.

    No RNG state: randomness is reseeded from (seed, epoch, step, rank) at every step, so the position is enough.
    """

    def __init__(self, model, optimizer, scheduler, ema):
        self.model, self.optimizer, self.scheduler, self.ema = model, optimizer, scheduler, ema
        self.epoch = 0  # finished epochs
        self.step = 0  # optimizer steps done in epoch + 1
        self.history: list[dict] = []  # one record per finished epoch
        self.wall_s = 0.0  # wall time of earlier sittings
        self.partial = {"loss_sum": 0.0, "seen": 0, "epoch_s": 0.0}  # the unfinished epoch so far (all ranks)

    def save(self, path: str, model_config: dict, wall_s: float) -> None:
        """Write the checkpoint atomically (plain tensors and containers: loads with weights_only=True); wall_s is
        the run's wall time up to now, all sittings."""
        atomic_save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "epoch": self.epoch,
                "step": self.step,
                "partial": self.partial,
                "history": self.history,
                "wall_s": wall_s,
                "model_config": model_config,
            },
            path,
        )

    def load(self, path: str) -> bool:
        """Restore from `path` if it exists; whether it did."""
        if not os.path.exists(path):
            return False
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: say which, never train over it silently
            raise ConfigError(f"cannot resume from {path}: {type(e).__name__}: {e}. Delete it to start over.") from None
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        if self.ema is not None and ck.get("ema") is not None:
            self.ema.load_state_dict(ck["ema"])
        self.epoch, self.step = ck["epoch"], ck.get("step", 0)
        self.partial = ck.get("partial", self.partial)
        self.history, self.wall_s = ck["history"], ck["wall_s"]
        return True


@torch.no_grad()
def evaluate(model, data: Data, amp_ctx) -> tuple[float, float]:
    """Top-1 and top-5 (%) on the test split: each rank counts its shard, the counts are summed over ranks."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.int64, device=data.device)  # correct@1, correct@5, images
    for x, y in data.test_batches():
        with amp_ctx():
            out = model(x)
        top = out.float().topk(min(5, out.shape[1]), dim=1).indices
        hit = top == y[:, None]
        counts += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(y), device=hit.device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    model.train()
    c1, c5, n = counts.tolist()
    if n != data.test_size:
        raise RuntimeError(f"evaluated {n} test images, expected {data.test_size}")
    return 100.0 * c1 / n, 100.0 * c5 / n


def _paths(run_dir: str) -> dict:
    names = dict(ckpt="last.pt", metrics="metrics.jsonl", summary="summary.json", complexity="complexity.json")
    return {k: os.path.join(run_dir, v) for k, v in names.items()}


def _complexity(cfg, mcfg: ModelConfig, model, num_classes: int, path: str, is_main: bool) -> dict:
    """The step at ImageNet scale and the proxy as trained, counted once per run folder (plain module, eval)."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    cx = _paper_complexity(paper_scale(mcfg))
    own = complexity(model, cfg.data.img_size)
    cx.update(
        paper_params=cx.pop("params"),
        params=own["params"],
        train_gflops=own["gflops"],
        train_gflops_total=own["gflops_total"],
        img_size=cfg.data.img_size,
        num_classes=num_classes,
    )
    if is_main:
        write_json(path, cx)
    return cx


def _paper_complexity(pcfg: ModelConfig) -> dict:
    """complexity() of the step at ImageNet scale (224 px, 1000 classes), cached on disk: every run of a step needs
    the same numbers and counting a full-size model takes seconds. The key covers the model config, the source of
    models/ and of the counter, and the torch version; a cache that cannot be written is skipped."""
    import hashlib
    from dataclasses import asdict
    from pathlib import Path

    here = Path(__file__).resolve().parent
    sources = sorted((here.parent / "models").glob("*.py")) + [here / "complexity.py"]
    h = hashlib.sha256(json.dumps(asdict(pcfg), sort_keys=True).encode() + torch.__version__.encode())
    for f in sources:
        h.update(f.read_bytes())
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "convnext-roadmap"
    path = folder / f"complexity-{h.hexdigest()[:20]}.json"
    if path.exists():
        with open(path) as f:
            return json.load(f)
    cx = complexity(RoadmapNet(pcfg, num_classes=1000), 224)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(str(path), cx)
    except OSError:
        pass
    return cx


def _optimizer(model, t):
    opt_kwargs = {"momentum": t.momentum} if t.optimizer in ("sgd", "momentum", "nesterov") else {}
    if t.optimizer in ("adamw", "adam", "lamb"):
        opt_kwargs = {"betas": (t.momentum, 0.999)}
    try:
        return create_optimizer_v2(
            model,
            opt=t.optimizer,
            lr=lr_for(t),
            weight_decay=t.weight_decay,
            filter_bias_and_bn=not t.weight_decay_all,  # the original recipe decays every parameter
            **opt_kwargs,
        )
    except (AssertionError, ValueError) as e:
        raise ConfigError(f"train.optimizer={t.optimizer!r}: {e} (e.g. adamw, sgd, lamb)") from None


def train(cfg, run_dir: str, gpu_index: int | None = None) -> dict:
    """Train `cfg` in `run_dir`, resuming from run_dir/last.pt if present; returns the summary dict.

    gpu_index picks the GPU of a single-process job (parallel sweeps); DDP jobs use LOCAL_RANK.
    """
    # ------------------------------------------------------------------------------------------------ set-up
    t_start = time.time()
    check_numbers(cfg)
    info = D.dist_info()
    if info.world > 1 and not dist.is_initialized():  # run_ablation.py joins the group first; direct callers here
        info = D.setup(cfg.device)
    rank, world = info.rank, info.world
    device = pick_device(cfg.device, gpu_index if world == 1 and gpu_index is not None else info.local_rank)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # static shapes: let cuDNN pick the fastest kernels once
    t = cfg.train
    if t.batch_size % (world * t.grad_accum):
        raise ConfigError(
            f"train.batch_size={t.batch_size} must divide by processes x grad_accum = {world} x {t.grad_accum}"
        )
    micro = t.batch_size // (world * t.grad_accum)
    os.makedirs(run_dir, exist_ok=True)
    paths = _paths(run_dir)

    data = Data(cfg, device, rank, world, micro)
    seed_all(derive_seed(cfg.seed))  # the same initial weights on every rank
    mcfg = model_config(cfg)
    model = RoadmapNet(mcfg, num_classes=data.num_classes, in_chans=3)
    if cfg.data.img_size < model.min_input_size:
        raise ConfigError(
            f"data.img_size={cfg.data.img_size} is too small for this model: its stem and stages "
            f"downsample {model.min_input_size}x (use img_size >= {model.min_input_size}, or a "
            "smaller model.stem_stride)"
        )
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    cx = _complexity(cfg, mcfg, model, data.num_classes, paths["complexity"], info.is_main)

    model.to(device)
    if cfg.channels_last:  # faster on GPU and, for the conv/BN steps, on CPU too
        model.to(memory_format=torch.channels_last)
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    if cfg.compile:
        torch._dynamo.reset()  # a fresh cache per run: one-process sweeps would hit the recompile limit
        train_model = torch.compile(train_model)

    optimizer = _optimizer(model, t)
    steps_per_epoch = data.batches_per_epoch() // t.grad_accum
    if cfg.max_steps:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps)
    epochs = int(t.epochs)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=t.sched,
        num_epochs=epochs,
        decay_epochs=t.decay_epochs,
        decay_rate=t.decay_rate,
        warmup_epochs=t.warmup_epochs,
        warmup_lr=t.warmup_lr,
        min_lr=t.min_lr,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    ema = ModelEmaV3(model, decay=t.ema_decay) if t.ema else None
    soft = data.augment.mixup is not None
    criterion = SoftTargetCrossEntropy() if soft else torch.nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    amp_ctx = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if cuda and cfg.amp
        else (lambda: torch.autocast("cpu", enabled=False))
    )

    state = RunState(model, optimizer, scheduler, ema)
    resumed = state.load(paths["ckpt"])
    if resumed:
        log.info("resuming %s from epoch %d, step %d", run_dir, state.epoch + 1, state.step)
    if info.is_main:  # rewrite metrics from the checkpoint: each finished epoch appears exactly once
        with open(paths["metrics"], "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in state.history)
    model_cfg_dict = OmegaConf.to_container(cfg.model, resolve=True)

    def checkpoint() -> None:
        if info.is_main:
            state.save(paths["ckpt"], model_cfg_dict, state.wall_s + time.time() - t_start)

    log.info(
        "%s | %s | %s params, %.3f GFLOPs at %dpx (%.3f at 224px full scale) | lr %.2e | %s x %d epochs",
        cfg.step,
        device,
        f"{cx['params']:,}",
        cx["train_gflops"],
        cfg.data.img_size,
        cx["gflops"],
        lr_for(t),
        f"{t.batch_size} batch",
        epochs,
    )
    code = code_version()
    log.info("code: %s", code or "not a git checkout (version unknown)")

    # TensorBoard / W&B (rank 0): on resume, events an earlier sitting logged after the checkpoint are dropped
    done_steps = state.epoch * steps_per_epoch + state.step  # the global optimizer step of the checkpoint
    tracker = Tracker(run_dir, cfg, purge_step=done_steps + 1 if resumed else None, enabled=info.is_main)
    if not resumed:
        _log_run_info(tracker, cfg, cx, t)

    # ------------------------------------------------------------------------------------------- epoch loop
    model.train()
    ckpt_every_s = t.ckpt_every_min * 60 if t.ckpt_every_min else None
    last_save = time.time()
    check_every = 1 if world == 1 else 10  # under DDP, stop / timed-save decisions cost a collective
    with D.PreemptionGuard() as guard, tracker:
        for epoch in range(state.epoch + 1, epochs + 1):
            start = state.step  # > 0 when resuming in the middle of this epoch
            data.set_epoch(epoch, start * t.grad_accum)
            loss_sum = torch.tensor(state.partial["loss_sum"] if (start and info.is_main) else 0.0, device=device)
            seen = state.partial["seen"] if start else 0
            t_epoch = time.time() - (state.partial["epoch_s"] if start else 0.0)
            logged = (state.partial["loss_sum"] if start else 0.0, start)  # (loss sum, steps) at the last point
            bar = tqdm(total=steps_per_epoch, initial=start, desc=f"epoch {epoch}/{epochs}", leave=False,
                       dynamic_ncols=True, disable=not (cfg.progress and info.is_main))  # fmt: skip
            batches = data.train_batches()
            for step in range(start, steps_per_epoch):
                # this step's randomness (augmentation, Mixup, erasing, drop path) from its own stream
                seed_all(derive_seed(cfg.seed, AUGMENT, epoch, step, rank))
                for micro_i in range(t.grad_accum):
                    x, y = next(batches)
                    if cfg.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    sync = micro_i == t.grad_accum - 1 or world == 1
                    ctx = train_model.no_sync() if not sync and hasattr(train_model, "no_sync") else nullcontext()
                    with ctx, amp_ctx():
                        loss = criterion(train_model(x), y)
                    (loss / t.grad_accum).backward()
                    loss_sum += loss.detach()
                    seen += len(y)
                if t.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                global_step = (epoch - 1) * steps_per_epoch + step + 1
                scheduler.step_update(global_step)
                if ema is not None:
                    ema.update(model, step=global_step)
                state.step = step + 1
                bar.update(1)
                if step % cfg.log_every == 0 or step == steps_per_epoch - 1:
                    total = _all_sum(loss_sum).item()  # every rank sees the same loss, so all stop together
                    mean_loss = total / ((step + 1) * t.grad_accum * world)
                    if not math.isfinite(mean_loss):
                        bar.close()
                        raise TrainingDiverged(
                            f"the training loss became {mean_loss} at epoch {epoch}, step {step + 1}; the last good "
                            f"checkpoint is kept in {paths['ckpt']}. Try a lower train.lr, a longer "
                            "train.warmup_epochs or train.clip_grad=1.0."
                        )
                    lr_now = optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr_now:.2e}")
                    # the mean loss of the steps since the last point (the host value read above: no extra sync)
                    interval = (total - logged[0]) / ((step + 1 - logged[1]) * t.grad_accum * world)
                    tracker.scalars({"train/loss": interval, "train/lr": lr_now}, global_step)
                    logged = (total, step + 1)
                if state.step < steps_per_epoch and (step + 1) % check_every == 0:
                    stop = guard.signum is not None
                    timed = ckpt_every_s is not None and time.time() - last_save >= ckpt_every_s
                    if world > 1:  # every rank takes the same decision (one host sync every check_every steps)
                        flags = torch.tensor([stop, timed], device=device)
                        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                        stop, timed = flags.tolist()
                    if stop or timed:
                        state.partial = {"loss_sum": _all_sum(loss_sum).item(), "seen": seen,
                                         "epoch_s": time.time() - t_epoch}  # fmt: skip
                        checkpoint()
                        last_save = time.time()
                    if stop:
                        bar.close()
                        guard.stop(
                            f"stopped by a signal at epoch {epoch}, step {state.step}/{steps_per_epoch}; the "
                            f"checkpoint {paths['ckpt']} holds that exact position: run the same command again "
                            "(same run folder) to resume"
                        )
            bar.close()

            # ------------------------------------------------------------------------------ end of epoch
            train_loss = _all_sum(loss_sum).item() / (steps_per_epoch * t.grad_accum * world)
            epoch_s = time.time() - t_epoch
            eval_now = epoch == epochs or epoch % max(1, t.eval_every) == 0
            top1, top5 = evaluate(ema.module if ema is not None else model, data, amp_ctx) if eval_now else (None, None)
            rec = {
                "epoch": epoch,
                "train_loss": round(train_loss, 5),
                "lr": optimizer.param_groups[0]["lr"],
                "top1": top1,
                "top5": top5,
                "epoch_s": round(epoch_s, 2),
                "img_per_s": round(seen * world / epoch_s, 1),
            }
            state.history.append(rec)
            tracker.scalars(
                {"test/top1": top1, "test/top5": top5, "train/epoch_loss": train_loss,
                 "train/img_per_s": rec["img_per_s"], "train/epoch_s": epoch_s},
                epoch * steps_per_epoch,
            )  # fmt: skip
            state.epoch, state.step = epoch, 0
            state.partial = {"loss_sum": 0.0, "seen": 0, "epoch_s": 0.0}
            checkpoint()
            last_save = time.time()
            if info.is_main:
                with open(paths["metrics"], "a") as f:
                    f.write(json.dumps(rec) + "\n")
                acc = "" if top1 is None else f" | top1 {top1:.2f} top5 {top5:.2f}"
                log.info("epoch %d/%d | loss %.4f | lr %.2e%s | %.1fs | %.0f img/s",
                         epoch, epochs, train_loss, rec["lr"], acc, epoch_s, rec["img_per_s"])  # fmt: skip

    # --------------------------------------------------------------------------------------------- summary
    last = state.history[-1] if state.history else {}
    summary = {
        "status": "finished",
        "step": cfg.step,
        "bar": cfg.bar,
        "regime": cfg.regime.name,
        "profile": cfg.profile,
        "data": cfg.data.name,
        "recipe": t.name,
        "seed": cfg.seed,
        "top1": last.get("top1"),
        "top5": last.get("top5"),
        "params": cx["params"],
        "paper_params": cx["paper_params"],
        "gflops": round(cx["gflops"], 4),
        "gflops_total": round(cx["gflops_total"], 4),
        "train_gflops": round(cx["train_gflops"], 6),
        "epochs": epochs,
        "wall_s": round(state.wall_s + time.time() - t_start, 1),
        "device": device_name(device),
        "world_size": world,
        "img_size": cfg.data.img_size,
        "num_classes": data.num_classes,
        "code": code,  # git commit of the code that finished the run ("+dirty": uncommitted changes; None: no git)
    }
    if info.is_main:
        write_json(paths["summary"], summary)
    return summary


def _log_run_info(tracker: Tracker, cfg, cx: dict, t) -> None:
    """The resolved config, the step's complexity and the hparams, once at the start of a run."""
    tracker.text("config", config_markdown(cfg))
    tracker.text(
        "complexity",
        f"{cfg.step} ({cfg.bar}): {cx['params']:,} params as trained, {cx['train_gflops']:.4f} GFLOPs at "
        f"{cfg.data.img_size} px; the step at 224 px full width: {cx['paper_params']:,} params, "
        f"{cx['gflops']:.3f} GFLOPs",
    )
    hp = {
        "step": cfg.step, "bar": cfg.bar, "seed": cfg.seed, "regime": cfg.regime.name, "profile": cfg.profile,
        "data": cfg.data.name, "recipe": t.name, "epochs": float(t.epochs), "batch_size": t.batch_size,
        "lr": lr_for(t), "params": cx["params"], "gflops": cx["gflops"],
    }  # fmt: skip
    tracker.hparams(hp, ("test/top1", "test/top5", "train/epoch_loss"))


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over ranks (a copy; `x` itself is left as it is)."""
    x = x.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


def code_version() -> str | None:
    """The git commit of this checkout ("<12 hex>", "+dirty" when tracked files differ from it), or None when the
    code is not a git checkout or git is missing: so a result can be traced to the code that produced it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        git = ["git", "-C", root]
        sha = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def device_name(device: torch.device) -> str:
    """A readable device name for summaries."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
