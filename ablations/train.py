"""Train and evaluate one roadmap step: `train(cfg, run_dir)` with cfg the composed RunConfig (an OmegaConf node).

Run folder: config.yaml (resolved), complexity.json, metrics.jsonl (one line per finished epoch), summary.json,
last.pt (written atomically after every epoch). Restarting in the same folder resumes from last.pt; a finished
run is reported, not redone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy
from tqdm import tqdm

from ablations.augment import BatchAugment, eval_transform
from ablations.complexity import complexity
from ablations.data import TensorLoader, image_folder, load_tensors
from models import ConfigError, ModelConfig, RoadmapNet
from models.layers import choice
from models.pretrained import load_pretrained

log = logging.getLogger("roadmap")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------------------- set-up helpers
def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """cuda when asked for or (auto) present, else cpu."""
    choice("device", name, ("auto", "cpu", "cuda"))
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=auto or device=cpu")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
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


def _rng_state() -> dict:
    # tensors and plain Python values only, so the checkpoint loads with torch.load(weights_only=True)
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------------ data
class Data:
    """Train/test iterables yielding device batches (images normalised, targets possibly soft)."""

    def __init__(self, cfg, device, rank: int, world: int, micro_batch: int):
        d, t = cfg.data, cfg.train
        self.cfg, self.device = d, device
        self.augment = BatchAugment(
            d.img_size,
            d.mean,
            d.std,
            d.num_classes,
            hflip=t.hflip,
            translate=t.translate,
            randaug=t.randaug,
            mixup=t.mixup,
            cutmix=t.cutmix,
            switch_prob=t.mixup_switch_prob,
            label_smoothing=t.label_smoothing,
            reprob=t.reprob,
            device=device,
        )
        if (t.mixup > 0 or t.cutmix > 0) and micro_batch % 2:
            raise ConfigError(f"Mixup/CutMix need an even per-process batch, got {micro_batch}")
        if d.in_memory:
            self.train = TensorLoader(
                load_tensors(d, "train", cfg.seed), micro_batch, device, True, True, rank, world, cfg.seed
            )
            self.test = TensorLoader(load_tensors(d, "test", cfg.seed), 256, device, False, False)
            self.num_classes = d.num_classes
        else:
            self.train, self.test, self.num_classes = self._folders(cfg, micro_batch, rank, world)
        if len(self.train) == 0:
            raise ConfigError(f"the training set has fewer images than one batch ({micro_batch})")

    def _folders(self, cfg, micro_batch, rank, world):
        d = cfg.data
        train_ds, test_ds = image_folder(d, "train", cfg.train), image_folder(d, "val")
        base = train_ds.dataset if isinstance(train_ds, torch.utils.data.Subset) else train_ds
        n_classes = len(base.classes)
        if n_classes != d.num_classes:
            log.info(
                "data: %d class folders found; using num_classes=%d (config said %d)",
                n_classes,
                n_classes,
                d.num_classes,
            )
        sampler = (
            torch.utils.data.distributed.DistributedSampler(train_ds, world, rank, seed=cfg.seed) if world > 1 else None
        )
        pin = self.device.type == "cuda"
        train = torch.utils.data.DataLoader(
            train_ds,
            micro_batch,
            shuffle=sampler is None,
            sampler=sampler,
            num_workers=d.workers,
            drop_last=True,
            pin_memory=pin,
            persistent_workers=d.workers > 0,
        )
        test = torch.utils.data.DataLoader(test_ds, 256, num_workers=d.workers, pin_memory=pin)
        return train, test, n_classes

    def set_epoch(self, epoch: int) -> None:
        """Seed this epoch's data order and augmentation (resume-exact)."""
        if hasattr(self.train, "set_epoch"):
            self.train.set_epoch(epoch)
        elif getattr(self.train, "sampler", None) is not None and hasattr(self.train.sampler, "set_epoch"):
            self.train.sampler.set_epoch(epoch)

    def train_batches(self):
        """Yield augmented training batches on the device."""
        for x, y in self.train:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.cfg.in_memory:
                x, y = self.augment(x, y)
            elif self.augment.mixup is not None:
                x, y = self.augment.mixup(x, y)
            yield x, y

    def test_batches(self):
        """Yield normalised test batches on the device."""
        for x, y in self.test:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.cfg.in_memory:
                x = eval_transform(x, self.cfg.img_size, self.augment.mean, self.augment.std)
            yield x, y


