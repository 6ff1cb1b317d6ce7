"""Train and evaluate one roadmap step: `train(cfg, run_dir)` with cfg the composed RunConfig (an OmegaConf node).

Run folder: config.yaml (resolved), complexity.json, metrics.jsonl (one line per finished epoch), summary.json,
TensorBoard event files (logger=tensorboard: loss and lr every log_every steps, top-1/top-5 and img/s per epoch),
last.pt (written atomically after every epoch, on SIGTERM / SIGUSR1 / Ctrl-C in the middle of one, and every
train.ckpt_every_min minutes if set). Restarting in the same folder resumes from last.pt at the exact step; a
finished run is reported, not redone.

`train()` reads as pycls's trainer does: `setup_run` (process, device, data, model, optimizer, schedule, EMA),
`resume`, then per epoch `train_epoch` (steps: `train_step`, `log_point`, `save_or_stop`) and `end_epoch`
(`eval_epoch` of the model and its EMA, the epoch's record, the checkpoint), and `write_summary`. The wiring lives
in `Run`; everything resume needs (model, optimizer, scheduler, EMA, position in the epoch, partial epoch sums,
history) in RunState, which saves and restores itself. Randomness needs no saved RNG state: every optimizer step
reseeds from (seed, epoch, step, rank).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, distribute_bn
from tqdm import tqdm

from ablations import dist as D
from ablations.complexity import complexity, meta_complexity
from ablations.config import left_out
from ablations.data import AUGMENT, DECODES, Data, check_resolutions, derive_seed, res_schedule, seed_all
from ablations.finetune import check_finetune, load_for_finetune
from ablations.run_folder import (
    RunFolderError,
    check_checkpoint,
    check_free_space,
    load_checkpoint,
    plain,
    write_atomic,
    write_json,
    write_lines,
)
from ablations.tracking import Tracker, config_markdown
from models import ConfigError, ModelConfig, RoadmapNet
from models.heads import head_name
from models.layers import choice

log = logging.getLogger("roadmap")


# above this many parameters at paper scale the step's FLOPs are counted on the meta device (no weights in memory):
# fvcore's real trace of a 2.6-billion-parameter factorial row held 14.7 GB
PAPER_COUNT_MAX_PARAMS = 300_000_000


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


def lr_for(tcfg, lr: float | None = None) -> float:
    """The recipe's lr (or `lr`: a fine-tune's own) scaled from lr_base_batch to the run's global batch (linear,
    sqrt or none)."""
    choice("train.lr_scaling", tcfg.lr_scaling, ("linear", "sqrt", "none"))
    ratio = tcfg.batch_size / tcfg.lr_base_batch
    return (lr or tcfg.lr) * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[tcfg.lr_scaling]


def run_lr(cfg) -> float:
    """The run's peak lr: finetune.lr when set, else train.lr, scaled to the global batch."""
    return lr_for(cfg.train, OmegaConf.select(cfg, "finetune.lr", default=None))


