"""Sweeps: the smoke multirun over every step ends with the figure; submitit_local runs jobs as processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from models import STEPS

ROOT = Path(__file__).resolve().parents[1]


def _multirun(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "run_ablation.py", "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=timeout,
    )


@pytest.mark.slow
def test_smoke_sweep_over_every_step_writes_the_figure(tmp_path):
    out = _multirun("step=glob(*)", "profile=smoke", "data=synthetic", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("roadmap.png", "roadmap.svg", "roadmap_flops.png", "results.csv", "results.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    df = pd.read_csv(tmp_path / "results.csv")
    assert len(df) == len(STEPS) and set(df["step"]) == set(STEPS) and (df["status"] == "finished").all()
    assert all((tmp_path / s / "seed0" / "summary.json").exists() for s in STEPS)  # <sweep>/<bar>/seed<k>/
    assert (tmp_path / "roadmap.svg").read_text().count('id="bar:') == len(STEPS)


def test_roadmap_sweep_config_lists_every_bar_in_order():
    from omegaconf import OmegaConf

    from analysis.runs import FIGURE_ORDER

    params = OmegaConf.load(ROOT / "conf/sweep/roadmap.yaml").hydra.sweeper.params
    assert params.bar.split(",") == list(FIGURE_ORDER) and params.seed == "0,1,2"


@pytest.mark.slow
def test_submitit_local_runs_a_two_job_sweep(tmp_path):
    out = _multirun(
        "step=baseline,separate_downsampling",
        "profile=smoke",
        "data=synthetic",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    df = pd.read_csv(tmp_path / "results.csv")
    assert sorted(df["step"]) == ["baseline", "separate_downsampling"] and (df["status"] == "finished").all()
    assert (tmp_path / ".submitit").is_dir()  # the jobs really went through submitit


def test_sweep_carries_on_after_a_job_fails(tmp_path):
    out = _multirun(
        "step=baseline", "data.img_size=8,32", "profile=smoke", "data=synthetic", f"hydra.sweep.dir={tmp_path}"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    df = pd.read_csv(tmp_path / "results.csv")
    status = dict(zip(df["run_dir"].map(lambda p: "img_size=8" in p), df["status"]))
    assert status == {True: "failed", False: "finished"}, df[["run_dir", "status"]]
    assert "data.img_size=8 is too small" in out.stderr
