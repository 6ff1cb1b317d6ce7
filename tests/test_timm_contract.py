"""Every roadmap step is a first-class timm model: the checks of timm's own tests/test_models.py, and more.

Run on the first, middle and last step of both regimes at 1/8 width (the cfg contents at full width): forward and
backward at the cfg's input size, pretrained cfg keys naming real modules, forward_features / forward_head /
reset_classifier, features_only and forward_intermediates against the stage outputs computed by hand, fx tracing,
torchscript, grad checkpointing, group_matcher with layer decay, and local weights through pretrained=True.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models import FeatureInfo, get_notrace_functions, get_notrace_modules, group_parameters
from timm.optim import create_optimizer_v2
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from models import REGIMES, STEPS, ConfigError, build_model, step_config

CASES = [(r, s) for r in ("r50", "r200") for s in ("baseline", "move_up_dwconv", "separate_downsampling")]
IDS = [f"{r}-{s}" for r, s in CASES]
# torch.fx traces each of r200's 66 blocks (10 s a model here); its blocks are r50's modules, so fx runs on r50
R50 = dict(argvalues=CASES[:3], ids=IDS[:3])
SMALL = dict(width_mult=0.125)  # full depth, 1/8 width: every structural feature, a fraction of the time


def create(regime: str, step: str, **kwargs) -> torch.nn.Module:
    """timm.create_model of a roadmap step at 1/8 width unless kwargs say otherwise; seeded, so builds are equal."""
    torch.manual_seed(0)
    return timm.create_model(f"roadmap_{regime}_{step}", **{**SMALL, **kwargs})


def image(n: int = 1, size: int = 64, chans: int = 3) -> torch.Tensor:
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(3))


def by_hand(model, x) -> list[torch.Tensor]:
    """The stage outputs, computed by running the stem and then each stage."""
    outs, h = [], model.stem(x)
    for stage in model.stages:
        h = stage(h)
        outs.append(h)
    return outs


def assert_same(a, b, tol: float = 1e-6):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max().item()


# --- registry and pretrained cfgs -------------------------------------------------------------------------------


def test_every_step_has_a_pretrained_cfg_without_weights():
    names = [f"roadmap_{r}_{s}" for r in REGIMES for s in STEPS]
    # timm's suite picks models by these filters: backward / torchscript / fx-backward need a cfg named as the model;
    # load_pretrained / features_pretrained must not pick ours (there is nothing to download)
    assert sorted(timm.list_models("roadmap_*", name_matches_cfg=True)) == sorted(names)
    assert timm.list_models("roadmap_*", pretrained=True) == []
    for name in names:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg["architecture"] == name and not cfg.get("file") and not cfg.get("hf_hub_id")
        assert cfg["input_size"] == (3, 224, 224) and cfg["pool_size"] == (7, 7) and cfg["num_classes"] == 1000
        assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
        assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
        assert (cfg["first_conv"], cfg["classifier"]) == ("stem.conv", "head.fc")


@pytest.mark.parametrize("step", ["baseline", "separate_downsampling"])
def test_cfg_names_real_modules_at_full_width(step):
    m = timm.create_model(f"roadmap_r50_{step}")
    cfg = m.default_cfg
    assert m.pretrained_cfg is cfg and cfg["architecture"] == f"roadmap_r50_{step}"
    first, fc = m.get_submodule(cfg["first_conv"]), m.get_submodule(cfg["classifier"])
    assert isinstance(first, torch.nn.Conv2d) and first.in_channels == cfg["input_size"][0]
    assert isinstance(fc, torch.nn.Linear) and fc.out_features == cfg["num_classes"] and fc is m.get_classifier()
    assert m.num_features == m.head_hidden_size == fc.in_features == (2048 if step == "baseline" else 768)
    # timm's data pipeline reads the eval transform from the cfg
    data = timm.data.resolve_data_config(model=m)
    assert data["input_size"] == (3, 224, 224) and data["interpolation"] == "bicubic" and data["crop_pct"] == 0.875


def test_kwargs_reach_the_builder_and_mistakes_name_the_choices():
    m = timm.create_model("roadmap_r50_large_kernel", kernel_size=5, num_classes=10, drop_path_rate=0.2, **SMALL)
    assert m.cfg.kernel_size == 5 and m.cfg.drop_path_rate == 0.2 and m.num_classes == 10
    ref = build_model("large_kernel", num_classes=10, kernel_size=5, **SMALL)
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    with pytest.raises(ConfigError, match="unknown model field 'kernal_size'"):
        timm.create_model("roadmap_r50_large_kernel", kernal_size=5)
    with pytest.raises(ConfigError, match="unknown global_pool 'catavgmax'; valid choices: avg, max, avgmax"):
        create("r50", "baseline", global_pool="catavgmax")
    with pytest.raises(ConfigError, match="global_pool='' .* needs num_classes=0, got num_classes=5"):
        create("r50", "baseline", global_pool="", num_classes=5)


# --- forward, backward, head --------------------------------------------------------------------------------------


@pytest.mark.parametrize("regime,step", CASES, ids=IDS)
def test_forward_backward_at_cfg_input_size(regime, step):
    m = create(regime, step, num_classes=42).train()
    x = image(2, m.default_cfg["input_size"][-1])
    out = m(x)
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    out.mean().backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert not no_grad, f"no gradient for {no_grad[:5]}"


@pytest.mark.parametrize("regime,step", CASES, ids=IDS)
def test_forward_features_head_and_reset_classifier(regime, step):
    m = create(regime, step).eval()
    dims = step_config(step, regime, **SMALL).stage_dims()
    x = image(2, 224)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (2, dims[-1], *m.default_cfg["pool_size"]) and m.num_features == dims[-1]
        pre = m.forward_head(feats, pre_logits=True)
        # by hand: average pool, the head's norm (ConvNeXt's LayerNorm after pooling), then the classifier
        pooled = m.head.norm(feats.mean((2, 3), keepdim=True)).flatten(1)
        assert pre.shape == (2, m.head_hidden_size) and m.head_hidden_size == dims[-1]
        assert_same(pre, pooled)
        logits = m(x)
        assert_same(logits, pooled @ m.head.fc.weight.T + m.head.fc.bias, 1e-5)
        assert_same(m.forward_head(feats), logits)

        m.reset_classifier(0)
        assert m.num_classes == 0 and isinstance(m.get_classifier(), torch.nn.Identity)
        assert_same(m(x), pooled)
        m.reset_classifier(0, "")  # no pooling: the (normed) feature map
        assert_same(m(x), m.head.norm(feats))
        m.reset_classifier(7, "max")
        fc = m.get_classifier()
        assert m.num_classes == 7 and fc.out_features == 7 and fc.in_features == m.head_hidden_size
        assert_same(m(x), m.head.norm(feats.amax((2, 3), keepdim=True)).flatten(1) @ fc.weight.T + fc.bias, 1e-5)

        unpooled = create(regime, step, num_classes=0, global_pool="").eval()
        assert unpooled(x).shape == (2, dims[-1], 7, 7) and unpooled.num_classes == 0


# --- features: features_only, forward_intermediates, fx ---------------------------------------------------------


@pytest.mark.parametrize("regime,step", CASES, ids=IDS)
def test_features_only_is_the_stage_pyramid(regime, step):
    dims = step_config(step, regime, **SMALL).stage_dims()
    ref = create(regime, step).eval()
    x = image(1, 96)
    with torch.no_grad():
        stages = by_hand(ref, x)
        # hooks on the flattened modules, forward_intermediates, and (r50) an fx graph
        for cls in ("list", "getter", "fx") if regime == "r50" else ("list", "getter"):
            fm = create(regime, step, features_only=True, feature_cls=cls).eval()
            assert fm.feature_info.channels() == dims and fm.feature_info.reduction() == [4, 8, 16, 32]
            outs = fm(x)
            outs = list(outs.values()) if isinstance(outs, dict) else outs
            assert len(outs) == 4
            for o, s, r in zip(outs, stages, fm.feature_info.reduction()):
                assert o.shape[-2:] == (96 // r, 96 // r)
                assert_same(o, s)
        picked = create(regime, step, features_only=True, out_indices=(1, 3)).eval()
        assert picked.feature_info.channels() == [dims[1], dims[3]]
        outs = picked(x)
        assert_same(outs[0], stages[1])
        assert_same(outs[1], stages[3])


@pytest.mark.parametrize("stem_stride,reductions", [(1, [1, 2, 4, 8]), (2, [2, 4, 8, 16])])
@pytest.mark.parametrize("step", ["baseline", "separate_downsampling"])  # resnet stem and patchify stem
def test_feature_reductions_follow_the_stem_stride(step, stem_stride, reductions):
    fm = create("r50", step, features_only=True, stem_stride=stem_stride).eval()
    assert fm.feature_info.reduction() == reductions
    with torch.no_grad():
        outs = fm(image(1, 32))
    assert [o.shape[-1] for o in outs] == [32 // r for r in reductions]


@pytest.mark.parametrize("regime,step", CASES, ids=IDS)
def test_forward_intermediates_are_the_stage_outputs(regime, step):
    m = create(regime, step).eval()
    info = FeatureInfo(m.feature_info, len(m.feature_info))
    assert info.module_name() == [f"stages.{i}" for i in range(4)]
    x = image(1, 64)
    with torch.no_grad():
        stages = by_hand(m, x)
        final, inter = m.forward_intermediates(x)
        assert len(inter) == 4 and [t.shape[1] for t in inter] == info.channels()
        for a, b in zip(inter, stages):
            assert_same(a, b)
        assert_same(final, m.forward_features(x))
        _, last2 = m.forward_intermediates(x, indices=2)
        assert len(last2) == 2
        assert_same(last2[0], stages[2])
        assert_same(last2[1], stages[3])
        early = m.forward_intermediates(x, indices=[0, -3], stop_early=True, intermediates_only=True)
        assert len(early) == 2
        assert_same(early[0], stages[0])
        assert_same(early[1], stages[1])
        _, normed = m.forward_intermediates(x, indices=[3], norm=True)  # no norm before pooling: unchanged
        assert_same(normed[0], stages[3])
        with pytest.raises(ConfigError, match=r"indices \[4\] do not select stages .* 4 stages"):
            m.forward_intermediates(x, indices=[4])
        with pytest.raises(ConfigError, match="unknown output_fmt 'NHWC'; valid choices: NCHW"):
            m.forward_intermediates(x, output_fmt="NHWC")

        assert m.prune_intermediate_layers([0, 1]) == [0, 1]
        assert len(m.stages) == 2 and m.num_features == m.head_hidden_size == info.channels()[1]
        assert_same(m(x), stages[1])  # the head is gone: forward returns the last kept stage


def fx_model(model, train: bool = False):
    """The whole model traced with torch.fx the way timm's test_model_forward_fx / backward_fx do."""
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model,
        train_return_nodes=[train_nodes[-1]],
        eval_return_nodes=[eval_nodes[-1]],
        tracer_kwargs=tracer_kwargs,
    ).train(train)


