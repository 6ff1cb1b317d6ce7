"""Load local checkpoints of the roadmap's endpoints saved from timm, torchvision or the official ConvNeXt code.

Each foreign format is a list of (regex, replacement) renames into this package's names. Detection is by a key only
that format has. Every tensor must then have exactly our shape, save two real format conversions (CONVERSIONS):
ConvNeXt's pointwise convs saved from nn.Linear ([out, in] -> our 1x1 conv [out, in, 1, 1]) and torchvision's
[C, 1, 1] layer scale (-> [C]). Anything else, a transposed or swapped weight with the right element count
included, is a ConfigError naming the key and both shapes.
"""

from __future__ import annotations

import argparse
import math
import os
import re

import torch
from torch import nn

from .layers import ConfigError

_RESNET = [  # timm and torchvision resnet50/200 share these names
    (r"^conv1\.", "stem.conv."),
    (r"^bn1\.", "stem.norm."),
    (r"^fc\.", "head.fc."),
    (r"^layer(\d+)\.(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}."),
    (r"(blocks\.\d+)\.conv1\.", r"\1.body.conv_pw1.conv."),
    (r"(blocks\.\d+)\.bn1\.", r"\1.body.conv_pw1.norm."),
    (r"(blocks\.\d+)\.conv2\.", r"\1.body.conv_spatial.conv."),
    (r"(blocks\.\d+)\.bn2\.", r"\1.body.conv_spatial.norm."),
    (r"(blocks\.\d+)\.conv3\.", r"\1.body.conv_pw2.conv."),
    (r"(blocks\.\d+)\.bn3\.", r"\1.body.conv_pw2.norm."),
    (r"\.downsample\.0\.", ".shortcut.conv."),
    (r"\.downsample\.1\.", ".shortcut.norm."),
]
_CONVNEXT_BLOCK = [  # timm and official names inside a block, once the block prefix is ours
    (r"(blocks\.\d+)\.(conv_dw|dwconv)\.", r"\1.body.conv_spatial.conv."),
    (r"(blocks\.\d+)\.norm\.", r"\1.body.conv_spatial.norm."),
    (r"(blocks\.\d+)\.(mlp\.fc1|pwconv1)\.", r"\1.body.conv_pw1.conv."),
    (r"(blocks\.\d+)\.(mlp\.fc2|pwconv2)\.", r"\1.body.conv_pw2.conv."),
    (r"(blocks\.\d+)\.gamma$", r"\1.layer_scale.gamma"),
]
_TIMM_CONVNEXT = [
    (r"^stem\.0\.", "stem.conv."),
    (r"^stem\.1\.", "stem.norm."),
    (r"^stages\.(\d+)\.downsample\.0\.", r"stages.\1.downsample.norm."),
    (r"^stages\.(\d+)\.downsample\.1\.", r"stages.\1.downsample.conv."),
    (r"^head\.norm\.", "head.norm."),
    (r"^head\.fc\.", "head.fc."),
] + _CONVNEXT_BLOCK
_OFFICIAL_CONVNEXT = [
    (r"^downsample_layers\.0\.0\.", "stem.conv."),
    (r"^downsample_layers\.0\.1\.", "stem.norm."),
    (r"^downsample_layers\.(\d+)\.0\.", r"stages.\1.downsample.norm."),
    (r"^downsample_layers\.(\d+)\.1\.", r"stages.\1.downsample.conv."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
    (r"^norm\.", "head.norm."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
] + _CONVNEXT_BLOCK
_TV_CONVNEXT = [
    (r"^features\.0\.0\.", "stem.conv."),
    (r"^features\.0\.1\.", "stem.norm."),
    (
        r"^features\.(\d+)\.(\d+)\.block\.0\.",
        lambda m: f"stages.{int(m[1]) // 2}.blocks.{m[2]}.body.conv_spatial.conv.",
    ),
    (
        r"^features\.(\d+)\.(\d+)\.block\.2\.",
        lambda m: f"stages.{int(m[1]) // 2}.blocks.{m[2]}.body.conv_spatial.norm.",
    ),
    (r"^features\.(\d+)\.(\d+)\.block\.3\.", lambda m: f"stages.{int(m[1]) // 2}.blocks.{m[2]}.body.conv_pw1.conv."),
    (r"^features\.(\d+)\.(\d+)\.block\.5\.", lambda m: f"stages.{int(m[1]) // 2}.blocks.{m[2]}.body.conv_pw2.conv."),
    (r"^features\.(\d+)\.(\d+)\.layer_scale$", lambda m: f"stages.{int(m[1]) // 2}.blocks.{m[2]}.layer_scale.gamma"),
    # downsampling after the block rules: features.<odd>.<j>.block... are blocks
    (r"^features\.(\d+)\.0\.", lambda m: f"stages.{int(m[1]) // 2}.downsample.norm."),
    (r"^features\.(\d+)\.1\.(?=weight|bias)", lambda m: f"stages.{int(m[1]) // 2}.downsample.conv."),
    (r"^classifier\.0\.", "head.norm."),
    (r"^classifier\.2\.", "head.fc."),
]
# (name, a key only that format has, its renames)
FORMATS = [
    ("roadmap", "stem.conv.weight", []),
    ("timm/torchvision resnet", "layer1.0.conv1.weight", _RESNET),
    ("timm convnext", "stages.0.blocks.0.conv_dw.weight", _TIMM_CONVNEXT),
    ("official ConvNeXt", "downsample_layers.0.0.weight", _OFFICIAL_CONVNEXT),
    ("torchvision convnext", "features.0.0.weight", _TV_CONVNEXT),
]


# The only shape changes that are format conversions, by our key: (key pattern, the checkpoint's shape as a function
# of ours, what it converts). Our own format needs none.
CONVERSIONS = [
    (
        re.compile(r"\.body\.conv_pw[12]\.conv\.weight$"),
        lambda shape: shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else None,
        "ConvNeXt's nn.Linear [out, in] -> 1x1 conv [out, in, 1, 1]",
    ),
    (
        re.compile(r"\.layer_scale\.gamma$"),
        lambda shape: (*shape, 1, 1) if len(shape) == 1 else None,
        "torchvision's [C, 1, 1] layer scale -> [C]",
    ),
]
# Wrappers a training script puts around the state dict, tried in this order: the plain weights before an EMA copy
# (this project's last.pt and the official code save "model", timm's train.py "state_dict"; "model_ema" alone is
# an EMA-only export).
WRAPPER_KEYS = ("model", "state_dict", "model_ema")
# Prefixes that wrappers add to every key: DistributedDataParallel ("module.") and torch.compile ("_orig_mod.").
KEY_PREFIXES = ("module.", "_orig_mod.")


def unwrap(obj) -> dict:
    """The state dict inside a checkpoint: plain, or under 'model' / 'state_dict' / 'model_ema', prefixes removed."""
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return unwrap(obj[key])
    if not isinstance(obj, dict):
        raise ConfigError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    out = {}
    for k, v in obj.items():
        while isinstance(k, str) and k.startswith(KEY_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    bad = [k for k, v in out.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(
            f"checkpoint is not a state dict: {len(bad)} entries are not tensors (e.g. {bad[:3]}); "
            f"the weights must be top-level or under one of {', '.join(WRAPPER_KEYS)}"
        )
    return out


def _renamed(state: dict) -> tuple[str, dict]:
    """Detect the format; returns (format name, {our key: (checkpoint key, tensor)})."""
    for name, marker, rules in FORMATS:
        if marker in state:
            out = {}
            for key, value in state.items():
                new = key
                for pattern, repl in rules:
                    new = re.sub(pattern, repl, new)
                if new in out:  # two checkpoint tensors renamed onto one of ours: one would be dropped silently
                    raise ConfigError(f"{out[new][0]} and {key} both map to {new} ({name} format)")
                out[new] = (key, value)
            return name, out
    known = ", ".join(f"{n} (has {m!r})" for n, m, _ in FORMATS)
    raise ConfigError(f"unrecognised checkpoint format (first keys: {list(state)[:3]}); known formats: {known}")


def convert(state: dict) -> tuple[str, dict]:
    """Detect the checkpoint's format and rename its keys to ours; returns (format name, new state dict)."""
    fmt, renamed = _renamed(state)
    return fmt, {k: v for k, (_, v) in renamed.items()}


def fit_shape(key: str, value: torch.Tensor, shape: tuple, fmt: str, source: str | None = None) -> torch.Tensor:
    """`value` as our `shape`: unchanged, or through one of CONVERSIONS; else ConfigError naming key and shapes."""
    shape = tuple(shape)
    if tuple(value.shape) == shape:
        return value
    if fmt != "roadmap":
        for pattern, source_shape, _ in CONVERSIONS:
            if pattern.search(key) and source_shape(shape) == tuple(value.shape):
                return value.reshape(shape)
    name = key if source in (None, key) else f"{source} (our {key})"
    if value.numel() == math.prod(shape):
        why = (
            "same number of elements, so a transposed, swapped or mis-mapped weight; the only conversions are "
            + "; ".join(desc for _, _, desc in CONVERSIONS)
        )
    else:
        why = "wrong regime or class count?"
    raise ConfigError(f"{name} has shape {tuple(value.shape)}, the model needs {shape} ({why})")


def read_checkpoint(path: str):
    """torch.load of a local file with weights_only=True; any failure is a ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"pretrained checkpoint {path!r} does not exist (pretrained must be a local file)")
    try:
        # timm's train.py and the official ConvNeXt main.py store their argparse.Namespace beside the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt, truncated or non-torch file, or one that needs arbitrary code to unpickle
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        # torch's weights_only message is a page long; its one informative line names the refused object
        m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\. Please|\n|$)", text)
        detail = m[1] if m else (text.strip().splitlines() or ["empty or truncated file"])[0].split(". ")[0]
        raise ConfigError(
            f"cannot read pretrained checkpoint {path!r} ({type(e).__name__}: {detail[:200]}); it must be a "
            "torch.save file of tensors and plain containers (it is read with weights_only=True)"
        ) from None


def _renamed_for(model: nn.Module, raw, path: str) -> tuple[str, dict, dict]:
    """A loaded checkpoint in this model's key names: (format, {key: (source key, tensor)}, model.state_dict());
    BatchNorm's num_batches_tracked only where the model has it."""
    try:
        fmt, renamed = _renamed(unwrap(raw))
    except ConfigError as e:
        raise ConfigError(f"pretrained checkpoint {path!r}: {e}") from None
    own = model.state_dict()
    return fmt, {k: v for k, v in renamed.items() if not k.endswith("num_batches_tracked") or k in own}, own


def load_pretrained(model: nn.Module, path: str) -> str:
    """Load a local checkpoint file into `model` (strict, exact shapes); returns the detected format name."""
    fmt, renamed, own = _renamed_for(model, read_checkpoint(path), path)
    missing = sorted(set(own) - set(renamed))
    unexpected = sorted(set(renamed) - set(own))
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {path!r} ({fmt}) does not fit this model: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); "
            "baseline loads resnet50/resnet200, separate_downsampling loads convnext_tiny/convnext_base"
        )
    try:
        state = {k: fit_shape(k, v, own[k].shape, fmt, source) for k, (source, v) in renamed.items()}
    except ConfigError as e:
        raise ConfigError(f"checkpoint {path!r} ({fmt}): {e}") from None
    model.load_state_dict(state, strict=True)
    return fmt


def _classifier_key(key: str) -> bool:
    return key.startswith("head.fc.")


def load_finetune(model: nn.Module, state: dict, path: str, keep_classifier: bool = True) -> dict:
    """Load a checkpoint's state dict (any known format) for fine-tuning `model`, whose head may differ.

    The body (stem and stages) must fit exactly (every key, every shape), as in load_pretrained. The head's layers
    before the classifier load when the checkpoint has exactly them with the same shapes (the same model.head), and
    are left new otherwise. The classifier (head.fc) loads only when `keep_classifier` and its shape fits (the same
    classes); otherwise it stays new, sized to this model's classes. Returns what loaded: {'format', 'head',
    'classifier'} ('loaded' / 'new'; head 'none': a linear head has no layers before its classifier).
    """
    fmt, renamed, own = _renamed_for(model, state, path)
    body_own = {k for k in own if not k.startswith("head.")}
    body_ck = {k for k in renamed if not k.startswith("head.")}
    missing, unexpected = sorted(body_own - body_ck), sorted(body_ck - body_own)
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {path!r} ({fmt}) does not fit this model's body: {len(missing)} missing keys (e.g. "
            f"{missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); fine-tuning needs the same "
            "step, regime and model fields as the pretrained run (only model.head may differ)"
        )
    try:
        load = {k: fit_shape(k, renamed[k][1], own[k].shape, fmt, renamed[k][0]) for k in sorted(body_own)}
    except ConfigError as e:
        raise ConfigError(f"checkpoint {path!r} ({fmt}): {e}") from None

    def part(state, classifier: bool) -> set:
        return {k for k in state if k.startswith("head.") and _classifier_key(k) == classifier}

    def same_shapes(keys) -> bool:
        return all(tuple(renamed[k][1].shape) == tuple(own[k].shape) for k in keys)

    # the same head type has the same keys (none for the linear head); a classifier means nothing on another head
    head_fits = part(renamed, False) == part(own, False) and same_shapes(part(own, False))
    fc = part(own, True)
    fc_fits = keep_classifier and head_fits and bool(fc) and part(renamed, True) == fc and same_shapes(fc)
    for keys, fit in ((part(own, False), head_fits), (fc, fc_fits)):
        if fit:
            load.update({k: renamed[k][1] for k in keys})
    layers = "none" if not part(own, False) else "loaded" if head_fits else "new"  # none: a linear head
    done = {"format": fmt, "head": layers, "classifier": "loaded" if fc_fits else "new"}
    model.load_state_dict(load, strict=False)
    return done
