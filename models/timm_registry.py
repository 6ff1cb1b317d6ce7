"""Registers every step as a timm model: timm.create_model('roadmap_r50_large_kernel', kernel_size=5).

Each `roadmap_<regime>_<step>` is built through timm's build_model_with_cfg with a pretrained cfg of its own, so
timm's machinery works on it as on its ConvNeXt: `features_only=True` / `out_indices` (the four stage outputs),
`feature_cls='getter'` (forward_intermediates), local weights by `pretrained=True,
pretrained_cfg_overlay=dict(file=path)` (converted by models.pretrained, then adapted by timm to a new class
count or input channel count), and timm.data.resolve_data_config for the eval transform. Keyword arguments
other than timm's own go to models.build_model (ModelConfig fields such as kernel_size or width_mult).
"""

from __future__ import annotations

import os
from functools import partial

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg

from .layers import ConfigError
from .pretrained import convert, fit_shape, unwrap
from .roadmap import REGIMES, STEPS, get_regime

__all__: list[str] = []

_ENDPOINTS = {"r50": ("ResNet-50", "ConvNeXt-T"), "r200": ("ResNet-200", "ConvNeXt-B")}


def _cfg(step: str, regime: str) -> dict:
    start, end = _ENDPOINTS[regime]
    # Every step is trained with the paper's recipe, whose evaluation is ConvNeXt's: 224 px, bicubic resize to 256
    # (crop_pct 0.875), ImageNet mean/std. pool_size is the last stage's grid at 224 px with the ImageNet stem.
    return dict(
        url="",  # no published weights: local files only (pretrained_cfg_overlay=dict(file=...))
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        crop_pct=0.875,
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="stem.conv",
        classifier="head.fc",
        paper_ids="arXiv:2201.03545",
        paper_name="A ConvNet for the 2020s",
        origin_url="https://github.com/facebookresearch/ConvNeXt",
        description=f"{start} -> {end} roadmap, step {STEPS.index(step)} of {len(STEPS) - 1}: {step}",
    )


default_cfgs = generate_default_cfgs(
    {f"roadmap_{regime}_{step}": _cfg(step, regime) for regime in REGIMES for step in STEPS}
)


def _no_weights_error(variant: str) -> ConfigError:
    return ConfigError(
        f"{variant} has no published weights, so pretrained=True needs a local file: "
        f"timm.create_model({variant!r}, pretrained=True, pretrained_cfg_overlay=dict(file='weights.pth')); "
        "the baseline steps load timm/torchvision resnet50 or resnet200 checkpoints, separate_downsampling loads "
        "timm/torchvision/official convnext_tiny or convnext_base checkpoints, and every step loads this project's "
        "own checkpoints (run folders' last.pt)"
    )


def _check_weights_source(variant: str, kwargs: dict) -> None:
    """ConfigError unless the resolved pretrained cfg names weights (timm would otherwise fail on its own)."""
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    if cfg.file:
        if not os.path.isfile(cfg.file):
            raise ConfigError(f"pretrained checkpoint {cfg.file!r} for {variant} does not exist (local files only)")
    elif cfg.state_dict is None and not cfg.url and not cfg.hf_hub_id:
        raise _no_weights_error(variant)


def checkpoint_filter_fn(state_dict: dict, model) -> dict:
    """timm's pretrained_filter_fn: a timm, torchvision, official ConvNeXt or own checkpoint in our key names.

    models.pretrained detects the format, renames and fits shapes (the same conversion as
    build_model(pretrained=path)). The classifier is passed on unfitted when the model's class count differs from
    the cfg's, and so is a first conv whose input channels differ: timm's load_pretrained then drops the one and
    adapts the other (adapt_input_conv), as for its own models.
    """
    fmt, renamed = convert(unwrap(state_dict))
    own = model.state_dict()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    adapted = set()
    if model.num_classes != cfg.get("num_classes", model.num_classes):
        adapted |= {f"{cfg['classifier']}.weight", f"{cfg['classifier']}.bias"}
    first = f"{cfg.get('first_conv', 'stem.conv')}.weight"
    if first in renamed and first in own and renamed[first].shape[1] != own[first].shape[1]:
        adapted.add(first)
    renamed = {k: v for k, v in renamed.items() if not k.endswith("num_batches_tracked") or k in own}
    missing = sorted(set(own) - set(renamed) - adapted)
    unexpected = sorted(set(renamed) - set(own) - adapted)
    if missing or unexpected:
        raise ConfigError(
            f"pretrained checkpoint ({fmt}) does not fit {cfg.get('architecture', 'this model')}: {len(missing)} "
            f"missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); "
            "baseline loads resnet50/resnet200, separate_downsampling loads convnext_tiny/convnext_base"
        )
    return {k: v if k in adapted else fit_shape(k, v, own[k].shape, fmt) for k, v in renamed.items()}


def _build(step: str, regime: str, global_pool: str | None = None, device=None, dtype=None, **kwargs):
    """models.build_model plus the constructor arguments timm passes that ModelConfig does not have."""
    from . import build_model  # models/__init__ imports this module at its end

    model = build_model(step, regime, **kwargs)
    if global_pool is not None:
        model.reset_classifier(model.num_classes, global_pool)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def create(step: str, regime: str = "r50", pretrained: bool = False, **kwargs):
    """Build a roadmap step through timm's build_model_with_cfg (pretrained cfg, features_only, local weights)."""
    get_regime(regime)
    variant = f"roadmap_{regime}_{step}"
    if pretrained:
        _check_weights_source(variant, kwargs)
    return build_model_with_cfg(
        partial(_build, step, regime),
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


def _entrypoint(step: str, regime: str):
    def fn(pretrained: bool = False, **kwargs):
        return create(step, regime, pretrained, **kwargs)

    fn.__name__ = f"roadmap_{regime}_{step}"
    fn.__qualname__ = fn.__name__
    fn.__module__ = __name__
    fn.__doc__ = f"Roadmap step {step!r} of regime {regime!r}."
    return fn


for _regime in REGIMES:
    for _step in STEPS:
        _fn = register_model(_entrypoint(_step, _regime))
        globals()[_fn.__name__] = _fn
