"""One generic network (stem -> stages -> head) whose every roadmap toggle comes from a ModelConfig."""

from __future__ import annotations

from collections import OrderedDict

import torch
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch.nn import functional as F

from .layers import ConvNormAct, LayerScale, make_act, make_norm
from .roadmap import ModelConfig


class Stem(nn.Sequential):
    """ResNet stem (7x7 conv, norm, act, 3x3 max-pool) or patchify stem (k x k stride-k conv, norm)."""

    def __init__(self, cfg: ModelConfig, in_chans: int, out_chans: int):
        super().__init__()
        s = cfg.stem_stride
        if cfg.stem_type == "patchify":
            self.conv = nn.Conv2d(in_chans, out_chans, s, s, bias=cfg.conv_bias)
            self.norm = make_norm(cfg.norm_layer, out_chans)
        else:
            # The max-pool keeps its stride 2 whenever the stem downsamples at all, so stem_stride=2 (small-image
            # proxies) drops the conv's stride, not the pool: the same total stride as a 2x2 patchify stem.
            pool = s > 1
            self.conv = nn.Conv2d(in_chans, out_chans, 7, s // 2 if pool else 1, 3, bias=cfg.conv_bias)
            self.norm = make_norm(cfg.norm_layer, out_chans)
            self.act = make_act(cfg.act_layer)
            if pool:
                self.pool = nn.MaxPool2d(3, 2, 1)


class Block(nn.Module):
    """Residual block covering every roadmap step: bottleneck or inverted, dw conv in the middle or on top.

    body = three ConvNormAct units named by role (conv_pw1, conv_spatial, conv_pw2) in the configured order;
    then layer scale, stochastic depth, the shortcut (identity or strided 1x1 projection + norm), the add and
    the post-add activation (ResNet) if any.
    """

    def __init__(self, cfg: ModelConfig, cin: int, cout: int, stride: int, drop_path: float):
        super().__init__()
        hidden = max(1, int(round(cout * cfg.mlp_ratio)))
        all_acts, all_norms = cfg.acts_per_block == "all", cfg.norms_per_block == "all"
        norm = cfg.norm_layer
        top = cfg.dw_position == "top"
        # (name, cin, cout, kernel, stride) in forward order
        if top:
            spec = [
                ("conv_spatial", cin, cin, cfg.kernel_size, stride),
                ("conv_pw1", cin, hidden, 1, 1),
                ("conv_pw2", hidden, cout, 1, 1),
            ]
        else:
            spec = [
                ("conv_pw1", cin, hidden, 1, 1),
                ("conv_spatial", hidden, hidden, cfg.kernel_size, stride),
                ("conv_pw2", hidden, cout, 1, 1),
            ]
        units = OrderedDict()
        for i, (name, ci, co, k, s) in enumerate(spec):
            spatial = name == "conv_spatial"
            groups = co if cfg.depthwise and spatial else (cfg.groups if spatial else 1)
            has_norm = all_norms or spatial
            # "fewer activations": one activation per block, right after the first 1x1 conv
            has_act = (i < 2) if all_acts else name == "conv_pw1"
            units[name] = ConvNormAct(
                ci, co, k, s, groups, norm if has_norm else None, cfg.act_layer if has_act else None, cfg.conv_bias
            )
        self.body = nn.Sequential(units)
        self.layer_scale = LayerScale(cout, cfg.ls_init_value) if cfg.ls_init_value else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = ConvNormAct(cin, cout, 1, stride, norm=norm, conv_bias=cfg.conv_bias)
        else:
            self.shortcut = nn.Identity()
        self.act = make_act(cfg.act_layer) if all_acts else nn.Identity()

    def forward(self, x):
        out = self.drop_path(self.layer_scale(self.body(x)))
        out += self.shortcut(x)  # in place, as timm: one activation-sized tensor less per block
        return self.act(out)


class Stage(nn.Module):
    """Optional separate downsampling layer (norm + 2x2 stride-2 conv), then the blocks."""

    def __init__(self, cfg: ModelConfig, cin: int, cout: int, depth: int, stride: int, dpr: list[float]):
        super().__init__()
        if cfg.downsample == "separate" and (stride != 1 or cin != cout):
            k = stride if stride > 1 else 1
            self.downsample = nn.Sequential(
                OrderedDict(norm=make_norm(cfg.norm_layer, cin), conv=nn.Conv2d(cin, cout, k, stride, bias=True))
            )
            cin, stride = cout, 1
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *[Block(cfg, cin if i == 0 else cout, cout, stride if i == 0 else 1, dpr[i]) for i in range(depth)]
        )

    def forward(self, x):
        return self.blocks(self.downsample(x))


class Head(nn.Module):
    """Global average pool -> optional norm -> dropout -> linear classifier."""

    def __init__(self, cfg: ModelConfig, channels: int, num_classes: int):
        super().__init__()
        self.norm = make_norm(cfg.norm_layer, channels) if cfg.head_norm else nn.Identity()
        self.drop = nn.Dropout(cfg.drop_rate)
        self.fc = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x):
        x = self.norm(F.adaptive_avg_pool2d(x, 1)).flatten(1)
        return self.fc(self.drop(x))


class RoadmapNet(nn.Module):
    """ResNet-to-ConvNeXt network built from one ModelConfig."""

    def __init__(self, cfg: ModelConfig, num_classes: int = 1000, in_chans: int = 3):
        super().__init__()
        self.cfg, self.num_classes = cfg.validate(), num_classes
        dims = cfg.stage_dims()
        self.stem = Stem(cfg, in_chans, cfg.base_width())
        total = sum(cfg.depths)
        dpr = torch.linspace(0, cfg.drop_path_rate, total).tolist()
        stages, cin, start = [], cfg.base_width(), 0
        for i, (depth, cout) in enumerate(zip(cfg.depths, dims)):
            stages.append(Stage(cfg, cin, cout, depth, 1 if i == 0 else 2, dpr[start : start + depth]))
            cin, start = cout, start + depth
        self.stages = nn.Sequential(*stages)
        self.num_features = dims[-1]
        self.head = Head(cfg, dims[-1], num_classes)
        self.apply(_init_weights)
        for m in self.modules():
            # Zero the last norm of each residual branch (timm's zero_init_last) so every block starts as identity.
            if isinstance(m, Block) and isinstance(getattr(m.body[-1], "norm", None), nn.BatchNorm2d):
                nn.init.zeros_(m.body[-1].norm.weight)

    def forward_features(self, x):
        """Stem and stages, before pooling."""
        return self.stages(self.stem(x))

    def forward(self, x):
        return self.head(self.forward_features(x))

    @property
    def min_input_size(self) -> int:
        """Smallest square input the stem and every stride-2 stage can take."""
        return self.cfg.stem_stride * 2 ** (len(self.cfg.depths) - 1)


def _init_weights(m: nn.Module) -> None:
    # The paper's recipe for every step: truncated normal std 0.02, zero bias.
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
