"""One generic network (stem -> stages -> head) whose every roadmap toggle comes from a ModelConfig."""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Set, Tuple, Union

import torch
from timm.layers import DropPath
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices  # timm's own models import it from here
from torch import nn

from .heads import Head, head_name
from .layers import ConfigError, ConvNormAct, LayerScale, choice, make_act, make_norm
from .layers import init_weights as _init_weights
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
        self.grad_checkpointing = False

    def forward(self, x):
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            # timm's checkpoint_seq: each block recomputed in backward instead of keeping its activations
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class RoadmapNet(nn.Module):
    """ResNet-to-ConvNeXt network built from one ModelConfig, with timm's model interface (as its ConvNeXt)."""

    # torch.jit.script compiles properties; this one reads the (unscriptable) config and is Python-only.
    __jit_unused_properties__ = ["min_input_size"]

    def __init__(self, cfg: ModelConfig, num_classes: int = 1000, in_chans: int = 3, global_pool: Optional[str] = None):
        super().__init__()
        self.cfg, self.num_classes = cfg.validate(), num_classes
        self.drop_rate = cfg.drop_rate
        dims = cfg.stage_dims()
        self.stem = Stem(cfg, in_chans, cfg.base_width())
        total = sum(cfg.depths)
        dpr = torch.linspace(0, cfg.drop_path_rate, total, device="cpu").tolist()  # also when built on "meta"
        stages, cin, start = [], cfg.base_width(), 0
        # Stage i leaves the stem's stride times 2**i (stage 0 keeps the stem's resolution): one pyramid level each.
        self.feature_info = []
        for i, (depth, cout) in enumerate(zip(cfg.depths, dims)):
            stages.append(Stage(cfg, cin, cout, depth, 1 if i == 0 else 2, dpr[start : start + depth]))
            self.feature_info.append(dict(num_chs=cout, reduction=cfg.stem_stride * 2**i, module=f"stages.{i}"))
            cin, start = cout, start + depth
        self.stages = nn.Sequential(*stages)
        self.num_features = dims[-1]
        name = head_name(cfg.head, cfg.head_norm)
        self.head = Head(name, dims[-1], num_classes, cfg.norm_layer, cfg.drop_rate, cfg.head_hidden, global_pool)
        self.head_hidden_size = self.head.hidden_size
        self.apply(_init_weights)
        for m in self.modules():
            # Zero the last norm of each residual branch (timm's zero_init_last) so every block starts as identity.
            if isinstance(m, Block) and isinstance(getattr(m.body[-1], "norm", None), nn.BatchNorm2d):
                nn.init.zeros_(m.body[-1].norm.weight)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        """Parameter groups in depth order for layer-wise lr decay: stem, then stages (coarse) or blocks; head last."""
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),  # a stage's downsampling layer joins its first block
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            ],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Names exempt from weight decay beyond timm's 1-D rule (norms, biases, layer scale are 1-D): none."""
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (timm.models.checkpoint_seq) to save memory."""
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final linear layer, the classifier (nn.Identity when num_classes is 0)."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False) -> None:
        """A new classifier for `num_classes` (0: none, forward returns pooled features); '' pool keeps maps."""
        like = self.stem.conv.weight  # the new layer goes where the model is (device, dtype)
        self.head.reset(num_classes, global_pool, reset_other, in_features=self.num_features, like=like)
        self.num_classes = num_classes
        self.head_hidden_size = self.head.hidden_size

    def _take_indices(self, indices) -> Tuple[List[int], int]:
        n = len(self.stages)
        try:
            return feature_take_indices(n, indices)
        except (AssertionError, TypeError):
            raise ConfigError(
                f"indices {indices!r} do not select stages of this model: it has {n} stages; pass an int k "
                f"(the last k), a list of stage indices 0..{n - 1} (negative counts from the end) or None (all)"
            ) from None

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs selected by `indices` (timm's semantics), with the final features unless intermediates_only.

        `norm` is accepted for timm's interface and changes nothing: no norm sits between the last stage and the
        head's pooling (ConvNeXt's head norm comes after pooling, as in timm's convnext, whose norm_pre is Identity).
        """
        choice("output_fmt", output_fmt, ("NCHW",))
        take_indices, max_index = self._take_indices(indices)
        x = self.stem(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop the stages after the last one `indices` needs (and the head); returns the absolute indices."""
        take_indices, max_index = self._take_indices(indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if prune_end:
            # the features now end at the last kept stage; the head was sized for the final stage, so it goes too
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "", reset_other=True)
        return take_indices

    def forward_features(self, x):
        """Stem and stages, before pooling (N, num_features, H / 32, W / 32 with the ImageNet stem)."""
        return self.stages(self.stem(x))

    def forward_head(self, x, pre_logits: bool = False):
        """The head (model.head: pool, norm / MLP, dropout, classifier); `pre_logits` stops before the classifier
        (head_hidden_size wide)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    @property
    def min_input_size(self) -> int:
        """Smallest square input the stem and every stride-2 stage can take."""
        return self.cfg.stem_stride * 2 ** (len(self.cfg.depths) - 1)
