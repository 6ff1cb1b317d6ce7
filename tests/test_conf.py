"""conf/ against models/ and ablations/: one delta per step, both regimes, bars, schema errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ablations import STEP_NAMES, VARIANTS
from models import STEPS, step_config

ROOT = Path(__file__).resolve().parents[1]


def test_ablations_models_and_conf_list_the_same_steps():
    files = sorted(p.stem for p in (ROOT / "conf/step").glob("*.yaml"))
    assert tuple(STEP_NAMES) == STEPS and sorted(STEPS) == files


@pytest.mark.parametrize("regime", ["r50", "r200"])
@pytest.mark.parametrize("step", STEPS)
def test_composed_model_equals_builder(compose_cfg, step, regime):
    cfg = compose_cfg(f"step={step}", f"regime={regime}", "profile=imagenet")
    assert cfg.step == step and cfg.bar == step
    composed = OmegaConf.to_container(cfg.model, resolve=True)
    assert composed == dataclasses.asdict(step_config(step, regime))


def test_each_step_file_names_its_step_and_sets_no_model_field():
    # the deltas live in models/roadmap.py only: a model field set here would override the toggles (without=,
    # roadmap=), since the model node is filled by the roadmap.model resolver and files only override it
    for step in STEPS:
        text = (ROOT / f"conf/step/{step}.yaml").read_text()
        data = OmegaConf.create(text)
        assert data.step == step and "model" not in data and "defaults" not in data, step
        assert text.splitlines()[1].startswith("# "), f"{step}: second line should cite the paper's change"


def test_paper_roadmap_file_equals_steps():
    paper = OmegaConf.load(ROOT / "conf/roadmap/paper.yaml")
    assert paper.name == "paper" and tuple(paper.steps) == STEPS


def test_bars_cover_steps_and_variants(compose_cfg):
    bars = {p.stem for p in (ROOT / "conf/bar").glob("*.yaml")}
    assert bars == set(STEPS) | set(VARIANTS)
    for name, (step, overrides, _) in VARIANTS.items():
        cfg = compose_cfg(f"bar={name}")
        assert cfg.step == step and cfg.bar == name
        for key, value in overrides.items():
            assert (cfg.train.name if key == "train" else OmegaConf.select(cfg, key)) == value


def test_kernel_sweep_override(compose_cfg):
    cfg = compose_cfg("step=large_kernel", "model.kernel_size=5")
    assert cfg.model.kernel_size == 5 and cfg.model.dw_position == "top"


def test_profiles_adapt_every_step_identically(compose_cfg):
    for step in ("baseline", "separate_downsampling"):
        cpu = compose_cfg(f"step={step}", "profile=cpu")
        assert (cpu.model.width_mult, cpu.model.stem_stride, cpu.data.img_size) == (0.125, 2, 32)
        # the last stage stays at least 2x2: img / stem_stride / 2**3
        assert cpu.data.img_size // cpu.model.stem_stride // 8 >= 2
        gpu = compose_cfg(f"step={step}", "profile=gpu")
        assert gpu.data.img_size // gpu.model.stem_stride // 8 >= 4 and gpu.model.width_mult == 1.0


def test_mistyped_field_fails_at_compose(compose_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_cfg("model.kernal_size=5")
    with pytest.raises(ConfigCompositionException):
        compose_cfg("train.epochs=three")


def test_callback_is_wired(compose_cfg):
    cfg = compose_cfg(return_hydra_config=True)
    assert cfg.hydra.callbacks.roadmap_figure._target_ == "analysis.callback.RoadmapFigureCallback"


def _run(*args):
    return subprocess.run([sys.executable, "run_ablation.py", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize(
    "args,expect",
    [
        (["step=large_kernal"], "Available options in 'step'"),
        (["regime=r101"], "Available options in 'regime'"),
        (["data=imagenet1k"], "Available options in 'data'"),
        (["profile=tpu"], "Available options in 'profile'"),
        (["train.epochs=ten"], "train.epochs"),
    ],
)
def test_cli_user_mistakes_have_no_traceback(args, expect):
    out = _run(*args)
    assert out.returncode != 0 and expect in out.stderr + out.stdout
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("step", ["baseline", "separate_downsampling"])
def test_cfg_job_shows_the_composed_step(step):
    # every step composes in test_composed_model_equals_builder; here the command line itself, twice
    out = _run(f"step={step}", "profile=imagenet", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.step == step
    assert OmegaConf.to_container(cfg.model, resolve=True) == dataclasses.asdict(step_config(step))
