"""ablations.benchmark at toy sizes: medians, ratios and tables by value, TF32 and compile settings, the CLI's files."""

from __future__ import annotations

import math
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from ablations import ROADMAP, STEP_NAMES, VARIANTS
from ablations import benchmark as bm
from models import build_model

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
    for col in ("train", "infer"):
        assert all(math.isfinite(v) and v > 0 for v in df[f"{col}_img_s"]), df[f"{col}_img_s"]
        # the reported number is the median of the per-repeat numbers beside it (those are rounded to 0.01)
        for v, each in zip(df[f"{col}_img_s"], df[f"{col}_img_s_all"]):
            assert v == pytest.approx(statistics.median(float(x) for x in each.split(";")), abs=0.006)


def _row_line(table: str, model: str) -> str:
    """The line of `model` in a text or Markdown table."""
    cells = lambda ln: [c.strip() for c in ln.strip().strip("|").split("|")] if "|" in ln else ln.split()
    return next(ln for ln in table.splitlines() if ln.strip() and cells(ln)[0] == model)


def _check_ratios(r: pd.DataFrame, table: str, target: float) -> None:
    """Every ratio is ours / the paired timm model's img/s of the same mode, and the table prints exactly it."""
    for _, row in r.iterrows():
        for col in ("train", "infer"):
            if row["kind"] == "timm":
                assert math.isnan(row[f"{col}_ratio"]) and row["ref"] == ""
                continue
            ref = r[(r["model"] == row["ref"]) & (r["mode"] == row["mode"])]
            assert len(ref) == 1, row["model"]
            expected = row[f"{col}_img_s"] / ref[f"{col}_img_s"].iloc[0]
            assert row[f"{col}_ratio"] == pytest.approx(expected, rel=1e-12)
            mark = "ok" if expected >= target else "LOW"
            line = _row_line(table, row["model"])
            assert f"{expected:.3f}x {mark}" in line, (line, expected)
            assert f"{row[f'{col}_img_s']:.1f}" in line


def test_benchmark_cpu_steps_and_timm_refs():
    models = bm.model_factories(["baseline", "separate_downsampling"], "r50", num_classes=10)
    # each timm reference is measured right after the step with its architecture
    assert list(models) == ["baseline", "resnet50", "separate_downsampling", "convnext_tiny"]
    df = bm.benchmark(models, device="cpu", progress=False, **{**TINY, "repeats": 3})  # 3: a median is not a mean
    _check_rows(df, list(models))
    assert all(len(s.split(";")) == 3 for s in df["train_img_s_all"])
    assert set(df["mode"]) == {"fp32"} and not df["compile"].any() and not df["compiled"].any()
    # the pairs have the same architecture, so the same parameter count: the built models' own counts
    p = dict(zip(df["model"], df["params"]))
    assert p["baseline"] == p["resnet50"] == sum(x.numel() for x in models["baseline"]().parameters())
    assert (
        p["separate_downsampling"]
        == p["convnext_tiny"]
        == sum(x.numel() for x in models["convnext_tiny"]().parameters())
    )

    r = bm.add_ratios(df)
    assert dict(zip(r["model"], r["ref"])) == {
        "baseline": "resnet50",
        "resnet50": "",
        "separate_downsampling": "convnext_tiny",
        "convnext_tiny": "",
    }
    assert list(r["kind"]) == ["roadmap", "timm", "roadmap", "timm"]
    for markdown in (False, True):
        table = bm.format_table(r, markdown=markdown, target=0.95)
        assert table.count("(ref)") == 4  # train and infer of each timm row
        _check_ratios(r, table, 0.95)


def test_ratios_pair_within_each_mode():
    """Hand-made measurements: ratios divide by the timm row of the same mode, never another mode's."""
    rows = [
        ("baseline", "fp32", 100.0, 300.0),
        ("resnet50", "fp32", 200.0, 250.0),
        ("baseline", "bf16", 90.0, 80.0),
        ("resnet50", "bf16", 60.0, 100.0),
        ("stage_ratio", "fp32", 50.0, 50.0),
    ]
    df = pd.DataFrame(rows, columns=["model", "mode", "train_img_s", "infer_img_s"])
    r = bm.add_ratios(df).set_index(["model", "mode"])
    assert r.loc[("baseline", "fp32"), "train_ratio"] == 0.5 and r.loc[("baseline", "fp32"), "infer_ratio"] == 1.2
    assert r.loc[("baseline", "bf16"), "train_ratio"] == 1.5 and r.loc[("baseline", "bf16"), "infer_ratio"] == 0.8
    assert math.isnan(r.loc[("stage_ratio", "fp32"), "train_ratio"])  # no timm model has its architecture
    table = bm.format_table(bm.add_ratios(df[df["mode"] == "bf16"]), target=1.0)
    assert "1.500x ok" in table and "0.800x LOW" in table