@pytest.mark.parametrize("regime,step", **R50)
def test_fx_trace_gives_the_same_output_and_gradients(regime, step):
    m = create(regime, step, num_classes=42).eval()
    traced = fx_model(m)
    x = image(2, 64)
    with torch.inference_mode():
        ref = m(x)
        (out,) = traced(x).values()
    assert torch.equal(out, ref)  # timm requires bit-equality
    (out,) = traced.train()(x).values()  # the training-mode graph (batch statistics)
    assert out.shape == (2, 42)
    out.mean().backward()
    assert all(p.grad is not None for p in traced.parameters())


@pytest.mark.parametrize("regime,step", **R50)  # scripting r200's 66 blocks adds only time
def test_torchscript(regime, step):
    with timm.layers.set_layer_config(scriptable=True):
        m = create(regime, step).eval()
    scripted = torch.jit.script(m)
    x = image(1, 64)
    with torch.no_grad():
        assert_same(scripted(x), m(x), 1e-5)


# --- training: grad checkpointing, layer decay ------------------------------------------------------------------


@pytest.mark.parametrize("regime,step", CASES, ids=IDS)
def test_grad_checkpointing_same_output_and_gradients(regime, step):
    plain = create(regime, step, num_classes=5).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    calls = []
    # a pre-hook: recomputation stops early (torch.utils.checkpoint), so a block's post-hooks may not fire twice
    ckpt.stages[2].blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    x = image(2, 64)
    outs = []
    for m in (plain, ckpt):
        out = m(x)
        out.logsumexp(1).sum().backward()
        outs.append(out)
    assert len(calls) == 2  # the block ran again in backward: checkpointing is really on
    assert_same(outs[1], outs[0], 1e-5)
    grads = dict(plain.named_parameters())
    for n, p in ckpt.named_parameters():
        assert torch.allclose(p.grad, grads[n].grad, rtol=1e-4, atol=1e-6), n
    # eval (running statistics: the recomputation updated BatchNorm's a second time, as in timm's models)
    final, _ = ckpt.eval().forward_intermediates(x)
    ckpt.set_grad_checkpointing(False)
    assert not any(s.grad_checkpointing for s in ckpt.stages)
    assert_same(final, ckpt.forward_features(x), 1e-5)