def check_numbers(cfg, run_dir: str | None = None) -> None:
    """Clear errors for values the trainer cannot use (run_dir: the run's folder, whose last.pt, if any, makes the
    pretrained source irrelevant: a resumed run restores its own weights)."""
    t = cfg.train
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError(f"seed must be a whole number >= 0 (it keys every random stream), got {cfg.seed}")
    if t.epochs < 1 or t.epochs != int(t.epochs):
        raise ConfigError(f"train.epochs must be a whole number >= 1, got {t.epochs}")
    if t.batch_size < 1 or t.grad_accum < 1:
        raise ConfigError(f"train.batch_size and train.grad_accum must be >= 1, got {t.batch_size}, {t.grad_accum}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    choice("train.sched", t.sched, ("cosine", "step"))
    if t.sched == "cosine" and t.warmup_epochs >= t.epochs:
        raise ConfigError(
            f"train.warmup_epochs={t.warmup_epochs} leaves no epoch for the cosine decay of train.epochs={t.epochs}; "
            "use fewer warm-up epochs"
        )
    if cfg.log_every < 1:
        raise ConfigError(f"log_every must be >= 1 (optimizer steps), got {cfg.log_every}")
    if cfg.profile in ("imagenet", "imagenet_fast") and cfg.data.name != "imagefolder":
        raise ConfigError(
            f"profile={cfg.profile} trains ImageNet-format data, but data={cfg.data.name}: use data=imagefolder "
            "data.root=/path/to/imagenet (root/train/<class>/*, root/val/<class>/*), or another profile "
            "(cpu, gpu, smoke) for the small data sets"
        )
    if cfg.data.name == "imagefolder" and not OmegaConf.select(cfg, "data.root", throw_on_missing=False):
        raise ConfigError(
            "data=imagefolder needs data.root=/path/to/folder holding train/<class>/ and val/<class>/ "
            "(the ImageNet / Imagenette layout)"
        )
    choice("data.decode", cfg.data.get("decode", "pil"), DECODES)
    check_resolutions(cfg.data, 1)  # the model's smallest input is checked again once it is built
    check_finetune(cfg, _paths(run_dir)["ckpt"] if run_dir else None)


def _nbytes(obj) -> int:
    """Bytes of the tensors in a nested checkpoint (its size on disk, near enough)."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def atomic_save(obj, path: str) -> None:
    """torch.save to a temp file, then rename: a kill mid-write never leaves a broken checkpoint; a disk without room
    for it is refused before writing, and a failed write removes its temporary file and keeps the last good one."""
    keep = f"The last good checkpoint {path} is intact." if os.path.exists(path) else ""
    check_free_space(path, _nbytes(obj), keep)
    write_atomic(path, lambda tmp: torch.save(obj, tmp), keep)


class RunState:
    """Everything resume needs, in one place: model, optimizer, scheduler, EMA, the position in the epoch
    (finished epochs + optimizer steps into the next), the partial epoch's sums and the metrics history; and what
    run it belongs to (`config`: config.yaml's content), so a checkpoint is never resumed into another run.

    No RNG state: randomness is reseeded from (seed, epoch, step, rank) at every step, so the position is enough.
    """

    def __init__(self, model, optimizer, scheduler, ema, cfg=None):
        self.model, self.optimizer, self.scheduler, self.ema = model, optimizer, scheduler, ema
        self.cfg = cfg  # the run's config (None: not checked, as for direct callers without one)
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
                "config": plain(self.cfg) if self.cfg is not None else None,
            },
            path,
        )

    def load(self, path: str) -> bool:
        """Restore from `path` if it exists; whether it did. A file that is not a checkpoint of this run (another
        run's, another model's, not ours, truncated) stops with one paragraph saying what it is."""
        if not os.path.exists(path):
            return False
        ck = load_checkpoint(path)
        if self.cfg is not None:
            check_checkpoint(ck, self.cfg, path)
        try:
            self.model.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
            self.scheduler.load_state_dict(ck["scheduler"])
            if self.ema is not None and ck.get("ema") is not None:
                self.ema.load_state_dict(ck["ema"])
        except (RuntimeError, ValueError, KeyError) as e:  # load_state_dict: missing / unexpected keys, shapes
            first = str(e).strip().splitlines()
            raise RunFolderError(
                f"{path} holds the weights of another model ({first[1].strip() if len(first) > 1 else first[0]}"
                "...): it is not this run's checkpoint. Nothing was changed: delete it to start this run over."
            ) from None
        self.epoch, self.step = ck["epoch"], ck.get("step", 0)
        self.partial = ck.get("partial", self.partial)
        self.history, self.wall_s = ck["history"], ck.get("wall_s", 0.0)
        return True


@torch.no_grad()
def evaluate(model, data: Data, amp_ctx) -> tuple[float, float]:
    """Top-1 and top-5 (%) on the test split: each rank counts its shard, the counts are summed over ranks."""
    model.eval()
    counts = torch.zeros(2, dtype=torch.int64, device=data.device)  # correct@1, correct@5
    images = 0  # counted on the host: no host-to-device copy per batch
    for x, y in data.test_batches():
        with amp_ctx():
            out = model(x)
        top = out.float().topk(min(5, out.shape[1]), dim=1).indices
        hit = top == y[:, None]
        counts += torch.stack([hit[:, 0].sum(), hit.any(1).sum()])
        images += len(y)
    counts = torch.cat([counts, torch.tensor([images], device=counts.device)])
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
    with torch.device("meta"):  # shapes only: the parameter count decides whether real weights fit in memory
        meta = RoadmapNet(pcfg, num_classes=1000)
    if sum(p.numel() for p in meta.parameters()) <= PAPER_COUNT_MAX_PARAMS:
        cx = complexity(RoadmapNet(pcfg, num_classes=1000), 224)
    else:
        cx = meta_complexity(meta, 224)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(str(path), cx)
    except (OSError, RunFolderError):  # a cache that cannot be written is skipped
        pass
    return cx


def _optimizer(model, cfg):
    """timm's optimizer for the run: train.* recipe, the run's lr (finetune.lr when set) and layer decay."""
    t = cfg.train
    opt_kwargs = {"momentum": t.momentum} if t.optimizer in ("sgd", "momentum", "nesterov") else {}
    if t.optimizer in ("adamw", "adam", "lamb"):
        opt_kwargs = {"betas": (t.momentum, 0.999)}
    try:
        return create_optimizer_v2(
            model,
            opt=t.optimizer,
            lr=run_lr(cfg),
            weight_decay=t.weight_decay,
            filter_bias_and_bn=not t.weight_decay_all,  # the original recipe decays every parameter
            # layer-wise lr decay (BEiT / ConvNeXt fine-tuning): group i of model.group_matcher gets lr x d**(n-i)
            layer_decay=OmegaConf.select(cfg, "finetune.layer_decay", default=None),
            **opt_kwargs,
        )
    except (AssertionError, ValueError) as e:
        raise ConfigError(f"train.optimizer={t.optimizer!r}: {e} (e.g. adamw, sgd, lamb)") from None


# ------------------------------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class BatchSplit:
    """How the global batch is split: optimizer steps accumulate grad_accum micro-batches of `micro` per process."""

    grad_accum: int
    micro: int


def batch_split(t, world: int) -> BatchSplit:
    """train.batch_size over processes and micro-batches: train.batch_per_device fixes the micro-batch and grad_accum
    follows (so one command is right on 1, 8 or 32 GPUs), else train.grad_accum fixes the accumulation."""
    if t.batch_per_device:
        per_step = world * t.batch_per_device
        if t.batch_per_device < 1 or t.batch_size % per_step:
            fits = [b for b in (512, 256, 128, 64, 32, 16, 8) if t.batch_size % (world * b) == 0]
            raise ConfigError(
                f"train.batch_size={t.batch_size} must be a multiple of processes x train.batch_per_device = "
                f"{world} x {t.batch_per_device} = {per_step}, so that grad_accum is a whole number; "
                f"batch_per_device values that divide here: {', '.join(map(str, fits)) or 'none of 8-512'}"
            )
        accum = t.batch_size // per_step
        if t.grad_accum not in (1, accum):
            raise ConfigError(
                f"train.grad_accum={t.grad_accum} and train.batch_per_device={t.batch_per_device} disagree (the "
                f"batch per device gives grad_accum {accum} on {world} processes): set one of them (the other null/1)"
            )
        return BatchSplit(accum, t.batch_per_device)
    if t.batch_size % (world * t.grad_accum):
        raise ConfigError(
            f"train.batch_size={t.batch_size} must divide by processes x grad_accum = {world} x {t.grad_accum}"
        )
    return BatchSplit(t.grad_accum, t.batch_size // (world * t.grad_accum))


@dataclass
class Run:
    """One run's wiring, built once by setup_run: config, folder, process, device, data, model, optimisation, the
    resumable RunState and the logger. The phases of train() read and update it."""

    cfg: Any
    run_dir: str
    info: D.DistInfo
    device: torch.device
    split: BatchSplit
    data: Data
    model: RoadmapNet
    train_model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    ema: ModelEmaV3 | None
    criterion: Any
    steps_per_epoch: int
    cx: dict
    state: RunState
    t_start: float
    model_cfg: dict  # the resolved model config, saved in every checkpoint
    tracker: Tracker | None = None
    code: str | None = None
    last_save: float = field(default_factory=time.time)

    @property
    def epochs(self) -> int:
        """Planned epochs."""
        return int(self.cfg.train.epochs)

    @property
    def paths(self) -> dict:
        """The run folder's files."""
        return _paths(self.run_dir)

    @property
    def amp(self) -> bool:
        """bf16 autocast: on CUDA with amp=true, on CPU only with amp_cpu=true too."""
        return bool(self.cfg.amp and (self.device.type == "cuda" or self.cfg.get("amp_cpu")))

    def autocast(self):
        """The forward passes' autocast context (bf16, or disabled)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def checkpoint(self) -> None:
        """Save the RunState (rank 0) with the run's wall time so far."""
        if self.info.is_main:
            wall = self.state.wall_s + time.time() - self.t_start
            self.state.save(self.paths["ckpt"], self.model_cfg, wall)
        self.last_save = time.time()

    def agree(self, *flags: bool) -> list[bool]:
        """Flags OR-ed over ranks (one collective under DDP), so every rank takes the same decision."""
        if self.info.world == 1:
            return [bool(f) for f in flags]
        t = torch.tensor(flags, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]


class EpochMeter:
    """The unfinished epoch's sums: the training loss summed over samples (a device tensor, this rank's; so the loop
    never waits for the device), the images seen by all ranks, the epoch's time and the last logged point.
    `partial()` / `EpochMeter(partial=...)` carry them through a mid-epoch checkpoint."""

    def __init__(self, device, partial: dict | None = None, is_main: bool = True):
        p = partial or {"loss_sum": 0.0, "seen": 0, "epoch_s": 0.0}
        self.loss_sum = torch.tensor(p["loss_sum"] if is_main else 0.0, device=device)  # rank 0 holds the past
        self.seen = int(p["seen"])
        self.t0 = time.time() - p["epoch_s"]
        self.logged = (float(p["loss_sum"]), self.seen)  # (loss sum, images) at the last logged point

    def add(self, loss: torch.Tensor, n: int, world: int) -> None:
        """One micro-batch of n images per rank."""
        self.loss_sum += loss.detach() * n
        self.seen += n * world

    def total(self) -> float:
        """The loss summed over every rank's samples (a host sync)."""
        return _all_sum(self.loss_sum).item()

    def elapsed(self) -> float:
        """Seconds of this epoch, earlier sittings included."""
        return time.time() - self.t0

    def partial(self) -> dict:
        """What a mid-epoch checkpoint keeps of the epoch."""
        return {"loss_sum": self.total(), "seen": self.seen, "epoch_s": self.elapsed()}


def train(cfg, run_dir: str, gpu_index: int | None = None) -> dict:
    """Train `cfg` in `run_dir`, resuming from run_dir/last.pt if present; returns the summary dict.

    gpu_index picks the GPU of a single-process job (parallel sweeps); DDP jobs use LOCAL_RANK.
    """
    run = setup_run(cfg, run_dir, gpu_index)
    resume(run)
    with D.PreemptionGuard() as guard, run.tracker:
        if run.state.epoch < run.epochs:
            log.info("training epochs %d-%d, %d steps each (Ctrl-C or SIGTERM: save the exact step and stop)",
                     run.state.epoch + 1, run.epochs, run.steps_per_epoch)  # fmt: skip
        freeze = OmegaConf.select(cfg, "finetune.freeze_epochs", default=0) or 0
        for epoch in range(run.state.epoch + 1, run.epochs + 1):
            set_frozen(run, epoch <= freeze)  # from the epoch alone: a resumed run freezes as the straight one
            meter = train_epoch(run, epoch, guard)
            end_epoch(run, epoch, meter, guard)
    return write_summary(run)


# ------------------------------------------------------------------------------------------------ set-up
def setup_env(cfg, gpu_index: int | None) -> tuple[D.DistInfo, torch.device]:
    """This process's place in the DDP group and its device, with the device's numerics settings."""
    info = D.dist_info()
    if info.world > 1 and not dist.is_initialized():  # run_ablation.py joins the group first; direct callers here
        info = D.setup(cfg.device)
    device = pick_device(cfg.device, gpu_index if info.world == 1 and gpu_index is not None else info.local_rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # static shapes: let cuDNN pick the fastest kernels once
        # explicit, both ways: PyTorch's defaults differ (TF32 on for cuDNN convs, off for matmuls), which would run
        # the 1x1-as-linear layers in full fp32 and the convs in TF32
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.get("tf32", True))
        torch.backends.cudnn.allow_tf32 = bool(cfg.get("tf32", True))
    return info, device


def setup_model(cfg, data: Data, device, info: D.DistInfo, run_dir: str):
    """The step's model (initial or pretrained weights, the same on every rank), its complexity, and the module that
    trains (DDP and / or torch.compile around it)."""
    seed_all(derive_seed(cfg.seed))  # the same initial weights on every rank
    mcfg = model_config(cfg)
    model = RoadmapNet(mcfg, num_classes=data.num_classes, in_chans=3)
    if cfg.data.img_size < model.min_input_size:
        raise ConfigError(
            f"data.img_size={cfg.data.img_size} is too small for this model: its stem and stages "
            f"downsample {model.min_input_size}x (use img_size >= {model.min_input_size}, or a "
            "smaller model.stem_stride)"
        )
    check_resolutions(cfg.data, model.min_input_size)
    if cfg.pretrained and not os.path.exists(_paths(run_dir)["ckpt"]):  # a resumed run restores its own last.pt
        load_for_finetune(cfg, model)
    cx = _complexity(cfg, mcfg, model, data.num_classes, _paths(run_dir)["complexity"], info.is_main)
    model.to(device)
    if cfg.channels_last:  # faster on GPU and, for the conv/BN steps, on CPU too
        model.to(memory_format=torch.channels_last)
    return model, wrap_model(cfg, model, device, info), cx


# fastai's norm_types (fastai.torch_core), whose weights its train_bn=True keeps training in a frozen body
NORM_TYPES = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.instancenorm._InstanceNorm, torch.nn.LayerNorm)


def frozen_params(model: torch.nn.Module, train_norm: bool) -> list[torch.nn.Parameter]:
    """The parameters a frozen body stops training: every one outside the head, less the norm layers' weights and
    biases with train_norm (fastai's train_bn; timm's LayerNorm2d is an nn.LayerNorm)."""
    norms = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    return [p for n, p in model.named_parameters() if not n.startswith("head.") and not (train_norm and id(p) in norms)]


def set_frozen(run, frozen: bool) -> None:
    """fastai's freeze / unfreeze: the body's parameters (stem, stages) stop or resume training, the head always
    trains (and, with finetune.train_norm, the body's norm layers, as fastai's train_bn). The model stays in train
    mode, so the body's BatchNorm statistics still follow the batches. Under DDP / torch.compile the training module
    is rebuilt: DDP syncs the parameters that need gradients when it is made."""
    body = frozen_params(run.model, bool(OmegaConf.select(run.cfg, "finetune.train_norm", default=False)))
    n_body = len(frozen_params(run.model, False))
    if all(p.requires_grad != frozen for p in body):
        return
    for p in body:
        p.requires_grad_(not frozen)
    if run.train_model is not run.model:
        run.train_model = wrap_model(run.cfg, run.model, run.device, run.info)
    trains = "the head and the body's norm layers train" if len(body) < n_body else "only the head trains"
    log.info("body %s: %s", "frozen" if frozen else "unfrozen", trains if frozen else "all trains")


def wrap_model(cfg, model, device, info: D.DistInfo):
    """The module that trains: DDP and / or torch.compile around `model` (or `model` itself)."""
    train_model = model
    if info.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        torch._dynamo.reset()  # a fresh cache per run: one-process sweeps would hit the recompile limit
        train_model = torch.compile(train_model, backend=cfg.get("compile_backend", "inductor"))
    return train_model


def setup_schedule(optimizer, t, steps_per_epoch: int):
    """timm's per-step scheduler in the official ConvNeXt shape (utils.cosine_scheduler): linear warm-up from
    warmup_lr to the peak over warmup_epochs, then cosine to min_lr over the epochs *after* warm-up. timm's
    warmup_prefix starts the cosine after the warm-up but counts it from there for num_epochs, so it gets the
    epochs left (without the prefix the cosine spans the warm-up too and the peak is never reached). The step
    schedule (the original recipe) decays every decay_epochs from the start, as torchvision's reference does."""
    cosine = t.sched == "cosine"
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=t.sched,
        num_epochs=t.epochs - t.warmup_epochs if cosine else t.epochs,
        decay_epochs=t.decay_epochs,
        decay_rate=t.decay_rate,
        warmup_epochs=t.warmup_epochs,
        warmup_lr=t.warmup_lr,
        warmup_prefix=cosine,
        min_lr=t.min_lr,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return scheduler


def setup_run(cfg, run_dir: str, gpu_index: int | None = None) -> Run:
    """Everything before the first step: checks, process and device, data, model, optimizer, schedule, EMA, loss."""
    t_start = time.time()
    check_numbers(cfg, run_dir)
    info, device = setup_env(cfg, gpu_index)
    split = batch_split(cfg.train, info.world)
    os.makedirs(run_dir, exist_ok=True)
    data = Data(cfg, device, info.rank, info.world, split.micro)
    model, train_model, cx = setup_model(cfg, data, device, info, run_dir)
    t = cfg.train
    optimizer = _optimizer(model, cfg)
    steps_per_epoch = data.batches_per_epoch() // split.grad_accum
    if cfg.max_steps:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps)
    scheduler = setup_schedule(optimizer, t, steps_per_epoch)
    ema = ModelEmaV3(model, decay=t.ema_decay) if t.ema else None
    soft = data.augment.mixup is not None
    criterion = SoftTargetCrossEntropy() if soft else torch.nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    state = RunState(model, optimizer, scheduler, ema, cfg)
    return Run(cfg, run_dir, info, device, split, data, model, train_model, optimizer, scheduler, ema, criterion,
               steps_per_epoch, cx, state, t_start, OmegaConf.to_container(cfg.model, resolve=True))  # fmt: skip


