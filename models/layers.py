"""Small component registries: norms, activations and the conv-norm-act unit every block is made of."""

from __future__ import annotations

import torch
from timm.layers import LayerNorm2d, trunc_normal_
from torch import nn
from torch.nn import functional as F


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


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 stride-1 dense conv computed as nn.Linear over channels-last data (timm's ConvNeXt MLP does the same).

    The parameters stay Conv2d-shaped (out, in, 1, 1), so checkpoints, initialisation and FLOP counts are those
    of the conv; only the kernel differs: on CPU a matmul over (N*H*W, C) trains ~1.3x faster than oneDNN's 1x1
    conv backward. The output keeps the channels-last layout (the input's, if it was channels-last).
    """

    def __init__(self, cin: int, cout: int, bias: bool = True):
        super().__init__(cin, cout, 1, bias=bias)

    def forward(self, x):
        w = self.weight.view(self.out_channels, self.in_channels)
        return F.linear(x.permute(0, 2, 3, 1), w, self.bias).permute(0, 3, 1, 2)


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
        bias = conv_bias or norm is None
        if kernel_size == 1 and stride == 1 and groups == 1 and padding == 0:
            self.conv = PointwiseConv2d(cin, cout, bias=bias)
        else:
            self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=bias)
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


def init_weights(m: nn.Module) -> None:
    """The paper's recipe for every step: truncated normal std 0.02, zero bias (convs and linears)."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