def test_time_flops_counts_the_whole_table(monkeypatch):
    """time_flops runs the real roadmap_rows (default path) over every row; its time covers all of the counting."""
    import ablations.complexity as cx

    seen = []

    def small_rows(regime, img_size):
        for row in real(regime, img_size, 10, width_mult=0.125):  # every step and kernel variant, 1/8 width
            seen.append(row)
            yield row

    real = cx.roadmap_rows
    monkeypatch.setattr(cx, "roadmap_rows", small_rows)
    secs, n = bm.time_flops("r50", img_size=32)
    assert n == len(seen) == len(ROADMAP) + sum("train" not in v[1] for v in VARIANTS.values())
    assert [row["name"] for row in seen[: len(ROADMAP)]] == STEP_NAMES
    assert all(row["gflops"] > 0 for row in seen) and secs >= sum(row["count_s"] for row in seen)


class _FlagProbe(nn.Module):
    """A tiny model that records the TF32 and cuDNN flags in force whenever it runs."""

    def __init__(self, seen: list):
        super().__init__()
        self.conv, self.fc, self.seen = nn.Conv2d(3, 4, 3), nn.Linear(4, 10), seen

    def forward(self, x):
        b = torch.backends
        self.seen.append((b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark))
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("tf32", [False, True])
def test_tf32_is_set_for_matmuls_and_convs_alike(tf32):
    """TF32 for matmuls (nn.Linear) and cuDNN convs (1x1 convs) is one setting for every model, then restored."""
    b = torch.backends
    saved = b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32
    b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = (not tf32), tf32  # PyTorch-like mixed defaults going in
    try:
        seen = {"ours": [], "timm": []}
        models = {n: (lambda s=s: _FlagProbe(s)) for n, s in seen.items()}
        df = bm.benchmark(models, device="cpu", tf32=tf32, progress=False, **TINY)
        assert list(df["tf32"]) == [tf32, tf32]
        for name, flags in seen.items():
            assert flags and {f[:2] for f in flags} == {(tf32, tf32)}, name
        assert (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32) == ((not tf32), tf32)  # restored
    finally:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = saved


@pytest.mark.cuda
def test_cudnn_benchmark_on_cuda():
    seen: list = []
    bm.benchmark({"probe": lambda: _FlagProbe(seen)}, device="cuda", progress=False, **TINY)
    assert seen and all(f[2] for f in seen)


class _Uncompilable(nn.Module):
    """Runs eagerly whatever torch.compile says: the compiled column must report it."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 10)

    @torch.compiler.disable
    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def _tiny_step(step):
    return lambda: build_model(step, num_classes=10, width_mult=0.125, depths=[1, 1, 1, 1], stem_stride=2)


def test_compile_many_models_in_one_process():
    """Five roadmap models share RoadmapNet.forward: at Dynamo's default recompile limit (8 entries = 4 models x
    train/eval) the fifth would silently run eager. Every one must really run compiled, and a model that cannot be
    compiled must say so. The 'eager' backend keeps this fast; Dynamo's caching and limits are the same for all."""
    import torch._dynamo

    steps = ["baseline", "patchify_stem", "depthwise_conv", "inverted_bottleneck", "separate_downsampling"]
    models = {s: _tiny_step(s) for s in steps} | {"uncompilable": _Uncompilable}
    with torch._dynamo.config.patch(recompile_limit=8):  # (pytest's monkeypatch would delete it on undo)
        df = bm.benchmark(models, device="cpu", compile=True, compile_backend="eager", progress=False, **TINY)
    assert df["compile"].all() and set(df["mode"]) == {"fp32+compile"}
    assert dict(zip(df["model"], df["compiled"])) == {**dict.fromkeys(steps, True), "uncompilable": False}
    assert (df.loc[df["model"] != "uncompilable", "graphs"] >= 2).all()  # a train and an eval graph each
    table = bm.format_table(bm.add_ratios(df))
    assert table.splitlines()[0].split()[-1] == "compiled" and "NO (eager)" in table.splitlines()[-1]