def resume(run: Run) -> None:
    """Restore last.pt if there is one, rewrite metrics.jsonl from it (each finished epoch once), say what runs, and
    open the logger (dropping what an earlier sitting logged after the checkpoint)."""
    cfg, state, t = run.cfg, run.state, run.cfg.train
    resumed = state.load(run.paths["ckpt"])
    if resumed:
        log.info("resuming %s from epoch %d, step %d", run.run_dir, state.epoch + 1, state.step)
    if run.info.is_main:  # each finished epoch exactly once, whatever an earlier sitting wrote after the checkpoint
        write_lines(run.paths["metrics"], [json.dumps(h) for h in state.history])
    if resumed and state.epoch >= run.epochs:
        log.info("last.pt holds the finished run (%d epochs): metrics.jsonl and summary.json rewritten from it",
                 state.epoch)  # fmt: skip
    without = left_out(cfg.get("without"))
    log.info(
        "%s%s | %s | %s params, %.3f GFLOPs at %dpx (%.3f at 224px full scale) | lr %.2e | %d batch (%d x %d "
        "process%s x %d accumulated) x %d epochs",
        cfg.step,
        f" without {', '.join(without)}" if without else "",
        run.device,
        f"{run.cx['params']:,}",
        run.cx["train_gflops"],
        cfg.data.img_size,
        run.cx["gflops"],
        run_lr(cfg),
        t.batch_size,
        run.split.micro,
        run.info.world,
        "es" if run.info.world > 1 else "",
        run.split.grad_accum,
        run.epochs,
    )
    run.code = code_version()
    log.info("code: %s", run.code or "not a git checkout (version unknown)")
    done_steps = state.epoch * run.steps_per_epoch + state.step  # the global optimizer step of the checkpoint
    run.tracker = Tracker(run.run_dir, cfg, purge_step=done_steps + 1 if resumed else None, enabled=run.info.is_main)
    if not resumed:
        _log_run_info(run.tracker, cfg, run.cx, t)