# ----------------------------------------------------------------------------------------------------- train
@torch.no_grad()
def evaluate(model, data: Data, device, amp_ctx) -> tuple[float, float]:
    """Top-1 and top-5 (%) on the test split (every rank evaluates the whole split)."""
    model.eval()
    c1 = c5 = n = 0.0
    for x, y in data.test_batches():
        with amp_ctx():
            out = model(x)
        a1, a5 = accuracy(out.float(), y, topk=(1, min(5, out.shape[1])))
        c1, c5, n = c1 + a1.item() * len(y), c5 + a5.item() * len(y), n + len(y)
    model.train()
    return c1 / n, c5 / n


def train(cfg, run_dir: str, gpu_index: int | None = None) -> dict:
    """Train `cfg` in `run_dir`, resuming from run_dir/last.pt if present; returns the summary dict.

    gpu_index picks the GPU of a single-process job (parallel sweeps); torchrun jobs use LOCAL_RANK.
    """
    t_start = time.time()
    rank, world, local_rank = dist_info()
    if world == 1 and gpu_index is not None:
        local_rank = gpu_index
    is_main = rank == 0
    check_numbers(cfg)
    device = pick_device(cfg.device, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    t = cfg.train
    if t.batch_size % (world * t.grad_accum):
        raise ConfigError(
            f"train.batch_size={t.batch_size} must divide by processes x grad_accum = {world} x {t.grad_accum}"
        )
    micro = t.batch_size // (world * t.grad_accum)
    seed_all(cfg.seed + rank)
    os.makedirs(run_dir, exist_ok=True)
    paths = {
        k: os.path.join(run_dir, v)
        for k, v in dict(
            ckpt="last.pt",
            metrics="metrics.jsonl",
            summary="summary.json",
            complexity="complexity.json",
        ).items()
    }

    data = Data(cfg, device, rank, world, micro)
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

    # Complexity on the plain module, before channels_last / compile (fvcore cannot trace compiled models).
    if os.path.exists(paths["complexity"]):
        with open(paths["complexity"]) as f:
            cx = json.load(f)
    else:
        cx = complexity(RoadmapNet(paper_scale(mcfg), num_classes=1000), 224)
        own = complexity(model, cfg.data.img_size)
        cx.update(
            paper_params=cx.pop("params"),
            params=own["params"],
            train_gflops=own["gflops"],
            train_gflops_total=own["gflops_total"],
            img_size=cfg.data.img_size,
            num_classes=data.num_classes,
        )
        if is_main:
            write_json(paths["complexity"], cx)

    model.to(device)
    cuda = device.type == "cuda"
    if cfg.channels_last:  # faster on GPU and, for the conv/BN steps, on CPU too
        model.to(memory_format=torch.channels_last)
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    lr = lr_for(t)
    opt_kwargs = {"momentum": t.momentum} if t.optimizer in ("sgd", "momentum", "nesterov") else {}
    if t.optimizer in ("adamw", "adam", "lamb"):
        opt_kwargs = {"betas": (t.momentum, 0.999)}
    try:
        optimizer = create_optimizer_v2(model, opt=t.optimizer, lr=lr, weight_decay=t.weight_decay, **opt_kwargs)
    except (AssertionError, ValueError) as e:
        raise ConfigError(f"train.optimizer={t.optimizer!r}: {e} (e.g. adamw, sgd, lamb)") from None
    steps_per_epoch = len(data.train) // t.grad_accum
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

    start_epoch, history, wall_before = 1, [], 0.0
    if os.path.exists(paths["ckpt"]):
        ck = torch.load(paths["ckpt"], map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if ema is not None and ck.get("ema") is not None:
            ema.load_state_dict(ck["ema"])
        _set_rng_state(ck["rng"])
        start_epoch, history, wall_before = ck["epoch"] + 1, ck["history"], ck["wall_s"]
        log.info("resuming %s from epoch %d", run_dir, start_epoch)
    if is_main:  # rewrite metrics from the checkpoint: each finished epoch appears exactly once
        with open(paths["metrics"], "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in history)

    log.info(
        "%s | %s | %s params, %.3f GFLOPs at %dpx (%.3f at 224px full scale) | lr %.2e | %s x %d epochs",
        cfg.step,
        device,
        f"{cx['params']:,}",
        cx["train_gflops"],
        cfg.data.img_size,
        cx["gflops"],
        lr,
        f"{t.batch_size} batch",
        epochs,
    )
    model.train()
    global_step = (start_epoch - 1) * steps_per_epoch
    for epoch in range(start_epoch, epochs + 1):
        data.set_epoch(epoch)
        # augmentation randomness per epoch, resume-exact: timm's Mixup draws from numpy, RandomErasing from random
        seed_all(cfg.seed * 1000 + epoch * 10 + rank)
        t_epoch, loss_sum, seen = time.time(), torch.zeros((), device=device), 0
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{epochs}",
            leave=False,
            dynamic_ncols=True,
            disable=not (cfg.progress and is_main),
        )
        batches = data.train_batches()
        for step in range(steps_per_epoch):
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
            global_step += 1
            scheduler.step_update(global_step)
            if ema is not None:
                ema.update(model, step=global_step)
            if step % 50 == 0 or step == steps_per_epoch - 1:
                mean_loss = loss_sum.item() / ((step + 1) * t.grad_accum)
                if not math.isfinite(mean_loss):
                    raise TrainingDiverged(
                        f"the training loss became {mean_loss} at epoch {epoch}, step {step + 1}; the last good "
                        f"checkpoint (epoch {epoch - 1}) is kept in {paths['ckpt']}. Try a lower train.lr, a longer "
                        "train.warmup_epochs or train.clip_grad=1.0."
                    )
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            bar.update(1)
        bar.close()
        if world > 1:
            dist.all_reduce(loss_sum)
        train_loss = loss_sum.item() / (steps_per_epoch * t.grad_accum * world)
        epoch_s = time.time() - t_epoch
        eval_now = epoch == epochs or epoch % max(1, t.eval_every) == 0
        top1, top5 = (
            evaluate(ema.module if ema is not None else model, data, device, amp_ctx) if eval_now else (None, None)
        )
        rec = {
            "epoch": epoch,
            "train_loss": round(train_loss, 5),
            "lr": optimizer.param_groups[0]["lr"],
            "top1": top1,
            "top5": top5,
            "epoch_s": round(epoch_s, 2),
            "img_per_s": round(seen * world / epoch_s, 1),
        }
        history.append(rec)
        wall = wall_before + time.time() - t_start
        if is_main:
            atomic_save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "epoch": epoch,
                    "history": history,
                    "wall_s": wall,
                    "rng": _rng_state(),
                    "model_config": OmegaConf.to_container(cfg.model, resolve=True),
                },
                paths["ckpt"],
            )
            with open(paths["metrics"], "a") as f:
                f.write(json.dumps(rec) + "\n")
            acc = "" if top1 is None else f" | top1 {top1:.2f} top5 {top5:.2f}"
            log.info(
                "epoch %d/%d | loss %.4f | lr %.2e%s | %.1fs | %.0f img/s",
                epoch,
                epochs,
                train_loss,
                rec["lr"],
                acc,
                epoch_s,
                rec["img_per_s"],
            )

    last = history[-1] if history else {}
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
        "wall_s": round(wall_before + time.time() - t_start, 1),
        "device": device_name(device),
        "world_size": world,
        "img_size": cfg.data.img_size,
        "num_classes": data.num_classes,
    }
    if is_main:
        write_json(paths["summary"], summary)
    return summary


def device_name(device: torch.device) -> str:
    """A readable device name for summaries."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