@pytest.mark.slow
def test_compile_inductor():
    """The default backend (inductor: C++ code generation on CPU, about a minute) on ConvNeXt, the model users compile
    (its LayerNorm, GELU and depthwise convs; one model: the cost of several models in one process is Dynamo's,
    tested above with the eager backend, and the GPU check compiles both endpoints with inductor on CUDA)."""
    models = {"separate_downsampling": _tiny_step("separate_downsampling")}
    df = bm.benchmark(models, device="cpu", compile=True, progress=False, **TINY)
    assert df["compiled"].all(), df[["model", "compiled", "graphs"]]


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
        "--tf32",
        "on",
    )
    assert p.returncode == 0, p.stderr
    df = pd.read_csv(csv, dtype={"train_img_s_all": str, "infer_img_s_all": str})
    expected = {"model", "kind", "step", "mode", "dtype", "channels_last", "compile", "compiled", "graphs", "tf32"}
    expected |= {"batch", "img_size", "train_img_s", "infer_img_s", "train_img_s_all", "device", "torch"}
    assert expected <= set(df.columns)
    assert list(df["model"]) == ["baseline", "resnet50", "convnext_tiny"]
    assert list(df["kind"]) == ["roadmap", "timm", "timm"] and (df["batch"] == 2).all() and (df["img_size"] == 32).all()
    assert df["tf32"].all() and not df["compile"].any() and not df["compiled"].any()
    _check_rows(df, ["baseline", "resnet50", "convnext_tiny"])
    text = md.read_text()
    assert "| model | kind | train img/s | infer img/s |" in text and "--steps baseline" in text
    assert "threads" in p.stdout and "train vs timm" in p.stdout
    # the TF32 setting is in the run header and in each table's header, on screen and in the Markdown file
    assert "tf32 on (matmuls and convs)" in p.stdout and "tf32 on (matmuls and convs)" in text
    assert "[fp32] (tf32 on; ratio = ours / timm" in p.stdout and "## fp32\n\ntf32 on; ratio = ours / timm" in text
    # the printed and written ratios are the CSV's measured numbers divided, in both tables
    base, ref = df.set_index("model").loc["baseline"], df.set_index("model").loc["resnet50"]
    for col in ("train", "infer"):
        ratio = base[f"{col}_img_s"] / ref[f"{col}_img_s"]
        assert base[f"{col}_ratio"] == pytest.approx(ratio, rel=1e-12)
        for table in (p.stdout, text):
            assert f"{ratio:.3f}x" in _row_line(table, "baseline")


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


@pytest.mark.cuda
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


def test_process_clock_counts_cpu_time_not_waiting():
    # --clock process: a step that only waits (as on a machine busy with other jobs) costs no CPU time, so it
    # reads as far faster than by the wall clock, which counts the wait in full.
    import time

    wall = bm.images_per_s(lambda: time.sleep(0.05), 4, bm.CLOCKS["wall"], iters=2)
    process = bm.images_per_s(lambda: time.sleep(0.05), 4, bm.CLOCKS["process"], iters=2)
    assert wall == pytest.approx(4 / 0.05, rel=0.5)  # 4 images per 0.05 s step
    assert process > 20 * wall
    with pytest.raises(ValueError, match="process"):
        bm.benchmark({}, device="cuda", clock="process")
    p = _cli("--steps", "baseline", "--clock", "process", "--device", "cpu", "--batch-size", "2", "--img-size", "32",
             "--repeats", "1", "--iters", "1", "--warmup", "0", "--no-timm", "--csv", os.devnull)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "clock process (images per CPU-second of this process)" in p.stdout


def test_timing_is_torch_utils_benchmark():
    """images_per_s: timeit(iters) runs Timer's 2 warm-up calls then exactly `iters` timed ones; blocked_autorange
    times blocks until min_run_time seconds are timed; the figure is batch / the median step time."""
    import time

    calls = []

    def step():
        calls.append(time.perf_counter())
        time.sleep(0.01)

    assert bm.images_per_s(step, 8, iters=3) == pytest.approx(8 / 0.01, rel=0.5)
    assert len(calls) == 2 + 3
    calls.clear()
    ips = bm.images_per_s(step, 8, min_run_time=0.15)
    assert ips == pytest.approx(8 / 0.01, rel=0.5)
    assert len(calls) >= 1 + 15  # the block-size estimate (a warm-up call), then >= 0.15 s of 0.01 s steps
    # the thread count in force is kept (Timer's own default would be one thread)
    seen = []
    torch.set_num_threads(2)  # the autouse fixture restores it
    bm.images_per_s(lambda: seen.append(torch.get_num_threads()), 1, iters=1)
    assert set(seen) == {2}