# ------------------------------------------------------------------------------------------------ the epoch
def train_epoch(run: Run, epoch: int, guard: D.PreemptionGuard) -> EpochMeter:
    """One epoch of optimizer steps from the checkpoint's position; logs, checks for NaN, saves and stops on a
    signal (or a timed checkpoint) between steps."""
    state, cfg = run.state, run.cfg
    start = state.step  # > 0 when resuming in the middle of this epoch
    run.data.set_epoch(epoch, start * run.split.grad_accum)
    meter = EpochMeter(run.device, state.partial if start else None, run.info.is_main)
    check_every = 1 if run.info.world == 1 else 10  # under DDP, stop / timed-save decisions cost a collective
    show = cfg.progress and run.info.is_main
    with tqdm(total=run.steps_per_epoch, initial=start, desc=f"epoch {epoch}/{run.epochs}", leave=False,
              dynamic_ncols=True, disable=not show) as bar:  # fmt: skip
        batches = run.data.train_batches()
        for step in range(start, run.steps_per_epoch):
            train_step(run, epoch, step, batches, meter)
            bar.update(1)
            if step % cfg.log_every == 0 or step == run.steps_per_epoch - 1:
                log_point(run, meter, epoch, step, bar)
            if state.step < run.steps_per_epoch and (step + 1) % check_every == 0:
                save_or_stop(run, guard, meter, epoch)
    return meter


