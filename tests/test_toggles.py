"""Toggles: leave-one-out (without=) and custom roadmaps, in the builder, in Hydra, on the command line, in sweeps."""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ablations.config import _suffix, toggle_label
from models import STEPS, ConfigError, ModelConfig, RoadmapNet, build_model, step_config
from models.roadmap import get_regime, step_deltas

ROOT = Path(__file__).resolve().parents[1]
FULL = "separate_downsampling"
PROXY = dict(width_mult=0.125, stem_stride=2)  # the CPU proxy's shape: 1/8 width, stride-2 stems, 32 px
MICRO_FIRST = list(OmegaConf.load(ROOT / "conf/roadmap/micro_first.yaml").steps)


def chain(order, upto: str, skip=(), regime: str = "r50") -> dict:
    """The model fields of walking `order` up to `upto`, applying each delta in turn except those in skip.

    Written independently of models.roadmap.config_of: a plain walk of step_deltas in the given order, as the
    paper describes the roadmap (each step on top of all earlier ones).
    """
    deltas, out = step_deltas(get_regime(regime)), {}
    for name in order[: list(order).index(upto) + 1]:
        if name not in skip:
            out.update(deltas[name])
    return out


def _run(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "run_ablation.py", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.mark.parametrize("left_out", STEPS[1:])
def test_each_step_can_be_left_out_of_convnext(left_out):
    cfg = step_config(FULL, without=(left_out,), **PROXY)
    assert dataclasses.asdict(cfg) == dataclasses.asdict(ModelConfig(**chain(STEPS, FULL, {left_out}), **PROXY))
    assert cfg != step_config(FULL, **PROXY), left_out  # every step still changes something in ConvNeXt
    torch.manual_seed(0)
    model = build_model(FULL, num_classes=10, without=(left_out,), **PROXY)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters()), left_out


def test_left_out_fields_fall_back_to_the_latest_earlier_step():
    # overlaps: width is set by baseline, stage_ratio and increase_width; depths by baseline and stage_ratio
    r200 = get_regime("r200")
    assert step_config(FULL, "r200", without=("increase_width",)).width == r200.stage_ratio_width  # 84
    assert step_config(FULL, "r200", without=("stage_ratio",)).width == r200.wide_width  # later step keeps 128
    no_ratio = step_config(FULL, "r200", without=("stage_ratio",))
    assert no_ratio.depths == r200.depths and no_ratio.width == 128
    both = step_config(FULL, "r200", without=("stage_ratio", "increase_width"))
    assert (both.depths, both.width) == (r200.depths, r200.width)
    # leaving out the chosen step itself is the previous step
    assert step_config("gelu", without=("gelu",)) == step_config("large_kernel")


@pytest.mark.parametrize("step", STEPS)
def test_removing_nothing_is_the_model_of_before(step):
    expected = ModelConfig(**chain(STEPS, step), **PROXY)
    assert step_config(step, without=(), **PROXY) == expected == step_config(step, roadmap=STEPS, **PROXY)
    torch.manual_seed(1)
    before = RoadmapNet(expected, num_classes=10)
    torch.manual_seed(1)
    now = build_model(step, num_classes=10, without=[], **PROXY)
    assert sum(p.numel() for p in now.parameters()) == sum(p.numel() for p in before.parameters())
    x = torch.randn(2, 3, 32, 32)
    before.eval(), now.eval()
    with torch.no_grad():
        assert torch.equal(now(x), before(x))


@pytest.mark.parametrize("regime", ["r50", "r200"])
def test_any_order_of_all_steps_ends_at_convnext(regime):
    final = step_config(FULL, regime)
    assert step_config("separate_downsampling", regime, roadmap=MICRO_FIRST) == final
    # widths first, stage ratio last: r200's stage_ratio also sets width (84), increase_width (128) still wins
    order = ["baseline", "increase_width", *[s for s in STEPS[1:] if s not in ("increase_width", "stage_ratio")]]
    order.append("stage_ratio")
    assert step_config("stage_ratio", regime, roadmap=order) == final
    assert step_config("stage_ratio", regime, roadmap=order, without=("increase_width",)).width == (
        get_regime(regime).stage_ratio_width
    )
    for perm in itertools.islice(itertools.permutations(STEPS[1:]), 0, 2000, 397):
        assert step_config(perm[-1], regime, roadmap=["baseline", *perm]) == final


