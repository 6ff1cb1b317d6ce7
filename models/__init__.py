"""ResNet-to-ConvNeXt roadmap models, usable without Hydra: `from models import build_model`."""

from __future__ import annotations

from torch import nn

from .layers import ConfigError
from .net import RoadmapNet
from .pretrained import load_pretrained
from .roadmap import REGIMES, STEPS, ModelConfig, Regime, step_config

__all__ = ["build_model", "step_config", "ModelConfig", "Regime", "RoadmapNet", "ConfigError", "STEPS", "REGIMES"]


def build_model(
    step: str,
    regime: str = "r50",
    num_classes: int = 1000,
    in_chans: int = 3,
    pretrained: str | None = None,
    **overrides,
) -> nn.Module:
    """Build roadmap step `step` of `regime`; `overrides` are ModelConfig fields (e.g. kernel_size=5)."""
    model = RoadmapNet(step_config(step, regime, **overrides), num_classes=num_classes, in_chans=in_chans)
    if pretrained:
        load_pretrained(model, pretrained)
    return model


from . import timm_registry  # noqa: E402,F401  (registers roadmap_<regime>_<step> with timm)
