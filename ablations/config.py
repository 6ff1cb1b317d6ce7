"""Structured-config schema for run_ablation.py, registered in Hydra's ConfigStore.

The model part is models.ModelConfig itself, so a mistyped model field fails at compose time. Every model field
defaults to `${roadmap.model:<field>}`, a resolver that asks models.roadmap for the run's step, roadmap order and
left-out steps (`without`); profiles, bars and the command line override single fields on top. So the roadmap's
deltas live in one place (models/roadmap.py step_deltas) and Hydra cannot build another model than build_model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ablations.factorial import FactorialConfig
from models import STEPS, ConfigError, ModelConfig, Regime
from models.roadmap import active_steps, config_of, roadmap_order

PAPER = "paper"  # the name of the paper's roadmap (conf/roadmap/paper.yaml)


def _model_from_roadmap() -> ModelConfig:
    """A ModelConfig node whose every field is filled in by the roadmap.model resolver."""
    return ModelConfig(**{f.name: f"${{roadmap.model:{f.name}}}" for f in dataclasses.fields(ModelConfig)})


@dataclass
class RoadmapConfig:
    """A roadmap: an ordered list of step names that `step=` walks (conf/roadmap/<name>.yaml)."""

    name: str = PAPER
    steps: List[str] = field(default_factory=lambda: list(STEPS))


@dataclass
class ResSchedule:
    """Progressive resolution (FFCV's): the training resolution rises linearly from `start` to `end` px between
    epochs ramp[0] and ramp[1] (epochs done, 0-based as FFCV counts), rounded to a multiple of `multiple`. Off
    while start is null (data.img_size throughout)."""

    start: Optional[int] = None
    end: Optional[int] = None  # null: start
    ramp: List[float] = field(default_factory=lambda: [0.0, 0.0])
    multiple: int = 32


@dataclass
class DataConfig:
    """Which data set and how it is fed."""

    name: str = "fashion_mnist"  # fashion_mnist | cifar10 | cifar100 | imagefolder | synthetic
    root: Optional[str] = None  # folder holding the data set's files
    num_classes: int = 10
    img_size: int = 32  # training and test resolution (square)
    in_memory: bool = True  # keep decoded images as one tensor and augment in batches (fast path)
    download: bool = False  # let torchvision download when files are missing (needs internet)
    train_subset: Optional[int] = None  # use N training images, a fixed random choice (cpu proxy, tests)
    test_subset: Optional[int] = None  # use N test images (chosen the same way)
    workers: Optional[int] = None  # DataLoader workers (image folders); null: this process's core share minus one
    decode: str = "pil"  # image folders: pil (timm's transforms in the workers) | device (ablations/decode.py)
    # training resolution per epoch (in-memory data or data.decode=device), e.g. data.res_schedule.start=160
    # data.res_schedule.end=192 'data.res_schedule.ramp=[11,13]'; start null: data.img_size throughout
    res_schedule: ResSchedule = field(default_factory=ResSchedule)
    eval_img_size: Optional[int] = None  # evaluation resolution; null: img_size
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    synthetic_size: int = 512  # images per split for data=synthetic
    # keep these classes only, relabelled 0..k-1 in this order (label numbers; image folders: folder names or indices
    # into the sorted train/ folders); the model gets k outputs. null: every class
    classes: Optional[List[Any]] = None


@dataclass
class TrainConfig:
    """A training recipe; every field is overridable (train.epochs=..., train.mixup=0, ...)."""

    name: str = "modern"
    epochs: float = 300
    batch_size: int = 4096  # global batch (summed over processes and accumulation steps)
    grad_accum: int = 1  # micro-batches per optimizer step (derived when batch_per_device is set)
    batch_per_device: Optional[int] = None  # per-process micro-batch: grad_accum = batch / (processes x this)
    optimizer: str = "adamw"  # any timm.optim.create_optimizer_v2 name: adamw, sgd, lamb, ...
    lr: float = 4e-3  # at batch lr_base_batch
    lr_base_batch: int = 4096
    lr_scaling: str = "linear"  # linear | sqrt | none: how lr follows batch_size / lr_base_batch
    min_lr: float = 1e-6
    momentum: float = 0.9  # sgd momentum / adamw beta1
    weight_decay: float = 0.05
    sched: str = "cosine"  # cosine | step
    warmup_epochs: float = 20  # cosine: linear from warmup_lr to lr over these, then cosine over the rest
    warmup_lr: float = 1e-6
    decay_epochs: float = 30  # step schedule: decay every N epochs
    decay_rate: float = 0.1
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_switch_prob: float = 0.5
    randaug: Optional[str] = "rand-m9-mstd0.5-inc1"  # timm auto-augment string; null: off
    reprob: float = 0.25  # random erasing probability
    hflip: float = 0.5  # horizontal flip probability
    translate: float = 0.125  # in-memory data: random shift up to this fraction of the image (zero fill)
    drop_path_rate: float = 0.1  # stochastic depth (the modern recipe takes the regime's: T 0.1, B 0.5)
    ema: bool = False  # the roadmap runs train without EMA (it hurts BatchNorm models)
    ema_decay: float = 0.9999
    clip_grad: Optional[float] = None
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    weight_decay_all: bool = False  # decay biases and norm weights too (the original ResNet recipe did)
    ckpt_every_min: Optional[float] = None  # also checkpoint mid-epoch every N minutes (clusters that kill unannounced)


@dataclass
class FinetuneConfig:
    """Fine-tuning from `pretrained=` (a run folder, its last.pt or a timm / torchvision / official checkpoint)."""

    freeze_epochs: int = 0  # the first N epochs train the head only (body frozen), then everything (fastai fine_tune)
    train_norm: bool = False  # the body's norm layers train while it is frozen (fastai's train_bn, True there)
    layer_decay: Optional[float] = None  # layer-wise lr decay (timm's create_optimizer_v2 layer_decay); null: off
    lr: Optional[float] = None  # the fine-tune's own peak lr at train.lr_base_batch (scaled as train.lr); null: off


@dataclass
class RunConfig:
    """The whole composed config of one run."""

    step: str = "large_kernel"
    bar: str = "${step}"  # figure bar: the step, or an ablations.VARIANTS name
    profile: str = "cpu"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA
    amp_cpu: bool = False  # bf16 autocast on CPU too (the GPU path's numerics on a CPU: tests; slow without AMX)
    tf32: bool = True  # CUDA: TF32 for fp32 matmuls and cuDNN convs (timm's default); off: full fp32
    channels_last: bool = True  # memory format of model and batches
    compile: bool = False  # torch.compile the training model (CUDA)
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no code generation; tests, debugging)
    pretrained: Optional[str] = None  # a run folder or a local checkpoint file to start from (fine-tuning)
    progress: bool = True  # tqdm bar per epoch
    max_steps: Optional[int] = None  # stop each epoch after N optimizer steps (smoke tests)
    logger: str = "tensorboard"  # tensorboard | wandb | none: where train loss, lr, top-1 and img/s are logged
    log_every: int = 50  # log (and check) the training loss every N optimizer steps
    without: Any = field(default_factory=list)  # steps switched off (leave-one-out): without=[gelu,bn_to_ln]
    regime: Regime = field(default_factory=Regime)
    roadmap: RoadmapConfig = field(default_factory=RoadmapConfig)
    model: ModelConfig = field(default_factory=_model_from_roadmap)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    factorial: FactorialConfig = field(default_factory=FactorialConfig)  # the design +sweep=factorial runs


def _list(value) -> list:
    """without as a plain list: None or [] -> [], a single name -> [name], a ListConfig -> list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


def left_out(without) -> list[str]:
    """The left-out steps in one canonical form (paper order, each once), so without=[a,b] and [b,a] name the same
    run folder, config and figure bar. Names that are not steps stay, last (toggles() rejects them)."""
    names = dict.fromkeys(map(str, _list(without)))
    return sorted(names, key=lambda n: STEPS.index(n) if n in STEPS else len(STEPS))


def toggles(cfg) -> dict:
    """The run's step, regime, roadmap order (None for the paper's) and left-out steps, validated (ConfigError)."""
    name = OmegaConf.select(cfg, "roadmap.name", default=PAPER)
    steps = OmegaConf.select(cfg, "roadmap.steps", default=None)
    steps = list(STEPS) if steps is None else _list(steps)
    if name == PAPER and tuple(steps) != STEPS:
        raise ConfigError(
            f"roadmap.steps {steps} is not the paper's order but the roadmap is still named {PAPER!r}; name it "
            "(roadmap.name=<name>), or write conf/roadmap/<name>.yaml and pass roadmap=<name>"
        )
    order = None if tuple(steps) == STEPS else roadmap_order(steps)
    regime = Regime(**OmegaConf.to_container(cfg.regime, resolve=True))
    without = left_out(OmegaConf.select(cfg, "without", default=None))
    return {
        "step": cfg.step,
        "regime": regime,
        "roadmap": order,
        "without": without,
        "active": active_steps(cfg.step, without, order),
    }


def _model_field(name: str, *, _root_) -> Any:
    """Resolver roadmap.model: one field of the model that models.roadmap builds for this run's toggles."""
    t = toggles(_root_)
    return config_of(t["active"], t["regime"]).get(name, getattr(ModelConfig(), name))


def toggle_items(without, roadmap: str | None) -> list[str]:
    """The toggles as run-folder items: roadmap=<name> (not for the paper's), without=<a>+<b> (when any)."""
    items = [f"roadmap={roadmap}"] if roadmap and roadmap != PAPER else []
    steps = left_out(without)
    return items + (["without=" + "+".join(steps)] if steps else [])


def toggle_label(bar: str, without) -> str:
    """A figure bar's label with its left-out steps: separate_downsampling_without=gelu (the folder's name too)."""
    steps = left_out(without)
    return f"{bar}_without={'+'.join(steps)}" if steps else bar


def _suffix(override_dirname: str, without=None, roadmap: str | None = None) -> str:
    # run folders name the overrides that change results: runs/.../large_kernel_model.kernel_size=5/seed0, and the
    # toggles: .../separate_downsampling_without=gelu/seed0; a default run's folder name is what it always was
    # a path in a value (pretrained=runs/sweeps/pre/seed0) would nest folders: its separators become "+"
    flat = override_dirname.replace("=/", "=").replace("/", "+") if override_dirname else ""
    items = ([flat] if flat else []) + toggle_items(without, roadmap)
    return f"_{','.join(items)}" if items else ""


def register() -> None:
    """Register the schema `roadmap_schema` and the resolvers roadmap.suffix (folder names) and roadmap.model."""
    ConfigStore.instance().store(name="roadmap_schema", node=RunConfig)
    if not OmegaConf.has_resolver("roadmap.suffix"):
        OmegaConf.register_new_resolver("roadmap.suffix", _suffix)
    if not OmegaConf.has_resolver("roadmap.model"):
        OmegaConf.register_new_resolver("roadmap.model", _model_field)
    from ablations import factorial_sweep  # Hydra glue of +sweep=factorial: the resolver factorial.without

    factorial_sweep.register()


# ------------------------------------------------------------------------------------------- command-line keys
def _schema_fields(cls) -> dict:
    """A schema dataclass's field names -> their types (resolved: this module uses postponed annotations)."""
    import typing

    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name) for f in dataclasses.fields(cls)}