@pytest.mark.parametrize("regime,step", CASES, ids=IDS)
def test_group_matcher_orders_every_parameter_for_layer_decay(regime, step):
    m = create(regime, step)
    cfg = step_config(step, regime, **SMALL)
    names = [n for n, _ in m.named_parameters()]
    fine = group_parameters(m, m.group_matcher())
    assert sorted(n for g in fine.values() for n in g) == sorted(names)  # every parameter exactly once
    assert len(fine) == 1 + sum(cfg.depths) + 1  # stem, one group per block, head
    assert all(n.startswith("stem.") for n in fine[0]) and all(n.startswith("head.") for n in fine[len(fine) - 1])
    expected, k = {}, 1
    for i, depth in enumerate(cfg.depths):
        for j in range(depth):
            expected[k] = (f"stages.{i}.blocks.{j}.",) + ((f"stages.{i}.downsample.",) if j == 0 else ())
            k += 1
    for gid, prefixes in expected.items():
        assert fine[gid] and all(n.startswith(prefixes) for n in fine[gid]), (gid, fine[gid][:3])
    coarse = group_parameters(m, m.group_matcher(coarse=True))
    assert len(coarse) == 6 and all(n.startswith("stages.2.") for n in coarse[3])

    # ConvNeXt's fine-tuning recipe: AdamW, layer decay 0.7, no weight decay on 1-D tensors (norms, biases, gamma)
    opt = create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.7)
    params = dict(m.named_parameters())
    layer_of = {n: gid for gid, group in fine.items() for n in group}
    top = len(fine) - 1
    seen = 0
    for group in opt.param_groups:
        for p in group["params"]:
            (name,) = [n for n, q in params.items() if q is p]
            assert group["lr_scale"] == pytest.approx(0.7 ** (top - layer_of[name])), name
            assert group["weight_decay"] == (0.0 if p.ndim <= 1 else 0.05), name
            seen += 1
    assert seen == len(params) and m.no_weight_decay() == set()


