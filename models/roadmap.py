"""The roadmap as model-config deltas: ModelConfig, the two regimes and one small delta per step.

The deltas are toggles: a model is the set of steps switched on (`active_steps`: a roadmap order walked up to a
step, minus the steps left out), and its config is the deltas of that set applied in the paper's order
(`config_of`). Hydra's model node is filled from here too (ablations/config.py), so the builder and the configs
cannot disagree. Nothing here imports Hydra.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Union

from .heads import HEADS
from .layers import ACTS, NORMS, ConfigError, choice


@dataclass
class ModelConfig:
    """Every roadmap toggle as a plain field; the defaults are torchvision/timm ResNet-50 (v1.5)."""

    depths: List[int] = field(default_factory=lambda: [3, 4, 6, 3])  # blocks per stage
    width: int = 64  # stem width = stage-1 base width; stage i base width is width * 2**i
    expansion: int = 4  # stage output (residual) width / base width: 4 = ResNet bottleneck, 1 = ConvNeXt
    mlp_ratio: float = 0.25  # hidden width / residual width: < 1 bottleneck, > 1 inverted bottleneck
    stem_type: str = "resnet"  # resnet: 7x7 conv + 3x3 max-pool | patchify: one k x k stride-k conv + norm
    stem_stride: int = 4  # total stem downsampling (4 on ImageNet; 2 or 1 for small-image proxies)
    depthwise: bool = False  # spatial conv with groups = channels
    groups: int = 1  # spatial conv groups when not depthwise (ResNeXt cardinality)
    dw_position: str = "middle"  # middle: 1x1 -> kxk -> 1x1 | top: kxk -> 1x1 -> 1x1 (moved-up depthwise conv)
    kernel_size: int = 3  # spatial (depthwise) conv kernel
    act_layer: str = "relu"  # relu | gelu
    acts_per_block: str = "all"  # all: after every conv but the last, and after the add | one: between the 1x1s
    norm_layer: str = "batchnorm"  # batchnorm | layernorm (over channels at each position)
    norms_per_block: str = "all"  # all: after every conv | one: after the spatial conv only
    conv_bias: bool = False  # biases on convs a norm follows too (convs without a following norm always have one)
    downsample: str = "in_block"  # in_block: stride-2 spatial conv + 1x1 projection | separate: norm + 2x2/2 conv
    head_norm: bool = False  # norm after global pooling (the step's own head when `head` is null)
    head: Optional[str] = None  # linear | norm_linear | fastai | fastai_convnext; null: the step's own (head_norm)
    head_hidden: int = 512  # hidden width of the fastai heads' MLP
    ls_init_value: Optional[float] = None  # layer-scale init (null: off)
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing over blocks
    drop_rate: float = 0.0  # dropout before the classifier
    width_mult: float = 1.0  # scales every width (CPU proxies)

    @property
    def block_type(self) -> str:
        """'inverted' when the hidden width exceeds the residual width, else 'bottleneck'."""
        return "inverted" if self.mlp_ratio > 1 else "bottleneck"

    def stage_dims(self) -> List[int]:
        """Residual (output) width of each stage."""
        return [self.base_width() * 2**i * self.expansion for i in range(len(self.depths))]

    def base_width(self) -> int:
        """Stem width after the width multiplier."""
        return max(1, int(round(self.width * self.width_mult)))

    def validate(self) -> ModelConfig:
        """Raise ConfigError for any value the builder cannot take."""
        choice("stem_type", self.stem_type, ("resnet", "patchify"))
        choice("dw_position", self.dw_position, ("middle", "top"))
        choice("acts_per_block", self.acts_per_block, ("all", "one"))
        choice("norms_per_block", self.norms_per_block, ("all", "one"))
        choice("downsample", self.downsample, ("in_block", "separate"))
        choice("act_layer", self.act_layer, tuple(ACTS))
        choice("norm_layer", self.norm_layer, tuple(NORMS))
        if self.head is not None:
            choice("model.head", self.head, tuple(HEADS))
        for name in ("kernel_size", "stem_stride", "width", "expansion", "groups", "head_hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {v!r}")
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"model.kernel_size must be odd (3, 5, 7, 9, 11, ...), got {self.kernel_size}")
        if self.stem_type == "resnet" and self.stem_stride not in (1, 2, 4):
            raise ConfigError(f"model.stem_stride for the resnet stem must be 1, 2 or 4, got {self.stem_stride}")
        if not self.depths or any((not isinstance(d, int)) or d < 1 for d in self.depths):
            raise ConfigError(f"model.depths must be positive integers, got {list(self.depths)!r}")
        if self.mlp_ratio <= 0 or self.width_mult <= 0:
            raise ConfigError(
                f"model.mlp_ratio and model.width_mult must be > 0, got {self.mlp_ratio}, {self.width_mult}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        return self


@dataclass
class Regime:
    """Which chain: ResNet-50 -> ConvNeXt-T (r50) or ResNet-200 -> ConvNeXt-B (r200)."""

    name: str = "r50"
    depths: List[int] = field(default_factory=lambda: [3, 4, 6, 3])  # the starting ResNet
    stage_ratio_depths: List[int] = field(default_factory=lambda: [3, 3, 9, 3])  # after "stage ratio"
    width: int = 64  # the starting ResNet's stem width
    stage_ratio_width: int = 64  # width after "stage ratio" (r200 widens to 84 in the same step)
    wide_width: int = 96  # width after "increase width"
    drop_path_rate: float = 0.1  # the end point's stochastic depth in the paper's recipe (ConvNeXt-T 0.1, -B 0.5)


REGIMES = {
    "r50": Regime(),
    "r200": Regime("r200", [3, 24, 36, 3], [3, 3, 27, 3], 64, 84, 128, 0.5),
}

# Roadmap order; each step's delta applies on top of all earlier ones.
STEPS = (
    "baseline",
    "stage_ratio",
    "patchify_stem",
    "depthwise_conv",
    "increase_width",
    "inverted_bottleneck",
    "move_up_dwconv",
    "large_kernel",
    "gelu",
    "fewer_activations",
    "fewer_norms",
    "bn_to_ln",
    "separate_downsampling",
)


def step_deltas(regime: Regime) -> dict:
    """step name -> the model fields that step changes (the one place the roadmap's deltas are written)."""
    r = regime
    return {
        "baseline": dict(depths=list(r.depths), width=r.width),
        "stage_ratio": dict(depths=list(r.stage_ratio_depths), width=r.stage_ratio_width),
        "patchify_stem": dict(stem_type="patchify"),
        "depthwise_conv": dict(depthwise=True),
        "increase_width": dict(width=r.wide_width),
        "inverted_bottleneck": dict(expansion=1, mlp_ratio=4.0),
        "move_up_dwconv": dict(dw_position="top"),
        "large_kernel": dict(kernel_size=7),
        "gelu": dict(act_layer="gelu"),
        "fewer_activations": dict(acts_per_block="one"),
        "fewer_norms": dict(norms_per_block="one", ls_init_value=1e-6),
        "bn_to_ln": dict(norm_layer="layernorm", conv_bias=True),
        "separate_downsampling": dict(downsample="separate", head_norm=True),
    }


def get_regime(name: str) -> Regime:
    """A regime by name, or ConfigError listing the valid ones."""
    choice("regime", name, tuple(REGIMES))
    return REGIMES[name]


def _names(value, what: str) -> tuple:
    """A list of step names from a tuple, list (Hydra's ListConfig too), a single name or None."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise ConfigError(
            f"{what} must be a list of step names, got {value!r}; valid steps: {', '.join(STEPS)}"
        ) from None


def roadmap_order(roadmap: Optional[Iterable[str]] = None) -> tuple:
    """A roadmap (ordered step names, starting at baseline, each step once) validated; None is the paper's, STEPS."""
    if roadmap is None:
        return STEPS
    order = _names(roadmap, "roadmap")
    for name in order:
        if name not in STEPS:
            raise ConfigError(
                f"unknown step {name!r} in roadmap {list(order)}; a roadmap is an ordered list of step names, "
                f"valid: {', '.join(STEPS)}"
            )
    twice = sorted({n for n in order if order.count(n) > 1})
    if twice:
        raise ConfigError(f"roadmap {list(order)} lists {', '.join(twice)} more than once; each step may appear once")
    if not order or order[0] != "baseline":
        raise ConfigError(
            f"roadmap {list(order)} must start with 'baseline' (the ResNet every other step modifies), "
            f"then any of: {', '.join(STEPS[1:])}"
        )
    return order


def active_steps(step: str, without: Iterable[str] = (), roadmap: Optional[Iterable[str]] = None) -> tuple:
    """The steps switched on for `step`: the roadmap up to and including it, minus `without` (roadmap order)."""
    order = roadmap_order(roadmap)
    if step not in order:
        if step in STEPS:  # a real step that this (custom) roadmap leaves out: not a typo, so say so
            raise ConfigError(
                f"step {step!r} exists but this roadmap does not visit it; valid choices on this roadmap: "
                f"{', '.join(order)} (add {step!r} to the roadmap's steps to walk it)"
            )
        where = "" if roadmap is None else f" of roadmap {list(order)}"
        raise ConfigError(f"unknown step {step!r}{where}; valid choices: {', '.join(order)}")
    chain = order[: order.index(step) + 1]
    removable = ", ".join(chain[1:]) or "none (the chain is baseline alone)"
    for name in _names(without, "without"):
        if name not in STEPS:
            raise ConfigError(f"without={name!r} is not a step; steps that can be left out of {step!r}: {removable}")
        if name == "baseline":
            raise ConfigError(
                "without='baseline' is not possible: baseline is the ResNet every other step modifies, not a delta "
                f"that can be switched off; steps that can be left out of {step!r}: {removable}"
            )
        if name not in chain:
            why = "comes after it in the roadmap" if name in order else "is not in the roadmap"
            raise ConfigError(
                f"without={name!r} is not in the chain of step {step!r} (it {why}), so there is nothing to switch "
                f"off; steps that can be left out of {step!r}: {removable}"
            )
    left_out = set(_names(without, "without"))
    return tuple(s for s in chain if s not in left_out)


def config_of(active: Iterable[str], regime: Union[str, Regime] = "r50") -> dict:
    """ModelConfig fields of a set of switched-on steps: their deltas applied in the paper's order.

    Applying in the paper's order makes the model a function of the set, not of the order it was reached in: where
    two steps set one field (depths: baseline, stage_ratio; width: baseline, stage_ratio, increase_width) the later
    step of the paper's roadmap wins, and leaving a step out restores the value of the latest earlier step.
    """
    r = get_regime(regime) if isinstance(regime, str) else regime
    deltas, on = step_deltas(r), set(active)
    cfg = {}
    for name in STEPS:
        if name in on:
            cfg.update(deltas[name])
    return cfg


def step_config(
    step: str,
    regime: Union[str, Regime] = "r50",
    without: Iterable[str] = (),
    roadmap: Optional[Iterable[str]] = None,
    **overrides,
) -> ModelConfig:
    """The ModelConfig of `step` (the deltas of `roadmap` up to it, minus `without`), then `overrides` (any field)."""
    cfg = config_of(active_steps(step, without, roadmap), regime)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in overrides:
        choice("model field", key, sorted(fields))
    cfg.update(overrides)
    return ModelConfig(**cfg).validate()