def check_override_keys(args: list[str]) -> None:
    """A mistyped key on the command line (`model.kernal_size=5`): one ConfigError with the closest keys and the
    valid ones, before Hydra composes. (Hydra's own message would suggest appending it as `+model.kernal_size`, which
    is wrong here: the schema has every key.) Group choices (`step=`, `data=`, `hydra/launcher=`), appends (`+x=`),
    deletions (`~x`) and hydra.* keys are left to Hydra, which lists a group's valid options itself."""
    import difflib
    import re

    for arg in args:
        m = re.match(r"^([A-Za-z_][\w.]*)=", arg)
        if m is None or m[1].startswith("hydra") or "." not in m[1] and m[1] in _GROUPS:
            continue
        node, seen = RunConfig, []
        for part in m[1].split("."):
            names = _schema_fields(node)
            if part not in names:
                where = ".".join(seen) or "the top level"
                close = difflib.get_close_matches(part, list(names), n=3, cutoff=0.6)
                prefix = ".".join(seen) + "." if seen else ""
                hint = f"did you mean {' or '.join(prefix + c for c in close)}? " if close else ""
                raise ConfigError(
                    f"unknown config key {m[1]!r} in {arg!r}: {hint}the keys of {where} are "
                    f"{', '.join(sorted(names))} (`--cfg job` shows the whole composed config)"
                )
            seen.append(part)
            node = names[part]
            if not dataclasses.is_dataclass(node):
                break  # a leaf (or a list / dict value): Hydra checks the value's type


_GROUPS = ("bar", "data", "profile", "regime", "roadmap", "step", "sweep", "train")  # conf/<group>/ folders
