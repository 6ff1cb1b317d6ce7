"""The builder: endpoints reproduce their references' logits, checkpoints load or fail clearly, every step trains."""

from __future__ import annotations

import argparse
import re

import pytest
import timm
import torch
import torchvision

from models import STEPS, ConfigError, build_model, step_config

N_PARAMS = {  # published: torchvision/timm model cards and the paper (Table 1)
    ("baseline", "r50"): 25_557_032,
    ("separate_downsampling", "r50"): 28_589_128,
    ("baseline", "r200"): 64_673_832,
    ("separate_downsampling", "r200"): 88_591_464,
}


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("step,regime", list(N_PARAMS))
def test_endpoint_param_counts(step, regime):
    assert n_params(build_model(step, regime)) == N_PARAMS[(step, regime)]


# Relative logit tolerance: max |ours - reference| / std(reference), computed in float64. Both sides are the same
# function, so float64 rounding (~1e-15) is all that separates them; float32 would already differ by ~2e-6 (1x1 conv
# vs nn.Linear). Any wrong weight moves the logits by >= 1e-2 of their spread (test_corrupted_weight_is_caught).
TOL = 1e-9
CAUGHT = 1e-3


def randomise_constants(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random values for every parameter and buffer that starts constant, so that each one reaches the logits.

    Freshly initialised references hide weights: ConvNeXt's layer scale starts at 1e-6 (a block's branch then barely
    touches the logits), ResNet's last BatchNorm of each block at zero (timm's zero_init_last), norm affines at 1/0,
    running statistics at 0/1, biases at 0. Zeros become U(-0.2, 0.2), other constants (and variances) U(0.5, 1.5).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_floating_point() or (t.numel() > 1 and t.min() != t.max()):
                continue
            zero = t.abs().max() == 0 and not name.endswith("running_var")
            lo, hi = (-0.2, 0.2) if zero else (0.5, 1.5)
            t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    constant = [
        n
        for n, t in model.state_dict().items()
        if t.is_floating_point() and t.numel() > 1 and (t.min() == t.max()).item()
    ]
    assert not constant, f"still constant after randomising: {constant[:5]}"
    return model


def rel_logit_diff(ours: torch.nn.Module, ref: torch.nn.Module, x: torch.Tensor) -> float:
    """max |ours(x) - ref(x)| / std(ref(x)), both in eval mode and float64."""
    ours, ref = ours.eval().double(), ref.eval().double()
    with torch.no_grad():
        a, b = ours(x.double()), ref(x.double())
    return ((a - b).abs().max() / b.std()).item()


def _x(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(2))


def _reference(make):
    torch.manual_seed(0)
    return randomise_constants(make()).eval()


REFERENCES = [
    ("timm resnet50", lambda: timm.create_model("resnet50"), "baseline", "r50"),
    ("torchvision resnet50", lambda: torchvision.models.resnet50(), "baseline", "r50"),
    ("timm convnext_tiny", lambda: timm.create_model("convnext_tiny"), "separate_downsampling", "r50"),
    ("torchvision convnext_tiny", lambda: torchvision.models.convnext_tiny(), "separate_downsampling", "r50"),
    ("timm resnet200", lambda: timm.create_model("resnet200"), "baseline", "r200"),
    ("timm convnext_base", lambda: timm.create_model("convnext_base"), "separate_downsampling", "r200"),
    ("torchvision convnext_base", lambda: torchvision.models.convnext_base(), "separate_downsampling", "r200"),
]
REF = {r[0]: r for r in REFERENCES}


@pytest.mark.parametrize("name,make,step,regime", REFERENCES, ids=[r[0] for r in REFERENCES])
def test_endpoint_logits_match_reference(name, make, step, regime, tmp_path):
    ref = _reference(make)
    torch.save(ref.state_dict(), tmp_path / "ref.pt")
    ours = build_model(step, regime, pretrained=str(tmp_path / "ref.pt"))
    diff = rel_logit_diff(ours, ref, _x())
    assert diff < TOL, f"{name}: max abs logit difference / logit std = {diff:.3g}"


