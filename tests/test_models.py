"""The builder: endpoints are the standard models, every step builds and trains, bad names fail clearly."""

from __future__ import annotations

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


def _randomise_bn(model):
    # eval-mode comparisons must exercise BatchNorm statistics, not the identity they start as
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


REFERENCES = [
    ("timm resnet50", lambda: timm.create_model("resnet50"), "baseline", "r50"),
    ("torchvision resnet50", lambda: torchvision.models.resnet50(), "baseline", "r50"),
    ("timm convnext_tiny", lambda: timm.create_model("convnext_tiny"), "separate_downsampling", "r50"),
    ("torchvision convnext_tiny", lambda: torchvision.models.convnext_tiny(), "separate_downsampling", "r50"),
    ("timm resnet200", lambda: timm.create_model("resnet200"), "baseline", "r200"),
    ("timm convnext_base", lambda: timm.create_model("convnext_base"), "separate_downsampling", "r200"),
    ("torchvision convnext_base", lambda: torchvision.models.convnext_base(), "separate_downsampling", "r200"),
]


@pytest.mark.parametrize("name,make,step,regime", REFERENCES, ids=[r[0] for r in REFERENCES])
def test_endpoint_logits_match_reference(name, make, step, regime, tmp_path):
    torch.manual_seed(0)
    ref = _randomise_bn(make()).eval()
    path = tmp_path / "ref.pt"
    torch.save(ref.state_dict(), path)
    ours = build_model(step, regime, pretrained=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
    assert diff < 1e-4, f"{name}: max abs logit difference {diff}"


def test_official_convnext_checkpoint_loads(tmp_path):
    """The official repo saves {'model': state_dict} with downsample_layers / stages.i.j / pwconv names."""
    import re

    ref = timm.create_model("convnext_tiny").eval()
    official = {}
    for k, v in ref.state_dict().items():
        k = re.sub(r"^stem\.(\d)\.", r"downsample_layers.0.\1.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        k = k.replace("conv_dw", "dwconv").replace("mlp.fc1", "pwconv1").replace("mlp.fc2", "pwconv2")
        official[k.replace("head.norm", "norm").replace("head.fc", "head")] = v
    assert "downsample_layers.1.1.weight" in official and "head.weight" in official
    torch.save({"model": official, "epoch": 299}, tmp_path / "official.pth")
    ours = build_model("separate_downsampling", pretrained=str(tmp_path / "official.pth")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() < 1e-4


def test_pretrained_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_model("baseline", pretrained=str(tmp_path / "missing.pt"))
    torch.save(timm.create_model("resnet50").state_dict(), tmp_path / "r50.pt")
    with pytest.raises(ConfigError, match="does not fit this model.*missing keys"):
        build_model("separate_downsampling", pretrained=str(tmp_path / "r50.pt"))
    with pytest.raises(ConfigError, match="shape"):
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