def test_custom_order_walks_its_own_prefix():
    # roadmap=micro_first step=gelu: baseline plus gelu's delta, nothing else
    assert dataclasses.asdict(step_config("gelu", roadmap=MICRO_FIRST)) == dataclasses.asdict(
        ModelConfig(**chain(MICRO_FIRST, "gelu"))
    )
    assert step_config("gelu", roadmap=MICRO_FIRST) == ModelConfig(act_layer="gelu")
    mid = step_config("stage_ratio", roadmap=MICRO_FIRST)
    assert (mid.act_layer, mid.norm_layer, mid.depths, mid.stem_type) == ("gelu", "layernorm", [3, 3, 9, 3], "resnet")
    assert step_config("patchify_stem", roadmap=MICRO_FIRST, without=("gelu",)).act_layer == "relu"


@pytest.mark.parametrize(
    "kwargs,expect",
    [
        (dict(without=("gelux",)), "without='gelux' is not a step"),
        (dict(without=("baseline",)), "without='baseline' is not possible"),
        (dict(step="gelu", without=("bn_to_ln",)), "comes after it in the roadmap"),
        (dict(step="gelu", roadmap=["baseline", "gelu"], without=("stage_ratio",)), "is not in the roadmap"),
        (dict(roadmap=["baseline", "gelux"]), "unknown step 'gelux' in roadmap"),
        (dict(roadmap=["gelu", "baseline"], step="gelu"), "must start with 'baseline'"),
        (dict(roadmap=["baseline", "gelu", "gelu"], step="gelu"), "more than once"),
        (dict(roadmap=["baseline", "gelu"]), "unknown step 'separate_downsampling' of roadmap"),
    ],
)
def test_bad_toggles_are_one_paragraph_config_errors(kwargs, expect):
    kwargs = {"step": FULL, **kwargs}
    with pytest.raises(ConfigError) as err:
        step_config(kwargs.pop("step"), **kwargs)
    msg = str(err.value)
    assert expect in msg and "\n" not in msg
    assert "valid" in msg or "can be left out" in msg or "any of" in msg or "each step may appear once" in msg


def test_hydra_without_equals_the_builder(compose_cfg):
    cfg = compose_cfg(f"step={FULL}", "without=[gelu]")
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert model == dataclasses.asdict(step_config(FULL, without=("gelu",), **PROXY))  # the cpu profile's shape
    assert model["act_layer"] == "relu" and model["norm_layer"] == "layernorm"
    # a bar's override stays on top of the toggles; so does an explicit value equal to the step's own
    k5 = compose_cfg("bar=large_kernel_k5", "without=[move_up_dwconv,stage_ratio]", "profile=imagenet")
    assert OmegaConf.to_container(k5.model, resolve=True) == dataclasses.asdict(
        step_config("large_kernel", without=("move_up_dwconv", "stage_ratio"), kernel_size=5)
    )
    assert k5.model.kernel_size == 5 and k5.model.dw_position == "middle"
    keep = compose_cfg(f"step={FULL}", "without=[gelu]", "model.act_layer=gelu", "profile=imagenet")
    assert OmegaConf.to_container(keep.model, resolve=True) == dataclasses.asdict(step_config(FULL))