def to_official(state: dict) -> dict:
    """A timm convnext state dict renamed to the official repo's names (downsample_layers, stages.i.j, pwconv)."""
    official = {}
    for k, v in state.items():
        k = re.sub(r"^stem\.(\d)\.", r"downsample_layers.0.\1.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        k = k.replace("conv_dw", "dwconv").replace("mlp.fc1", "pwconv1").replace("mlp.fc2", "pwconv2")
        official[k.replace("head.norm", "norm").replace("head.fc", "head")] = v
    assert "downsample_layers.1.1.weight" in official and "stages.2.8.pwconv1.weight" in official
    return official


def test_official_convnext_checkpoint_loads(tmp_path):
    """The official repo saves {'model': ..., 'model_ema': ..., 'args': Namespace} with its own names."""
    ref = _reference(lambda: timm.create_model("convnext_tiny"))
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in to_official(ref.state_dict()).items()}
    ckpt = {"model": to_official(ref.state_dict()), "model_ema": ema, "epoch": 299, "args": argparse.Namespace(lr=4e-3)}
    torch.save(ckpt, tmp_path / "official.pth")
    ours = build_model("separate_downsampling", pretrained=str(tmp_path / "official.pth"))
    assert rel_logit_diff(ours, ref, _x()) < TOL


def _swap(sd: dict, a: str, b: str, transpose: bool = False) -> None:
    sd[a], sd[b] = (sd[b].T, sd[a].T) if transpose else (sd[b], sd[a])


def _roll(sd: dict, key: str, dim: int = 0) -> None:
    sd[key] = sd[key].roll(1, dim)


# (reference, what is wrong, corruption of its state dict in place): each keeps every shape, so only the logits can
# tell. Block weights first: the ones a freshly initialised reference would hide.
CORRUPTIONS = [
    (
        "timm convnext_tiny",
        "1x1 weights of a block swapped and transposed",
        lambda sd: _swap(sd, "stages.2.blocks.4.mlp.fc1.weight", "stages.2.blocks.4.mlp.fc2.weight", transpose=True),
    ),
    (
        "timm convnext_tiny",
        "depthwise weight channels permuted",
        lambda sd: _roll(sd, "stages.1.blocks.1.conv_dw.weight"),
    ),
    (
        "timm convnext_tiny",
        "depthwise kernel transposed",
        lambda sd: sd.update({"stages.0.blocks.2.conv_dw.weight": sd["stages.0.blocks.2.conv_dw.weight"].mT}),
    ),
    (
        "timm convnext_tiny",
        "layer scales of two blocks swapped",
        lambda sd: _swap(sd, "stages.0.blocks.0.gamma", "stages.0.blocks.1.gamma"),
    ),
    (
        "timm convnext_tiny",
        "block LayerNorm weight and bias swapped",
        lambda sd: _swap(sd, "stages.3.blocks.2.norm.weight", "stages.3.blocks.2.norm.bias"),
    ),
    (
        "torchvision convnext_tiny",
        "layer scale channels permuted",
        lambda sd: _roll(sd, "features.5.3.layer_scale"),
    ),
    (
        "timm resnet50",
        "bn1 and bn2 of a block swapped",
        lambda sd: [
            _swap(sd, f"layer2.1.bn1.{p}", f"layer2.1.bn2.{p}")
            for p in ("weight", "bias", "running_mean", "running_var")
        ],
    ),
    ("timm resnet50", "zero-initialised last BN weight permuted", lambda sd: _roll(sd, "layer3.1.bn3.weight")),
    (
        "torchvision resnet50",
        "projection BN running variance permuted",
        lambda sd: _roll(sd, "layer4.0.downsample.1.running_var"),
    ),
]


@pytest.mark.parametrize("ref_name,what,corrupt", CORRUPTIONS, ids=[f"{c[0]}: {c[1]}" for c in CORRUPTIONS])
def test_corrupted_weight_is_caught(ref_name, what, corrupt, tmp_path):
    """The logit comparison above must see a wrong block weight that keeps every shape (the loader cannot)."""
    _, make, step, regime = REF[ref_name]
    ref = _reference(make)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    corrupt(sd)
    torch.save(sd, tmp_path / "corrupt.pt")
    ours = build_model(step, regime, pretrained=str(tmp_path / "corrupt.pt"))
    diff = rel_logit_diff(ours, ref, _x())
    assert diff > CAUGHT, f"{ref_name}, {what}: logits moved by only {diff:.3g} of their spread"


def _fc_t(sd, key):
    sd[key] = sd[key].T