def train_step(run: Run, epoch: int, step: int, batches, meter: EpochMeter) -> None:
    """One optimizer step: grad_accum micro-batches (DDP syncs gradients on the last), clip, update, schedule, EMA."""
    t, world = run.cfg.train, run.info.world
    # this step's randomness (augmentation, Mixup, erasing, drop path) from its own stream
    seed_all(derive_seed(run.cfg.seed, AUGMENT, epoch, step, run.info.rank))
    for micro_i in range(run.split.grad_accum):
        x, y = next(batches)
        sync = micro_i == run.split.grad_accum - 1 or world == 1
        no_sync = not sync and hasattr(run.train_model, "no_sync")
        with run.train_model.no_sync() if no_sync else nullcontext(), run.autocast():
            loss = run.criterion(run.train_model(x), y)
        (loss / run.split.grad_accum).backward()
        meter.add(loss, len(y), world)
    if t.clip_grad:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), t.clip_grad)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    global_step = (epoch - 1) * run.steps_per_epoch + step + 1
    run.scheduler.step_update(global_step)
    if run.ema is not None:
        run.ema.update(run.model, step=global_step)
    run.state.step = step + 1


def _schedule_lr(optimizer: torch.optim.Optimizer) -> float:
    """The schedule's lr now: the largest group's (with finetune.layer_decay, group 0 is the stem's, at lr x d**n;
    the head's group runs at the schedule's lr)."""
    return max(g["lr"] for g in optimizer.param_groups)