def test_hydra_roadmap_group(compose_cfg):
    cfg = compose_cfg("roadmap=micro_first", "step=gelu", "profile=imagenet")
    assert list(cfg.roadmap.steps) == MICRO_FIRST and cfg.roadmap.name == "micro_first"
    assert OmegaConf.to_container(cfg.model, resolve=True) == dataclasses.asdict(ModelConfig(act_layer="gelu"))
    r200 = compose_cfg("roadmap=micro_first", "step=stage_ratio", "regime=r200", "profile=imagenet")
    assert OmegaConf.to_container(r200.model, resolve=True) == dataclasses.asdict(
        step_config("stage_ratio", "r200", roadmap=MICRO_FIRST)
    )


def test_folder_names_name_the_toggles_and_keep_default_names():
    assert _suffix("", [], "paper") == "" and _suffix("model.kernel_size=5") == "_model.kernel_size=5"
    assert _suffix("model.kernel_size=5", [], "paper") == "_model.kernel_size=5"
    assert _suffix("", ["gelu", "bn_to_ln"], "paper") == "_without=gelu+bn_to_ln"
    assert _suffix("train.lr=0.1", ["gelu"], "micro_first") == "_train.lr=0.1,roadmap=micro_first,without=gelu"
    assert toggle_label(FULL, ["gelu"]) == "separate_downsampling_without=gelu" and toggle_label(FULL, []) == FULL


@pytest.mark.parametrize(
    "args,expect",
    [
        (["without=[gelux]"], "error: without='gelux' is not a step; steps that can be left out of 'large_kernel'"),
        (["roadmap.name=mine", "roadmap.steps=[baseline,gelux]"], "error: unknown step 'gelux' in roadmap"),
    ],
)
def test_cli_bad_toggles_exit_with_one_paragraph(tmp_path, args, expect):
    out = _run(*args, "profile=smoke", "data=synthetic", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(expect), out.stderr[-2000:]
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing written for a bad command


def test_default_runs_write_the_config_they_always_wrote(compose_cfg, tmp_path):
    # a finished run from before toggles existed has no without/roadmap keys: a default run must not add them, or a
    # rerun would refuse its own folder instead of reusing it
    sys.path.insert(0, str(ROOT))
    from run_ablation import prepare_run_dir

    default = compose_cfg("step=gelu", "profile=smoke", "data=synthetic")
    prepare_run_dir(default, str(tmp_path / "a"))
    written = OmegaConf.load(tmp_path / "a/config.yaml")
    assert "without" not in written and "roadmap" not in written and written.model.act_layer == "gelu"
    toggled = compose_cfg("step=gelu", "profile=smoke", "data=synthetic", "roadmap=micro_first", "without=[gelu]")
    prepare_run_dir(toggled, str(tmp_path / "b"))
    written = OmegaConf.load(tmp_path / "b/config.yaml")
    assert list(written.without) == ["gelu"] and written.roadmap.name == "micro_first"
    assert written.model.act_layer == "relu"
    with pytest.raises(ConfigError, match="different config"):  # the same folder, other toggles: refused
        prepare_run_dir(default, str(tmp_path / "b"))


def test_complexity_of_toggles_before_training():
    from ablations.complexity import complexity, main, toggle_rows

    rows = list(toggle_rows(FULL, [("stage_ratio",), ("gelu",)], img_size=64, num_classes=10))
    full, ratio, gelu = rows
    assert full["name"] == f"{FULL} (full)" and full["d_gflops"] == 0
    counted = complexity(build_model(FULL, num_classes=10, without=("stage_ratio",)), 64)
    assert (ratio["params"], ratio["gflops"]) == (counted["params"], counted["gflops"])
    assert ratio["d_params"] == counted["params"] - full["params"] < 0  # (3,4,6,3) has fewer blocks than (3,3,9,3)
    assert gelu["d_params"] == 0 and gelu["d_gflops"] == 0  # an activation costs no parameters or multiply-adds
    assert ratio["paper_d_gflops"] == pytest.approx(-(4.53 - 4.09))  # Table 10: stage ratio 4.09 -> 4.53
    assert main(["--without", "gelux"]) == 2
    assert main(["--without", "gelu", "--img-size", "64", "--num-classes", "10"]) == 0
