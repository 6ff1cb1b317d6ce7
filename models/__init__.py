"""ResNet-to-ConvNeXt roadmap models, usable without Hydra: `from models import build_model`."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from torch import nn

# timm decorates a few activations with torch.jit.script, which recent torch deprecates loudly at import time
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)

from .layers import ConfigError  # noqa: E402
from .net import RoadmapNet  # noqa: E402
from .pretrained import load_pretrained  # noqa: E402
from .roadmap import REGIMES, STEPS, ModelConfig, Regime, step_config  # noqa: E402

__all__ = ["build_model", "step_config", "ModelConfig", "Regime", "RoadmapNet", "ConfigError", "STEPS", "REGIMES"]


def build_model(
    step: str,
    regime: str = "r50",
    num_classes: int = 1000,
    in_chans: int = 3,
    pretrained: str | None = None,
    without: Iterable[str] = (),
    roadmap: Iterable[str] | None = None,
    **overrides,
) -> nn.Module:
    """Build `step` of `regime` along `roadmap` (default the paper's) minus `without`; overrides: ModelConfig fields."""
    cfg = step_config(step, regime, without=without, roadmap=roadmap, **overrides)
    model = RoadmapNet(cfg, num_classes=num_classes, in_chans=in_chans)
    if pretrained:
        load_pretrained(model, pretrained)
    return model


from . import timm_registry  # noqa: E402,F401  (registers roadmap_<regime>_<step> with timm)
