"""The roadmap as model-config deltas: ModelConfig, the two regimes and one small delta per step.

conf/step/*.yaml states the same deltas for Hydra; tests/test_conf.py keeps the two equal for every step and
regime. Nothing here imports Hydra.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

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
    head_norm: bool = False  # norm after global pooling
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
        for name in ("kernel_size", "stem_stride", "width", "expansion", "groups"):
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
    """step name -> the model fields that step changes (mirrors conf/step/*.yaml)."""
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


def step_config(step: str, regime: str = "r50", **overrides) -> ModelConfig:
    """The ModelConfig of `step` (all deltas up to it applied), then `overrides` (any ModelConfig field)."""
    choice("step", step, STEPS)
    deltas = step_deltas(get_regime(regime))
    cfg = {}
    for name in STEPS[: STEPS.index(step) + 1]:
        cfg.update(deltas[name])
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in overrides:
        choice("model field", key, sorted(fields))
    cfg.update(overrides)
    return ModelConfig(**cfg).validate()
