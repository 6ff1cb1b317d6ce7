"""ablations.benchmark at toy sizes: the benchmark function, the ratios, the CLI's files and its errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from ablations import benchmark as bm

ROOT = Path(__file__).resolve().parents[1]
# These tests check plumbing, not speed: one thread avoids OpenMP oversubscription on shared CI cores.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = dict(batch_size=2, img_size=32, num_classes=10, repeats=2, iters=1, warmup=1)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _check_rows(df: pd.DataFrame, names: list[str]) -> None:
    assert list(df["model"]) == names
    for col in ("train_img_s", "infer_img_s"):
        assert all(math.isfinite(v) and v > 0 for v in df[col]), df[col]


def test_benchmark_cpu_steps_and_timm_refs():
    models = bm.model_factories(["baseline", "separate_downsampling"], "r50", num_classes=10)
    # each timm reference is measured right after the step with its architecture
    assert list(models) == ["baseline", "resnet50", "separate_downsampling", "convnext_tiny"]
    df = bm.benchmark(models, device="cpu", progress=False, **TINY)
    _check_rows(df, list(models))
    assert all(len(s.split(";")) == TINY["repeats"] for s in df["train_img_s_all"])
    assert set(df["mode"]) == {"fp32"}
    # the pairs have the same architecture, so the same parameter count
    p = dict(zip(df["model"], df["params"]))
    assert p["baseline"] == p["resnet50"] and p["separate_downsampling"] == p["convnext_tiny"]

    r = bm.add_ratios(df).set_index("model")
    assert r.loc["baseline", "train_ratio"] == pytest.approx(
        r.loc["baseline", "train_img_s"] / r.loc["resnet50", "train_img_s"]
    )
    assert r.loc["separate_downsampling", "ref"] == "convnext_tiny" and r.loc["convnext_tiny", "kind"] == "timm"
    assert math.isnan(r.loc["resnet50", "infer_ratio"])
    table = bm.format_table(bm.add_ratios(df), target=0.95)
    assert "(ref)" in table and "baseline" in table


def test_time_flops_counts_whole_table():
    seen = {}

    def fake_rows(regime, img_size):
        seen.update(regime=regime, img_size=img_size)
        yield from ({"name": s} for s in ("a", "b", "c"))

    # real fvcore counting at 224px takes far too long for a unit test
    secs, n = bm.time_flops("r200", rows=fake_rows)
    assert n == 3 and secs >= 0 and seen == {"regime": "r200", "img_size": 224}


def _cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "ablations.benchmark", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=ONE_THREAD,
    )


def test_cli_writes_csv_and_markdown(tmp_path):
    csv, md = tmp_path / "b.csv", tmp_path / "b.md"
    p = _cli(
        "--steps",
        "baseline",
        "--batch-size",
        "2",
        "--img-size",
        "32",
        "--repeats",
        "1",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--csv",
        str(csv),
        "--markdown",
        str(md),
    )
    assert p.returncode == 0, p.stderr
    df = pd.read_csv(csv)
    expected = {
        "model",
        "kind",
        "step",
        "mode",
        "dtype",
        "channels_last",
        "compile",
        "batch",
        "img_size",
        "train_img_s",
        "infer_img_s",
        "train_img_s_all",
        "device",
        "torch",
    }
    assert expected <= set(df.columns)
    assert list(df["model"]) == ["baseline", "resnet50", "convnext_tiny"]
    assert list(df["kind"]) == ["roadmap", "timm", "timm"] and (df["batch"] == 2).all()
    assert (df["train_img_s"] > 0).all() and (df["infer_img_s"] > 0).all()
    text = md.read_text()
    assert "| model | kind | train img/s | infer img/s |" in text and "--steps baseline" in text
    assert "threads" in p.stdout and "train vs timm" in p.stdout


def test_cli_unknown_step_exits_2():
    p = _cli("--steps", "baseline,no_such_step", "--device", "cpu")
    assert p.returncode == 2
    assert "no_such_step" in p.stderr and "separate_downsampling" in p.stderr and "stage_ratio" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("bad", [["--batch-size", "0"], ["--modes", "fp32,fp8"], ["--device", "tpu"]])
def test_bad_values_are_argparse_errors(bad, capsys):
    with pytest.raises(SystemExit) as e:
        bm.parse_args(bad)
    assert e.value.code == 2 and "error" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_benchmark_cuda_bf16_channels_last():
    models = bm.model_factories(["baseline", "separate_downsampling"], "r50", num_classes=10)
    df = bm.benchmark(
        models,
        device="cuda",
        batch_size=8,
        img_size=64,
        num_classes=10,
        repeats=2,
        iters=2,
        warmup=1,
        dtype="bf16",
        channels_last=True,
        progress=False,
    )
    _check_rows(df, list(models))
    assert set(df["mode"]) == {"bf16+cl"} and (df["channels_last"]).all()
