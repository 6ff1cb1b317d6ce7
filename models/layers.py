"""Small component registries: norms, activations and the conv-norm-act unit every block is made of."""

from __future__ import annotations

import torch
from timm.layers import LayerNorm2d
from torch import nn


class ConfigError(ValueError):
    """A user mistake in a model, data or training setting; its message names the bad value and the valid ones."""


def choice(kind: str, value, valid) -> None:
    """Raise ConfigError unless `value` is one of `valid`."""
    if value not in valid:
        raise ConfigError(f"unknown {kind} {value!r}; valid choices: {', '.join(map(str, valid))}")


def _batchnorm(channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels)


def _layernorm(channels: int) -> nn.Module:
    # ConvNeXt's LayerNorm normalises over channels at each position (eps 1e-6 as in the official code).
    return LayerNorm2d(channels, eps=1e-6)


NORMS = {"batchnorm": _batchnorm, "layernorm": _layernorm}
ACTS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}


def make_norm(name: str, channels: int) -> nn.Module:
    """A channels-first (NCHW) norm by name."""
    choice("norm_layer", name, NORMS)
    return NORMS[name](channels)


def make_act(name: str) -> nn.Module:
    """An activation module by name."""
    choice("act_layer", name, ACTS)
    return ACTS[name]()


class ConvNormAct(nn.Sequential):
    """conv -> optional norm -> optional act; children are named conv / norm / act so checkpoints map by role.

    A conv that no norm follows always has a bias; `conv_bias` adds one before a norm too (ConvNeXt does).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        norm: str | None = None,
        act: str | None = None,
        conv_bias: bool = False,
        padding: int | None = None,
    ):
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=conv_bias or norm is None)
        if norm is not None:
            self.norm = make_norm(norm, cout)
        if act is not None:
            self.act = make_act(act)


class LayerScale(nn.Module):
    """Per-channel learnable residual scale (ConvNeXt's gamma), NCHW."""

    def __init__(self, channels: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), float(init_value)))

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)
