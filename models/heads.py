"""Classifier heads behind a small registry (`model.head`): what sits between the last stage and the logits.

Every head is one `Head` module: global pool -> optional norm (the body's norm, on the pooled map) -> flatten ->
optional MLP (the pre-logits layers) -> dropout (model.drop_rate) -> classifier `fc`. The registry names which of
these parts a head has; `forward(x, pre_logits=True)` stops before `fc`, and `hidden_size` is that width (timm's
head_hidden_size). The roadmap's own heads keep their module names (head.norm, head.fc), so checkpoints of
ResNet / ConvNeXt load unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from timm.layers import SelectAdaptivePool2d
from torch import nn

from .layers import ConfigError, choice, init_weights, make_norm

# Global pools a caller can ask for (timm's SelectAdaptivePool2d types that keep the pooled width; '' = no pooling);
# a head's own default pool (the fastai heads' concat pool) is valid for that head too.
GLOBAL_POOLS = ("avg", "max", "avgmax", "")


def _fastai_mlp(width: int, hidden: int) -> nn.Module:
    # fastai's create_head: LinBnDrop(bn, p=0.25, ReLU) then BatchNorm1d + p=0.5 before the classifier; a linear
    # that a BatchNorm follows has no bias (fastai's bias=not bn)
    return nn.Sequential(
        OrderedDict(
            bn1=nn.BatchNorm1d(width),
            drop1=nn.Dropout(0.25),
            fc1=nn.Linear(width, hidden, bias=False),
            act=nn.ReLU(inplace=True),
            bn2=nn.BatchNorm1d(hidden),
            drop2=nn.Dropout(0.5),
        )
    )


def _fastai_convnext_mlp(width: int, hidden: int) -> nn.Module:
    # the fastai head in ConvNeXt's vocabulary: LayerNorm and GELU for BatchNorm and ReLU, no dropout
    return nn.Sequential(OrderedDict(norm=nn.LayerNorm(width, eps=1e-6), fc1=nn.Linear(width, hidden), act=nn.GELU()))


@dataclass(frozen=True)
class HeadType:
    """Which parts a head has: its default pool, a norm after pooling, an MLP builder (width, hidden), fc's bias."""

    pool: str
    norm: bool
    mlp: Optional[Callable[[int, int], nn.Module]] = None
    fc_bias: bool = True


HEADS = {
    "linear": HeadType("avg", norm=False),  # ResNet: average pool -> fc
    "norm_linear": HeadType("avg", norm=True),  # ConvNeXt: average pool -> norm -> fc
    "fastai": HeadType("catavgmax", norm=False, mlp=_fastai_mlp, fc_bias=False),
    "fastai_convnext": HeadType("catavgmax", norm=False, mlp=_fastai_convnext_mlp),
}


def head_name(head: Optional[str], head_norm: bool) -> str:
    """The head a model gets: `head` when set, else the roadmap step's own (norm_linear with head_norm, else linear)."""
    if head is None:
        return "norm_linear" if head_norm else "linear"
    choice("model.head", head, tuple(HEADS))
    return head


def _check_head(num_classes: int, global_pool: str, own_pool: str) -> None:
    if global_pool != own_pool:
        choice("global_pool", global_pool, GLOBAL_POOLS)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ConfigError(f"num_classes must be an integer >= 0 (0: no classifier), got {num_classes!r}")
    if not global_pool and num_classes > 0:
        raise ConfigError(
            f"global_pool='' (no pooling) needs num_classes=0, got num_classes={num_classes}: the classifier is a "
            "linear layer over pooled features; use global_pool 'avg', 'max' or 'avgmax' with a classifier"
        )


def _pool(pool_type: str) -> tuple[nn.Module, nn.Module, int]:
    """(global pool, flatten, width multiplier) for a pool type ('' keeps the maps)."""
    pool = SelectAdaptivePool2d(pool_type=pool_type)
    return pool, (nn.Flatten(1) if pool_type else nn.Identity()), pool.feat_mult()


class Head(nn.Module):
    """Global pool -> optional norm -> flatten -> optional MLP -> dropout -> linear classifier (HEADS[name])."""

    def __init__(
        self,
        name: str,
        channels: int,
        num_classes: int,
        norm_layer: str = "batchnorm",
        drop_rate: float = 0.0,
        hidden: int = 512,
        global_pool: Optional[str] = None,
    ):
        super().__init__()
        choice("model.head", name, tuple(HEADS))
        self.type = spec = HEADS[name]
        pool = spec.pool if global_pool is None else global_pool
        _check_head(num_classes, pool, spec.pool)
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            raise ConfigError(f"model.head_hidden must be a positive integer, got {hidden!r}")
        if spec.mlp is not None and not pool:
            raise ConfigError(f"the {name} head's MLP needs pooled features: global_pool='' is only for linear heads")
        self.global_pool, self.flatten, mult = _pool(pool)
        self.in_features = self.num_features = channels
        self.pooled_features = channels * mult
        self.norm = make_norm(norm_layer, self.pooled_features) if spec.norm else nn.Identity()
        self.mlp = spec.mlp(self.pooled_features, hidden) if spec.mlp is not None else nn.Identity()
        self.hidden_size = hidden if spec.mlp is not None else self.pooled_features
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.hidden_size, num_classes, bias=spec.fc_bias) if num_classes > 0 else nn.Identity()

    def reset(
        self,
        num_classes: int,
        global_pool: Optional[str] = None,
        reset_other: bool = False,
        in_features: int = 0,
        like: Optional[torch.Tensor] = None,
    ) -> None:
        """New classifier for `num_classes` (0: none) on `like`'s device; new pool if given; no norm / MLP if
        reset_other (they are sized for the pooled width, so a new width needs it)."""
        pool = self.global_pool.pool_type if global_pool is None else global_pool
        _check_head(num_classes, pool, self.type.pool)
        in_features = in_features or self.in_features
        pooled = in_features * SelectAdaptivePool2d(pool_type=pool).feat_mult()
        kept = [n for n in ("norm", "mlp") if not isinstance(getattr(self, n), nn.Identity)]
        if kept and not reset_other and pooled != self.pooled_features:
            raise ConfigError(
                f"the head's {' and '.join(kept)} are sized for {self.pooled_features} features; got {pooled} "
                f"(pool {pool!r} over {in_features} channels): reset_other=True drops them"
            )
        if not isinstance(self.mlp, nn.Identity) and not reset_other and not pool:
            raise ConfigError("the head's MLP needs pooled features: global_pool='' needs reset_other=True")
        if global_pool is not None:
            pool_m, flatten, _ = _pool(global_pool)
            self.global_pool, self.flatten = pool_m.train(self.training), flatten.train(self.training)
        if reset_other:
            self.norm, self.mlp = nn.Identity(), nn.Identity()
        self.in_features = self.num_features = in_features
        self.pooled_features = pooled
        if isinstance(self.mlp, nn.Identity):
            self.hidden_size = pooled
        dd = dict(device=like.device, dtype=like.dtype) if like is not None else {}
        bias = self.type.fc_bias
        self.fc = nn.Linear(self.hidden_size, num_classes, bias=bias, **dd) if num_classes > 0 else nn.Identity()
        self.fc.apply(init_weights)
        self.fc.train(self.training)

    def forward(self, x, pre_logits: bool = False):
        x = self.drop(self.mlp(self.flatten(self.norm(self.global_pool(x)))))
        return x if pre_logits else self.fc(x)