def log_point(run: Run, meter: EpochMeter, epoch: int, step: int, bar) -> None:
    """Every log_every steps: the loss read once on the host (every rank sees the same, so all stop together on
    NaN), the progress bar and the logger's loss (mean since the last point) and lr."""
    total = meter.total()
    mean_loss = total / meter.seen
    if not math.isfinite(mean_loss):
        raise TrainingDiverged(
            f"the training loss became {mean_loss} at epoch {epoch}, step {step + 1}; the last good "
            f"checkpoint is kept in {run.paths['ckpt']}. Try a lower train.lr, a longer "
            "train.warmup_epochs or train.clip_grad=1.0."
        )
    lr_now = _schedule_lr(run.optimizer)
    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr_now:.2e}")
    interval = (total - meter.logged[0]) / max(1, meter.seen - meter.logged[1])
    global_step = (epoch - 1) * run.steps_per_epoch + step + 1
    run.tracker.scalars({"train/loss": interval, "train/lr": lr_now}, global_step)
    meter.logged = (total, meter.seen)


def save_or_stop(run: Run, guard: D.PreemptionGuard, meter: EpochMeter, epoch: int) -> None:
    """Between steps: on a signal (any rank's) or when a timed checkpoint is due, save the exact position (the
    partial epoch included); on a signal, stop with a message saying how to resume."""
    every = run.cfg.train.ckpt_every_min
    timed = every is not None and time.time() - run.last_save >= every * 60
    stop, timed = run.agree(guard.signum is not None, timed)
    if stop or timed:
        run.state.partial = meter.partial()
        run.checkpoint()
    if stop:
        guard.stop(
            f"stopped by a signal at epoch {epoch}, step {run.state.step}/{run.steps_per_epoch}; the checkpoint "
            f"{run.paths['ckpt']} holds that exact position: run the same command again (same run folder) to resume"
        )