# (reference or None for our own format, corruption, the message's key and shapes)
BAD_SHAPES = [
    (
        "timm convnext_tiny",
        lambda sd: _fc_t(sd, "stages.1.blocks.0.mlp.fc1.weight"),
        r"stages\.1\.blocks\.0\.mlp\.fc1\.weight \(our stages\.1\.blocks\.0\.body\.conv_pw1\.conv\.weight\) "
        r"has shape \(192, 768\), the model needs \(768, 192, 1, 1\) \(same number of elements",
    ),
    (
        "timm convnext_tiny",
        lambda sd: _swap(sd, "stages.0.blocks.1.mlp.fc1.weight", "stages.0.blocks.1.mlp.fc2.weight"),
        r"stages\.0\.blocks\.1\.mlp\.fc[12]\.weight .* has shape \((96, 384|384, 96)\), the model needs",
    ),
    (
        "timm resnet50",
        lambda sd: sd.update({"layer1.0.conv3.weight": sd["layer1.0.conv3.weight"].transpose(0, 1)}),
        r"layer1\.0\.conv3\.weight \(our stages\.0\.blocks\.0\.body\.conv_pw2\.conv\.weight\) has shape "
        r"\(64, 256, 1, 1\), the model needs \(256, 64, 1, 1\)",
    ),
    (
        "torchvision convnext_tiny",
        lambda sd: sd.update({"features.1.0.layer_scale": sd["features.1.0.layer_scale"].reshape(1, 96, 1)}),
        r"features\.1\.0\.layer_scale \(our stages\.0\.blocks\.0\.layer_scale\.gamma\) has shape \(1, 96, 1\)",
    ),
]


@pytest.mark.parametrize(
    "ref_name,corrupt,match",
    BAD_SHAPES,
    ids=["fc1 transposed", "fc1/fc2 swapped", "resnet conv3 transposed", "layer scale [1,C,1]"],
)
def test_transposed_or_swapped_weight_fails_loudly(ref_name, corrupt, match, tmp_path):
    """Only real format conversions may reshape (nn.Linear -> 1x1 conv, [C,1,1] layer scale); a transposed or swapped
    tensor with the right element count is a ConfigError naming the key and both shapes."""
    _, make, step, regime = REF[ref_name]
    torch.manual_seed(0)
    sd = make().state_dict()
    corrupt(sd)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match=match):
        build_model(step, regime, pretrained=str(tmp_path / "bad.pt"))


TINY = dict(width_mult=0.125, depths=[1, 1, 2, 1])  # a full ConvNeXt-T layout at 1/8 width, fast to build


def test_own_format_is_never_reshaped(tmp_path):
    """Our own checkpoints need no conversion: even the Linear-shaped 1x1 weight that a ConvNeXt file may hold fails."""
    sd = build_model("separate_downsampling", num_classes=10, **TINY).state_dict()
    key = "stages.0.blocks.0.body.conv_pw1.conv.weight"
    sd[key] = sd[key][:, :, 0, 0]
    torch.save(sd, tmp_path / "ours.pt")
    with pytest.raises(ConfigError, match=rf"{re.escape(key)} has shape \(\d+, \d+\), the model needs"):
        build_model("separate_downsampling", num_classes=10, pretrained=str(tmp_path / "ours.pt"), **TINY)


def _tiny(seed: int):
    torch.manual_seed(seed)
    return randomise_constants(build_model("separate_downsampling", num_classes=10, **TINY), seed)


def _last_pt(model, decoy):
    """The dict this project's trainer writes as last.pt (ablations/train.py): the weights under 'model'."""
    from timm.utils import ModelEmaV3

    opt = torch.optim.AdamW(model.parameters())
    model(_x()).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
    ema = ModelEmaV3(decoy)
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "ema": ema.state_dict(),
        "epoch": 3,
        "step": 0,
        "partial": {"loss_sum": 0.0, "seen": 0, "epoch_s": 0.0},
        "history": [{"epoch": 1, "top1": 10.0}],
        "wall_s": 12.5,
        "model_config": {"width_mult": 0.125, "depths": [1, 1, 2, 1]},
    }


