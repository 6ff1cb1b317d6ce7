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
        (
            dict(roadmap=["baseline", "gelu"]),
            "step 'separate_downsampling' exists but this roadmap does not visit it; valid choices on this roadmap: "
            "baseline, gelu",
        ),
        (dict(step="large_kernal", roadmap=["baseline", "gelu"]), "unknown step 'large_kernal' of roadmap"),
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
    # a fine-tune's source path stays one folder name, not nested folders
    flat = "_finetune.freeze_epochs=1,pretrained=runs+ft+pre"
    assert _suffix("finetune.freeze_epochs=1,pretrained=runs/ft/pre") == flat
    assert _suffix("pretrained=/ckpt/convnext_tiny.pth") == "_pretrained=ckpt+convnext_tiny.pth"
    assert _suffix("train.lr=0.1", ["gelu"], "micro_first") == "_train.lr=0.1,roadmap=micro_first,without=gelu"
    assert toggle_label(FULL, ["gelu"]) == "separate_downsampling_without=gelu" and toggle_label(FULL, []) == FULL


def test_the_order_of_left_out_steps_does_not_make_another_run(tmp_path):
    """without=[bn_to_ln,gelu] is without=[gelu,bn_to_ln]: same folder, same config.yaml, same figure bar."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ablations.run_folder import plain as _plain
    from analysis.runs import load_run

    assert _suffix("", ["bn_to_ln", "gelu", "gelu"], "paper") == _suffix("", ["gelu", "bn_to_ln"], "paper")
    assert toggle_label(FULL, ["bn_to_ln", "gelu"]) == f"{FULL}_without=gelu+bn_to_ln"
    orders = (["bn_to_ln", "gelu"], ["gelu", "bn_to_ln"])
    ab, ba = (_plain(OmegaConf.create({"step": FULL, "without": w})) for w in orders)
    assert ab == ba == {"step": FULL, "without": ["gelu", "bn_to_ln"]}
    run = fake_run(tmp_path, FULL, 0, 87.0, 0.006, without=("bn_to_ln", "gelu"))  # config.yaml in the given order
    assert run.parent.name == f"{FULL}_without=gelu+bn_to_ln"
    row = load_run(run)
    assert row["without"] == "gelu+bn_to_ln" and row["bar"] == f"{FULL}_without=gelu+bn_to_ln"


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
    from ablations.run_folder import prepare as prepare_run_dir

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


def fake_run(root: Path, step: str, seed: int, top1: float, gflops: float, without=(), roadmap=None) -> Path:
    """A finished run folder as run_ablation writes it (config.yaml, summary.json), toggles included."""
    import json

    import yaml

    name = step + _suffix("", list(without), roadmap["name"] if roadmap else "paper")
    run = root / name / f"seed{seed}"
    run.mkdir(parents=True)
    cfg = {"step": step, "bar": step, "seed": seed, "regime": {"name": "r50"}, "profile": "cpu",
           "data": {"name": "fashion_mnist"}, "train": {"name": "modern", "epochs": 2}}  # fmt: skip
    if without:
        cfg["without"] = list(without)
    if roadmap:
        cfg["roadmap"] = roadmap
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    summary = {"status": "finished", "top1": top1, "gflops": gflops, "params": 1, "paper_params": 2, "epochs": 2}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_leave_one_out_table_and_figure(tmp_path):
    import pandas as pd

    from analysis import analyze

    full, gelu, ratio = [88.0, 88.4, 88.2], [87.0, 87.5, 87.3], [88.9, 89.0, 89.4]
    for seed in range(3):
        fake_run(tmp_path, FULL, seed, full[seed], 4.456)
        fake_run(tmp_path, FULL, seed, gelu[seed], 4.456, without=["gelu"])
        fake_run(tmp_path, FULL, seed, ratio[seed], 3.990, without=["stage_ratio"])
    written = analyze(tmp_path)
    assert {"leave_one_out.csv", "leave_one_out.md", "leave_one_out.png", "leave_one_out.svg"} <= set(written)
    assert "roadmap.png" not in written and "fidelity.json" not in written  # no roadmap was walked here
    loo = pd.read_csv(tmp_path / "leave_one_out.csv", keep_default_na=False).set_index("without")
    assert list(loo.index) == ["stage_ratio", "gelu"]  # roadmap order
    se = ((pd.Series(full).std() ** 2 + pd.Series(gelu).std() ** 2) / 3) ** 0.5
    row = loo.loc["gelu"]
    assert row["top1_contribution"] == pytest.approx(sum(full) / 3 - sum(gelu) / 3)
    assert row["top1_contribution_se"] == pytest.approx(se) and row["n"] == row["full_n"] == 3
    assert row["paper_top1_gain"] == pytest.approx(80.62 - 80.57) and row["gflops_contribution"] == 0
    ratio_row = loo.loc["stage_ratio"]
    assert ratio_row["top1_contribution"] < 0 and ratio_row["gflops_contribution"] == pytest.approx(0.466)
    assert ratio_row["paper_top1_gain"] == pytest.approx(79.36 - 78.82) and ratio_row["paper_gflops_gain"] == 0.44
    svg = (tmp_path / "leave_one_out.svg").read_text()
    assert svg.count('id="loo:') == 2 and 'id="loo:gelu"' in svg
    md = (tmp_path / "leave_one_out.md").read_text()
    assert "| ReLU ➝ GELU | 87.27 ± 0.25 | 3 | +0.93 ± 0.19 | +0.05 |" in md
    for name in ("leave_one_out.csv", "leave_one_out.md", "results.csv", "results.md", "summary.csv"):
        assert str(tmp_path) not in (tmp_path / name).read_text(), name  # no absolute path in any output


def test_custom_roadmap_is_drawn_in_its_order(tmp_path):
    import pandas as pd

    from analysis import analyze

    roadmap = {"name": "micro_first", "steps": MICRO_FIRST}
    for i, step in enumerate(["baseline", "gelu", "stage_ratio", "large_kernel", FULL]):
        fake_run(tmp_path, step, 0, 80.0 + i, 4.0, roadmap=roadmap)
    written = analyze(tmp_path)
    assert "roadmap.png" in written and "fidelity.json" not in written
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("bar")
    assert list(summary.sort_values("order").index) == MICRO_FIRST  # every step, missing ones included
    assert (summary["roadmap"] == "micro_first").all() and summary.loc["fewer_norms", "status"] == "missing"
    # the paper's number only where the same steps are switched on: baseline, kernel 7 (= paper's BN->LN), the end
    paper = summary["paper_top1"].dropna()
    assert paper.to_dict() == {"baseline": 78.8, "large_kernel": 81.5, FULL: 82.0}
    svg = (tmp_path / "roadmap.svg").read_text()
    order = sorted(MICRO_FIRST, key=lambda b: svg.index(f'id="bar:{b}"'))
    assert order == MICRO_FIRST and "micro_first" in svg


def test_leave_one_out_sweep_config_lists_every_removable_step():
    params = OmegaConf.load(ROOT / "conf/sweep/leave_one_out.yaml").hydra.sweeper.params
    assert params.step == FULL and params.seed == "0,1,2"
    assert params.without == ",".join(f"[{s}]" for s in ["", *STEPS[1:]])


@pytest.mark.slow
def test_smoke_leave_one_out_sweep_ends_with_the_figure(tmp_path):
    out = subprocess.run(
        [sys.executable, "run_ablation.py", "+sweep=leave_one_out", "profile=smoke", "data=synthetic", "seed=0",
         "without=[],[gelu],[stage_ratio]", "logger=none", f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("leave_one_out.png", "leave_one_out.svg", "leave_one_out.md", "leave_one_out.csv", "results.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    for folder in (FULL, f"{FULL}_without=gelu", f"{FULL}_without=stage_ratio"):
        assert (tmp_path / folder / "seed0" / "summary.json").exists(), folder
    svg = (tmp_path / "leave_one_out.svg").read_text()
    assert svg.count('id="loo:') == 2
    ratio = OmegaConf.load(tmp_path / f"{FULL}_without=stage_ratio" / "seed0" / "config.yaml")
    assert list(ratio.model.depths) == [3, 4, 6, 3] and ratio.model.width_mult == 0.125
