"""Load local checkpoints of the roadmap's endpoints saved from timm, torchvision or the official ConvNeXt code.

Each foreign format is a list of (regex, replacement) renames into this package's names; 1x1 weights saved from
nn.Linear and [C,1,1] layer scales are reshaped to our shapes. Detection is by a key only that format has.
"""

from __future__ import annotations

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


def unwrap(obj) -> dict:
    """The state dict inside a checkpoint: plain, or under 'model' / 'state_dict' / 'model_ema'."""
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return unwrap(obj[key])
    if not isinstance(obj, dict):
        raise ConfigError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def convert(state: dict) -> tuple[str, dict]:
    """Detect the checkpoint's format and rename its keys to ours; returns (format name, new state dict)."""
    for name, marker, rules in FORMATS:
        if marker in state:
            out = {}
            for key, value in state.items():
                for pattern, repl in rules:
                    key = re.sub(pattern, repl, key)
                out[key] = value
            return name, out
    known = ", ".join(f"{n} (has {m!r})" for n, m, _ in FORMATS)
    raise ConfigError(f"unrecognised checkpoint format (first keys: {list(state)[:3]}); known formats: {known}")


def load_pretrained(model: nn.Module, path: str) -> str:
    """Load a local checkpoint file into `model` (strict); returns the detected format name."""
    if not os.path.isfile(path):
        raise ConfigError(f"pretrained checkpoint {path!r} does not exist (pretrained must be a local file)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or non-torch file
        raise ConfigError(f"cannot read pretrained checkpoint {path!r}: {e}") from None
    fmt, state = convert(unwrap(raw))
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") or k in own}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {path!r} ({fmt}) does not fit this model: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); "
            "baseline loads resnet50/resnet200, separate_downsampling loads convnext_tiny/convnext_base"
        )
    for k, v in state.items():
        if v.shape != own[k].shape:
            if v.numel() != own[k].numel():
                raise ConfigError(
                    f"checkpoint {path!r} ({fmt}): {k} has shape {tuple(v.shape)}, "
                    f"the model needs {tuple(own[k].shape)} (wrong regime or class count?)"
                )
            state[k] = v.reshape(own[k].shape)  # nn.Linear 1x1 -> conv 1x1, [C,1,1] layer scale -> [C]
    model.load_state_dict(state, strict=True)
    return fmt
