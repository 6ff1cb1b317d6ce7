"""Registers every step as a timm model: timm.create_model('roadmap_r50_large_kernel', kernel_size=5)."""

from __future__ import annotations

from timm.models import register_model

from .roadmap import REGIMES, STEPS

__all__: list[str] = []


def _entrypoint(step: str, regime: str):
    def fn(pretrained: bool = False, **kwargs):
        from . import build_model

        if pretrained:
            raise ValueError("roadmap models have no hub weights; pass a local file: build_model(..., pretrained=path)")
        kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
        kwargs.pop("cache_dir", None)
        return build_model(step, regime, **kwargs)

    fn.__name__ = f"roadmap_{regime}_{step}"
    fn.__qualname__ = fn.__name__
    fn.__module__ = __name__
    fn.__doc__ = f"Roadmap step {step!r} of regime {regime!r}."
    return fn


for _regime in REGIMES:
    for _step in STEPS:
        _fn = register_model(_entrypoint(_step, _regime))
        globals()[_fn.__name__] = _fn