def test_memory_columns_only_where_measured():
    """CPU rows carry no peak memory (NaN) and the table has no memory columns; CUDA-like rows print them."""
    df = bm.benchmark({"probe": lambda: _FlagProbe([])}, device="cpu", progress=False, **TINY)
    assert df["train_mem_mib"].isna().all() and df["infer_mem_mib"].isna().all()
    assert "MiB" not in bm.format_table(bm.add_ratios(df))
    df = df.assign(train_mem_mib=[1234.4], infer_mem_mib=[56.6])
    for markdown in (False, True):
        table = bm.format_table(bm.add_ratios(df), markdown=markdown)
        assert "train MiB" in table.splitlines()[0] and "infer MiB" in table.splitlines()[0]
        assert "1234" in _row_line(table, "probe") and "57" in _row_line(table, "probe")


def _mlp(width: int, img: int = 8) -> nn.Module:
    """A model of about img*img*64*width + 10*width parameters that takes (N, 3, img, img) images."""
    return nn.Sequential(nn.Conv2d(3, 64, 1), nn.Flatten(), nn.Linear(64 * img * img, width), nn.Linear(width, 10))


@pytest.mark.cuda
def test_cuda_peak_memory_is_each_models_own():
    """A model's peak is its own: a small model measured after a big one (whose weights and AdamW state stay
    resident) reads far below the big one, and the big one above its weights + gradients + two AdamW moments."""
    models = {"big": lambda: _mlp(8192), "small": lambda: _mlp(4)}
    df = bm.benchmark(models, device="cuda", batch_size=64, img_size=8, num_classes=10, repeats=1, iters=1,
                      progress=False)  # fmt: skip
    mem = df.set_index("model")["train_mem_mib"]
    big = sum(p.numel() for p in _mlp(8192).parameters()) * 4 / bm.MIB  # fp32 weights, MiB
    assert mem["big"] > 4 * big
    assert mem["small"] < big / 10
    assert (df["infer_mem_mib"] > 0).all()


class _Killer(_FlagProbe):
    """On its k-th forward call the process receives a SIGTERM, as from the GPU check's time limit."""

    def __init__(self, k: int):
        super().__init__([])
        self.k, self.calls = k, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.k:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(x)


def test_sigterm_keeps_the_visits_measured_so_far():
    """Timer.timeit(1) makes 3 forward calls per phase, 6 per visit: the killer's 8th call is in its second visit,
    so 'probe' has 2 visits, the killer and 'last' 1; its 4th call is in its first visit, so only 'probe' has one
    (a model with no finished visit has no row)."""
    for k, visits in ((8, {"probe": 2, "killer": 1, "last": 1}), (4, {"probe": 1})):
        models = {"probe": lambda: _FlagProbe([]), "killer": lambda k=k: _Killer(k), "last": lambda: _FlagProbe([])}
        with bm.stop_on_sigterm():
            df = bm.benchmark(models, device="cpu", progress=False, **{**TINY, "repeats": 3, "warmup": 0})
        assert df.attrs["stopped"] == max(visits.values())
        assert dict(zip(df["model"], (len(v.split(";")) for v in df["train_img_s_all"]))) == visits
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    with bm.stop_on_sigterm():  # and without a signal nothing is stopped
        assert (
            bm.benchmark({"probe": lambda: _FlagProbe([])}, device="cpu", progress=False, **TINY).attrs["stopped"]
            is None
        )


def test_cli_writes_the_partial_results_of_a_sigterm(tmp_path, monkeypatch, capsys):
    """The CLI under a time limit: its CSV and Markdown hold what was measured, it says so, exit status 143."""
    monkeypatch.setattr(
        bm, "model_factories", lambda *a: {"probe": lambda: _FlagProbe([]), "killer": lambda: _Killer(8)}
    )
    csv, md = tmp_path / "b.csv", tmp_path / "b.md"
    args = ["--steps", "baseline", "--device", "cpu", "--batch-size", "2", "--img-size", "32", "--repeats", "3",
            "--num-classes", "10",
            "--iters", "1", "--no-progress", "--csv", str(csv), "--markdown", str(md)]  # fmt: skip
    assert bm.main(args) == 143
    df = pd.read_csv(csv)
    assert list(df["model"]) == ["probe", "killer"]
    assert "STOPPED by SIGTERM in repeat 2 of 3 (fp32): partial results" in md.read_text()
    assert "STOPPED by SIGTERM" in capsys.readouterr().out