# --- pretrained weights ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref_name,step", [("resnet50", "baseline"), ("convnext_tiny", "separate_downsampling")], ids=["r50", "cnxt"]
)
def test_pretrained_local_file_loads_like_build_model(ref_name, step, tmp_path):
    torch.manual_seed(1)
    path = str(tmp_path / f"{ref_name}.pth")
    torch.save(timm.create_model(ref_name).state_dict(), path)
    expected = build_model(step, pretrained=path).state_dict()
    name = f"roadmap_r50_{step}"
    m = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    got = m.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert m.pretrained_cfg["file"] == path

    # timm's adaptation: a new class count keeps every weight but the classifier, which starts fresh
    m10 = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), num_classes=10)
    got = m10.state_dict()
    assert got["head.fc.weight"].shape == (10, expected["head.fc.weight"].shape[1])
    assert all(torch.equal(got[k], expected[k]) for k in got if not k.startswith("head.fc."))
    # one input channel: timm sums the first conv over its RGB channels
    grey = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), in_chans=1)
    assert torch.allclose(grey.stem.conv.weight, expected["stem.conv.weight"].sum(1, keepdim=True))
    # a pretrained backbone: the feature pyramid of the loaded weights
    fm = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), features_only=True)
    full = build_model(step, pretrained=path).eval()
    x = image(1, 64)
    with torch.no_grad():
        for a, b in zip(fm.eval()(x), by_hand(full, x)):
            assert_same(a, b, 1e-5)


def test_pretrained_without_a_file_is_one_clear_paragraph(tmp_path):
    with pytest.raises(ConfigError, match="has no published weights") as e:
        timm.create_model("roadmap_r50_gelu", pretrained=True)
    msg = str(e.value)
    assert "\n" not in msg and "pretrained_cfg_overlay=dict(file=" in msg and "roadmap_r50_gelu" in msg
    with pytest.raises(ConfigError, match="does not exist"):
        timm.create_model("roadmap_r50_gelu", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "x")))
    path = str(tmp_path / "r50.pth")
    torch.save(timm.create_model("resnet50").state_dict(), path)
    with pytest.raises(ConfigError, match=r"does not fit roadmap_r50_separate_downsampling: \d+ missing keys"):
        timm.create_model("roadmap_r50_separate_downsampling", pretrained=True, pretrained_cfg_overlay=dict(file=path))


def test_own_checkpoint_of_a_middle_step_loads(tmp_path):
    src = create("r200", "move_up_dwconv", num_classes=10)
    path = str(tmp_path / "own.pth")
    torch.save({"model": src.state_dict()}, path)  # this project's last.pt keeps the weights under "model"
    m = timm.create_model(
        "roadmap_r200_move_up_dwconv",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=path, num_classes=10),
        num_classes=10,
        **SMALL,
    )
    want = src.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in m.state_dict().items())