def eval_epoch(run: Run, model) -> tuple[float, float]:
    """Top-1 / top-5 of `model` (the trained one or its EMA) on the test split, every rank with rank 0's BatchNorm
    statistics (timm's distribute_bn broadcast), so the sharded number is the one the checkpoint gives."""
    if run.info.world > 1:
        distribute_bn(model, run.info.world, reduce=False)
    return evaluate(model, run.data, run.autocast)


def end_epoch(run: Run, epoch: int, meter: EpochMeter, guard: D.PreemptionGuard) -> None:
    """Evaluate (the model, and its EMA when on), record the epoch (metrics.jsonl, logger, history), checkpoint;
    a signal that came during evaluation stops the run here, at the epoch's end."""
    state, t = run.state, run.cfg.train
    train_loss = meter.total() / meter.seen
    epoch_s = meter.elapsed()
    lr = _schedule_lr(run.optimizer)
    rec = {"epoch": epoch, "train_loss": round(train_loss, 5), "lr": lr, "top1": None, "top5": None,
           "epoch_s": round(epoch_s, 2), "img_per_s": round(meter.seen / epoch_s, 1)}  # fmt: skip
    if res_schedule(run.cfg.data) is not None or run.cfg.data.get("eval_img_size") is not None:
        rec.update(img_size=run.data.train_size, eval_img_size=run.data.eval_size)  # this epoch's resolutions
    if epoch == run.epochs or epoch % max(1, t.eval_every) == 0:
        rec["top1"], rec["top5"] = eval_epoch(run, run.model)
        if run.ema is not None:  # the official --model_ema_eval: both, every epoch
            rec["top1_ema"], rec["top5_ema"] = eval_epoch(run, run.ema.module)
    state.history.append(rec)
    scalars = {"test/top1": rec["top1"], "test/top5": rec["top5"], "train/epoch_loss": train_loss,
               "train/img_per_s": rec["img_per_s"], "train/epoch_s": epoch_s}  # fmt: skip
    if "top1_ema" in rec:
        scalars.update({"test/top1_ema": rec["top1_ema"], "test/top5_ema": rec["top5_ema"]})
    run.tracker.scalars(scalars, epoch * run.steps_per_epoch)
    state.epoch, state.step = epoch, 0
    state.partial = {"loss_sum": 0.0, "seen": 0, "epoch_s": 0.0}
    run.checkpoint()
    if run.info.is_main:
        write_lines(run.paths["metrics"], [json.dumps(h) for h in state.history])  # atomic: never half a line
        acc = "" if rec["top1"] is None else f" | top1 {rec['top1']:.2f} top5 {rec['top5']:.2f}"
        if rec.get("top1_ema") is not None:
            acc += f" (EMA {rec['top1_ema']:.2f})"
        log.info("epoch %d/%d | loss %.4f | lr %.2e%s | %.1fs | %.0f img/s",
                 epoch, run.epochs, train_loss, rec["lr"], acc, epoch_s, rec["img_per_s"])  # fmt: skip
    if epoch < run.epochs and run.agree(guard.signum is not None)[0]:
        guard.stop(
            f"stopped by a signal after epoch {epoch}; the checkpoint {run.paths['ckpt']} holds it: run the same "
            "command again (same run folder) to resume"
        )


