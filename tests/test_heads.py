"""Heads as a toggle (model.head): every head keeps timm's model contract, has the parts it says, is counted like
the body, and the default (head null) is each step's own head, unchanged."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from ablations.complexity import complexity, meta_complexity
from models import STEPS, ConfigError, build_model
from models.heads import HEADS

SMALL = dict(width_mult=0.125, stem_stride=2)  # 32 px inputs, a few thousand parameters per stage
BODIES = ("baseline", "separate_downsampling")  # BatchNorm ResNet and LayerNorm ConvNeXt
CASES = [(body, head) for body in BODIES for head in HEADS]


def small(step: str, head: str | None, num_classes: int = 7, **kw) -> nn.Module:
    return build_model(step, num_classes=num_classes, head=head, **SMALL, **kw)


@pytest.mark.parametrize("step,head", CASES, ids=[f"{s}-{h}" for s, h in CASES])
def test_every_head_keeps_the_timm_contract(step, head):
    torch.manual_seed(0)
    m = small(step, head)
    x = torch.randn(4, 3, 32, 32)
    hidden = 512 if head.startswith("fastai") else m.num_features
    assert m.num_features == m.feature_info[-1]["num_chs"]
    assert m.head_hidden_size == hidden and m.head.in_features == m.num_features
    fc = m.get_classifier()
    assert isinstance(fc, nn.Linear) and (fc.in_features, fc.out_features) == (hidden, 7)
    m(x).logsumexp(1).sum().backward()  # train mode (BatchNorm1d needs a batch): every parameter is reached
    assert all(p.grad is not None for p in m.parameters())  # (zero-init last norms: some are zero at init)
    m.eval()
    feats = m.forward_features(x)
    pre = m.forward_head(feats, pre_logits=True)
    assert pre.shape == (4, hidden)
    assert torch.allclose(m(x), fc(pre), atol=1e-6) and torch.allclose(m.forward_head(feats), m(x))
    m.reset_classifier(3)
    assert m.num_classes == 3 and m(x).shape == (4, 3) and m.get_classifier().in_features == hidden
    assert (m.get_classifier().bias is None) == (head == "fastai")  # fastai's classifier has no bias (BN before it)
    m.reset_classifier(0)  # an embedder: forward gives the pre-logits
    assert isinstance(m.get_classifier(), nn.Identity) and m(x).shape == (4, hidden)
    assert torch.allclose(m(x), pre, atol=1e-6)  # the head's layers before the classifier are kept
    m.reset_classifier(0, "", reset_other=True)  # feature maps (what timm's feature getter does)
    assert m(x).shape == feats.shape


@pytest.mark.parametrize("head", list(HEADS))
def test_every_head_through_timm_features_and_layer_decay(head):
    from timm.optim import create_optimizer_v2

    m = timm.create_model("roadmap_r50_separate_downsampling", num_classes=5, head=head, **SMALL)
    assert m.get_classifier().out_features == 5
    feats = timm.create_model("roadmap_r50_separate_downsampling", features_only=True, head=head, **SMALL)
    assert [f.shape[1] for f in feats(torch.randn(2, 3, 32, 32))] == feats.feature_info.channels()
    opt = create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.7)
    top = max(g["lr_scale"] for g in opt.param_groups)
    head_ids = {id(p) for p in m.head.parameters()}
    for g in opt.param_groups:  # the whole head, MLP included, is the last group: the full lr
        if any(id(p) in head_ids for p in g["params"]):
            assert g["lr_scale"] == top == 1.0 and all(id(p) in head_ids for p in g["params"])


def test_the_heads_have_the_parts_they_name():
    c = 96  # separate_downsampling's last stage at width 1/8
    fa = small("separate_downsampling", "fastai").head
    assert fa.global_pool.pool_type == "catavgmax"  # fastai's AdaptiveConcatPool2d: avg and max side by side
    assert [type(x) for x in fa.mlp] == [nn.BatchNorm1d, nn.Dropout, nn.Linear, nn.ReLU, nn.BatchNorm1d, nn.Dropout]
    assert [fa.mlp.drop1.p, fa.mlp.drop2.p] == [0.25, 0.5]
    assert fa.mlp.bn1.num_features == 2 * c and (fa.mlp.fc1.in_features, fa.mlp.fc1.out_features) == (2 * c, 512)
    assert fa.mlp.fc1.bias is None and fa.fc.bias is None and isinstance(fa.norm, nn.Identity)
    fc = small("separate_downsampling", "fastai_convnext", head_hidden=64).head.eval()
    assert [type(x) for x in fc.mlp] == [nn.LayerNorm, nn.Linear, nn.GELU] and fc.hidden_size == 64
    assert not any(isinstance(x, (nn.BatchNorm1d, nn.Dropout)) and getattr(x, "p", 1) for x in fc.modules())
    x = torch.randn(3, c, 2, 2)
    pooled = torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)  # by hand: concat pool, LN, linear, GELU, linear
    h = nn.functional.layer_norm(pooled, (2 * c,), fc.mlp.norm.weight, fc.mlp.norm.bias, 1e-6)
    h = h @ fc.mlp.fc1.weight.T + fc.mlp.fc1.bias
    assert torch.allclose(fc(x), nn.functional.gelu(h) @ fc.fc.weight.T + fc.fc.bias, atol=1e-5)
    lin = small("separate_downsampling", "linear").head
    assert isinstance(lin.norm, nn.Identity) and isinstance(lin.mlp, nn.Identity)
    nl = small("baseline", "norm_linear").head  # the body's norm: BatchNorm on a ResNet
    assert isinstance(nl.norm, nn.BatchNorm2d) and nl.norm.num_features == 256


@pytest.mark.parametrize("step", STEPS)
def test_the_default_head_is_each_steps_own(step):
    own = "norm_linear" if step == "separate_downsampling" else "linear"
    torch.manual_seed(0)
    a = small(step, None).state_dict()
    torch.manual_seed(0)
    b = small(step, own).state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)  # same keys, same initial weights
    assert [k for k in a if k.startswith("head.")] == (
        ["head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"] if own == "norm_linear"
        else ["head.fc.weight", "head.fc.bias"]
    )  # fmt: skip


def test_head_complexity_is_counted_like_the_body():
    base = complexity(small("separate_downsampling", "linear", num_classes=10), 16)
    c = 96
    extra_params = {  # by hand, against the linear head (c -> 10 with bias)
        "norm_linear": 2 * c,
        "fastai": 2 * (2 * c) + 2 * c * 512 + 2 * 512 + 512 * 10 - (c * 10 + 10),
        "fastai_convnext": 2 * (2 * c) + (2 * c * 512 + 512) + (512 * 10 + 10) - (c * 10 + 10),
    }
    for head, params in extra_params.items():
        m = small("separate_downsampling", head, num_classes=10)
        got = complexity(m, 16)
        macs = 0 if head == "norm_linear" else 2 * c * 512 + 512 * 10 - c * 10  # conv + linear multiply-adds only
        assert got["params"] - base["params"] == params, head
        assert got["gflops"] * 1e9 - base["gflops"] * 1e9 == pytest.approx(macs, abs=0.5), head
        with torch.device("meta"):  # the meta-device count of the huge factorial rows agrees
            meta = meta_complexity(small("separate_downsampling", head, num_classes=10), 16)
        assert meta["params"] == got["params"] and meta["gflops"] == pytest.approx(got["gflops"], rel=1e-9), head


def test_a_bad_head_names_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown model.head 'mlp'; valid choices: linear, norm_linear, fastai, "):
        build_model("gelu", head="mlp")
    with pytest.raises(ConfigError, match="model.head_hidden must be a positive integer, got 0"):
        build_model("gelu", head="fastai", head_hidden=0)
    m = small("gelu", "fastai")
    with pytest.raises(ConfigError, match="sized for 192 features; got 96 .*reset_other=True drops them"):
        m.reset_classifier(3, "avg")  # the MLP takes the concat pool's 2C features