# name -> checkpoint object built from (model, decoy): the model's weights must load, never the decoy's (an EMA copy).
WRAPPERS = {
    "plain state dict": lambda m, d: m.state_dict(),
    "this project's last.pt": _last_pt,
    "timm train.py (state_dict, state_dict_ema, args)": lambda m, d: {
        "epoch": 5,
        "arch": "roadmap_r50_separate_downsampling",
        "state_dict": m.state_dict(),
        "state_dict_ema": d.state_dict(),
        "args": argparse.Namespace(model="convnext_tiny", lr=4e-3),
        "version": 2,
    },
    "model_ema only": lambda m, d: {"model_ema": m.state_dict()},
    "DDP module. prefix": lambda m, d: {"model": {f"module.{k}": v for k, v in m.state_dict().items()}},
    "torch.compile _orig_mod. prefix": lambda m, d: {f"_orig_mod.{k}": v for k, v in m.state_dict().items()},
    "both prefixes": lambda m, d: {f"module._orig_mod.{k}": v for k, v in m.state_dict().items()},
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_checkpoint_wrappers_and_prefixes_load(wrapper, tmp_path):
    model, decoy = _tiny(0), _tiny(1)
    torch.save(WRAPPERS[wrapper](model, decoy), tmp_path / "ck.pt")
    loaded = build_model("separate_downsampling", num_classes=10, pretrained=str(tmp_path / "ck.pt"), **TINY)
    x = _x(size=32)
    assert rel_logit_diff(loaded, model, x) < TOL
    assert rel_logit_diff(loaded, decoy, x) > CAUGHT  # the test can tell the two apart


def _write(data):
    def w(path, model):
        if isinstance(data, bytes):
            path.write_bytes(data)
        elif isinstance(data, str):  # "truncated": the first half of a real checkpoint
            torch.save(model.state_dict(), path)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            torch.save(data, path)

    return w


class _NotWeights:
    """An arbitrary pickled object: weights_only loading must refuse it (it could run code)."""


BAD_FILES = [
    ("text file", _write(b"not a checkpoint\n"), "cannot read pretrained checkpoint"),
    ("empty file", _write(b""), "cannot read pretrained checkpoint"),
    ("truncated", _write("truncated"), "cannot read pretrained checkpoint"),
    ("arbitrary object", _write({"model": _NotWeights()}), "cannot read pretrained checkpoint"),
    ("bare tensor", _write(torch.zeros(3)), "holds a Tensor, not a state dict"),
    (
        "non-tensor entries",
        _write({"epoch": 3, "weights": {}}),
        r"2 entries are not tensors \(e\.g\. \['epoch', 'weights'\]\)",
    ),
]


@pytest.mark.parametrize("what,write,match", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_corrupt_checkpoint_is_a_config_error(what, write, match, tmp_path):
    path = tmp_path / "bad.pt"
    write(path, build_model("separate_downsampling", num_classes=10, **TINY))
    with pytest.raises(ConfigError, match=match) as e:
        build_model("separate_downsampling", num_classes=10, pretrained=str(path), **TINY)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_pretrained_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_model("baseline", pretrained=str(tmp_path / "missing.pt"))
    torch.save(timm.create_model("resnet50").state_dict(), tmp_path / "r50.pt")
    with pytest.raises(ConfigError, match="does not fit this model.*missing keys"):
        build_model("separate_downsampling", pretrained=str(tmp_path / "r50.pt"))
    with pytest.raises(ConfigError, match=r"fc\.weight \(our head\.fc\.weight\) has shape .*class count"):
        build_model("baseline", num_classes=10, pretrained=str(tmp_path / "r50.pt"))
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "odd.pt")
    with pytest.raises(ConfigError, match="unrecognised checkpoint format"):
        build_model("baseline", pretrained=str(tmp_path / "odd.pt"))


ALL_BUILDS = [(s, r, {}) for r in ("r50", "r200") for s in STEPS] + [
    ("large_kernel", "r50", {"kernel_size": k}) for k in (5, 9, 11)
]


@pytest.mark.parametrize("step,regime,extra", ALL_BUILDS, ids=[f"{r}-{s}{e or ''}" for s, r, e in ALL_BUILDS])
def test_every_step_trains_on_cpu(step, regime, extra):
    torch.manual_seed(0)
    # small but faithful: full depth, 1/8 width, 32 px with the small-image stem (last stage 2x2)
    model = build_model(step, regime, num_classes=5, width_mult=0.125, stem_stride=2, drop_path_rate=0.1, **extra)
    x = torch.randn(4, 3, 32, 32)
    out = model(x)
    assert out.shape == (4, 5) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"


def test_steps_change_what_they_say():
    cfgs = {s: step_config(s) for s in STEPS}
    assert cfgs["stage_ratio"].depths == [3, 3, 9, 3]
    assert cfgs["increase_width"].stage_dims() == [384, 768, 1536, 3072]
    assert cfgs["inverted_bottleneck"].stage_dims() == [96, 192, 384, 768]
    assert cfgs["inverted_bottleneck"].block_type == "inverted" and cfgs["baseline"].block_type == "bottleneck"
    assert cfgs["large_kernel"].kernel_size == 7 and cfgs["move_up_dwconv"].kernel_size == 3
    r200 = {s: step_config(s, "r200") for s in STEPS}
    assert r200["stage_ratio"].depths == [3, 3, 27, 3] and r200["stage_ratio"].width == 84
    assert r200["increase_width"].width == 128 and r200["separate_downsampling"].stage_dims() == [128, 256, 512, 1024]


def test_block_structure_of_late_steps():
    m = build_model("fewer_norms")
    blk = m.stages[1].blocks[0]
    assert list(blk.body._modules) == ["conv_spatial", "conv_pw1", "conv_pw2"]
    assert hasattr(blk.body.conv_spatial, "norm") and not hasattr(blk.body.conv_pw1, "norm")
    assert hasattr(blk.body.conv_pw1, "act") and not hasattr(blk.body.conv_spatial, "act")
    assert blk.body.conv_spatial.conv.groups == blk.body.conv_spatial.conv.in_channels  # depthwise
    assert blk.body.conv_spatial.conv.stride == (2, 2)  # in-block downsampling until the last step
    last = build_model("separate_downsampling").stages[1]
    assert last.blocks[0].body.conv_spatial.conv.stride == (1, 1) and last.downsample.conv.stride == (2, 2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(step="large_kernal"), "unknown step 'large_kernal'; valid choices: baseline, stage_ratio"),
        (dict(step="baseline", regime="r101"), "unknown regime 'r101'; valid choices: r50, r200"),
        (dict(step="baseline", kernel_size=0), "kernel_size must be a positive integer"),
        (dict(step="baseline", kernel_size=4), "must be odd"),
        (dict(step="baseline", norm_layer="groupnorm"), "valid choices: batchnorm, layernorm"),
        (dict(step="baseline", kernal_size=5), "unknown model field 'kernal_size'"),
    ],
)
def test_bad_values_name_the_valid_ones(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_model(**kwargs)


def test_timm_registry_builds_every_step():
    names = timm.list_models("roadmap_*")
    assert len(names) == 2 * len(STEPS)
    m = timm.create_model("roadmap_r50_large_kernel", num_classes=10, kernel_size=5)
    assert m.cfg.kernel_size == 5 and m.head.fc.out_features == 10
    assert n_params(timm.create_model("roadmap_r50_separate_downsampling")) == 28_589_128


@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_conv_equals_the_conv(channels_last):
    # PointwiseConv2d runs 1x1 convs as nn.Linear over channels (speed); it must stay the same function, with the
    # same gradients, as the Conv2d whose parameters it keeps, whatever the input's memory format.
    from models.layers import PointwiseConv2d

    torch.manual_seed(0)
    pw = PointwiseConv2d(6, 10)
    conv = torch.nn.Conv2d(6, 10, 1)
    conv.load_state_dict(pw.state_dict())
    x = torch.randn(2, 6, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = pw(xa), conv(xb)
    assert ya.shape == yb.shape == (2, 10, 5, 7)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pw.weight.grad, conv.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pw.bias.grad, conv.bias.grad, rtol=1e-5, atol=1e-5)


def test_every_dense_1x1_conv_runs_as_linear():
    # The speed path covers exactly the dense 1x1 stride-1 convs: strided 1x1 shortcuts and spatial convs stay convs.
    from models.layers import PointwiseConv2d

    for step in ("baseline", "separate_downsampling"):
        model = build_model(step, width_mult=0.125)
        for name, m in model.named_modules():
            if type(m) is torch.nn.Conv2d:
                assert m.kernel_size != (1, 1) or m.stride != (1, 1) or m.groups != 1, name
        n = sum(isinstance(m, PointwiseConv2d) for m in model.modules())
        # ConvNeXt-T: 2 per block (18 blocks); ResNet-50: 2 per block (16) + the stage-1 projection shortcut
        assert n == {"baseline": 33, "separate_downsampling": 36}[step], n