# ------------------------------------------------------------------------------------------------ summary
def best_of(history: list[dict], key: str = "top1") -> tuple[float | None, int | None]:
    """The best evaluated `key` over the epochs and its epoch (the first of equals), or (None, None)."""
    scored = [(r[key], r["epoch"]) for r in history if r.get(key) is not None]
    if not scored:
        return None, None
    best = max(v for v, _ in scored)
    return best, next(e for v, e in scored if v == best)


def write_summary(run: Run) -> dict:
    """summary.json (rank 0): what ran, the last epoch's and the best epoch's top-1, complexity, time, device."""
    cfg, t, cx, history = run.cfg, run.cfg.train, run.cx, run.state.history
    last = history[-1] if history else {}
    best, best_epoch = best_of(history)
    summary = {
        "status": "finished",
        "step": cfg.step,
        "bar": cfg.bar,
        "without": left_out(cfg.get("without")),
        "roadmap": OmegaConf.select(cfg, "roadmap.name", default=None),
        "regime": cfg.regime.name,
        "profile": cfg.profile,
        "data": cfg.data.name,
        "recipe": t.name,
        "seed": cfg.seed,
        "top1": last.get("top1"),  # the last epoch's (the figure plots this)
        "top5": last.get("top5"),
        "best_top1": best,
        "best_epoch": best_epoch,
        "params": cx["params"],
        "paper_params": cx["paper_params"],
        "gflops": round(cx["gflops"], 4),
        "gflops_total": None if cx["gflops_total"] is None else round(cx["gflops_total"], 4),  # None: meta count
        "train_gflops": round(cx["train_gflops"], 6),
        "epochs": run.epochs,
        "wall_s": round(run.state.wall_s + time.time() - run.t_start, 1),
        "device": device_name(run.device),
        "world_size": run.info.world,
        "batch_per_device": run.split.micro,
        "grad_accum": run.split.grad_accum,
        "amp": run.amp,
        "tf32": bool(cfg.get("tf32", True)) if run.device.type == "cuda" else None,  # None: not a CUDA run
        "img_size": cfg.data.img_size,
        "num_classes": run.data.num_classes,
        "head": head_name(run.model.cfg.head, run.model.cfg.head_norm),  # model.head, or the step's own
        "pretrained": cfg.get("pretrained"),  # the run folder or file it was fine-tuned from (None: from scratch)
        "code": run.code,  # git commit of the code that finished the run ("+dirty": uncommitted changes; None: no git)
    }
    if run.ema is not None:
        best_ema, best_ema_epoch = best_of(history, "top1_ema")
        summary.update(top1_ema=last.get("top1_ema"), best_top1_ema=best_ema, best_epoch_ema=best_ema_epoch)
    if run.info.is_main:
        write_json(run.paths["summary"], summary)
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
        "lr": run_lr(cfg), "params": cx["params"], "gflops": cx["gflops"],
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
