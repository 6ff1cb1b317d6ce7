"""scripts/gpu_check.sh on CPU (the dry run of the GPU check, GPU_CHECK_DEVICE=cpu) and its parts: the budget, the
stage timeout, the order of the runs, the packing, and make gpu-wheels' choice of packages."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check as gc  # noqa: E402
import gpu_wheels as gw  # noqa: E402

CARRIED = {"hydra-core", "omegaconf", "antlr4-python3-runtime", "fvcore", "iopath", "yacs", "termcolor", "submitit",
           "hydra-joblib-launcher", "hydra-submitit-launcher", "pydoe"}  # fmt: skip


def _check(tmp_path: Path, data: Path, minutes: float, **env) -> subprocess.CompletedProcess:
    """scripts/gpu_check.sh as on the GPU machine, but on CPU with this venv's python and tiny sizes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_WHEELS": "skip",
           "GPU_CHECK_PYTHON": sys.executable, "GPU_CHECK_MINUTES": str(minutes), "GPU_CHECK_DATA": str(data),
           "GPU_CHECK_RUNS": str(tmp_path / "runs"), "GPU_CHECK_WORK": str(tmp_path / "work"),
           "GPU_CHECK_OUT": str(tmp_path / "out"), "GPU_CHECK_CODE": "test", **env}  # fmt: skip
    env.pop("OUT", None)
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def _stages(out: Path) -> dict[str, dict]:
    return {r["stage"]: r for r in json.loads((out / "gpu_check.json").read_text())["stages"]}


def _members(path: Path) -> list[str]:
    with tarfile.open(path) as t:
        return t.getnames()


@pytest.mark.slow
def test_dry_run_every_stage_and_its_files(tmp_path, fmnist_dir, monkeypatch):
    """Every stage runs its real command at toy sizes; at most 8 files come out, each holding the stage's numbers;
    the run folders unpacked from runs.tar.gz (the next sitting's carry) are reused, not trained again."""
    p = _check(tmp_path, fmnist_dir, 10)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "out"
    files = sorted(f.name for f in out.iterdir())
    assert files == ["benchmark.csv", "gpu_check.json", "gpu_check.log", "report.md", "results.csv", "runs.tar.gz",
                     "work.tar.gz"]  # fmt: skip
    assert all((out / f).stat().st_size < gc.MAX_FILE_BYTES for f in files)
    st = _stages(out)
    assert list(st) == [*gc.STAGES[:-1], "run baseline", "analysis"]
    assert {r["status"] for r in st.values()} == {"ok"}, st
    report = (out / "report.md").read_text()
    for name, r in st.items():  # one row per stage, with its status and wall time
        assert f"| {name} | ok | {r['wall_s']} |" in report

    # env: versions; tests: the suite's CUDA-only tests, all skipped here
    assert st["env"]["env"]["cuda_available"] is False and st["env"]["env"]["hydra"] == "1.3.8"
    n_cuda = sum(f.read_text().count("@pytest.mark.cuda\n") for f in (ROOT / "tests").glob("test_*.py"))
    assert n_cuda >= 5 and st["tests"]["summary"]["skipped"] == n_cuda
    assert not {"passed", "failed", "error", "errors"} & set(st["tests"]["summary"])
    # the short run: 2 epochs, its numbers as its summary.json has them
    short = json.loads((tmp_path / "work" / "short_run" / "summary.json").read_text())
    assert short["epochs"] == 2 and st["short_run"]["top1"] == short["top1"] and len(st["short_run"]["img_per_s"]) == 2
    assert f"top-1 {short['top1']:.2f} %" in report
    # the benchmark: eager rows of the step and timm's two, the compiled row, one CSV
    bench = (out / "benchmark.csv").read_text().splitlines()
    head = bench[0].split(",")
    rows = [dict(zip(head, ln.split(","))) for ln in bench[1:]]
    assert [(r["model"], r["mode"]) for r in rows] == [
        ("baseline", "fp32"), ("resnet50", "fp32"), ("convnext_tiny", "fp32"), ("baseline", "fp32+compile")
    ]  # fmt: skip
    assert rows[-1]["compiled"] == "True" and "train_mem_mib" in head
    assert "| baseline | roadmap |" in report and "fp32+compile" in report
    # the run: a normal run folder, in results.csv with its summary's top-1, packed without its checkpoint
    run_dir = tmp_path / "runs" / "smoke" / "fashion_mnist" / "baseline" / "seed0"
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "finished" and st["run baseline"]["top1"] == s["top1"]
    assert str(s["top1"]) in (out / "results.csv").read_text() and (run_dir / "last.pt").is_file()
    runs = _members(out / "runs.tar.gz")
    assert "runs/smoke/fashion_mnist/baseline/seed0/summary.json" in runs and not any(m.endswith(".pt") for m in runs)
    work = _members(out / "work.tar.gz")
    assert {"work/env.json", "work/short_run/metrics.jsonl", "work/analysis/results.md"} <= set(work)
    assert "work/jpeg_run/metrics.jsonl" in work and not any(m.startswith("work/jpegs/") for m in work)
    # the jpeg run: the same model from JPEGs decoded on the device, its img/s beside the in-memory run's
    jpeg = json.loads((tmp_path / "work" / "jpeg_run" / "summary.json").read_text())
    assert jpeg["status"] == "finished" and st["jpeg_run"]["top1"] == jpeg["top1"]
    assert st["jpeg_run"]["vs_in_memory"] > 0
    assert not any(m.endswith(".pt") for m in work)

    # the next sitting: runs.tar.gz unpacked at a repository root, the finished run is reused from its summary
    with tarfile.open(out / "runs.tar.gz") as t:
        t.extractall(tmp_path / "next", filter="data")
    c = _offline_check(tmp_path / "next" / "runs", gc.PLANS["cpu"], tmp_path, calls := [], monkeypatch)
    c.do_runs(["baseline"])
    assert calls == [] and c.records[0]["status"] == "reused" and c.records[0]["top1"] == s["top1"]


def _offline_check(runs: Path, plan, tmp_path: Path, calls: list, monkeypatch) -> gc.Check:
    """A Check whose stage commands are recorded in `calls` instead of run (each 'finishes' in 1 s)."""

    def fake(cmd, log, timeout, **kw):
        calls.append((cmd, timeout))
        return {"rc": 0, "wall_s": 1.0, "cpu_s": 1.0, "timed_out": False, "tail": []}

    monkeypatch.setattr(gc, "run_stage", fake)
    return gc.Check(plan, gc.Budget(600, 45), tmp_path, runs, Path(".data/fashion-mnist"), open(tmp_path / "log", "w"))


def test_runs_reuse_finished_folders_and_train_the_rest_with_the_gpu_overrides(tmp_path, monkeypatch):
    """The runs stage on the cuda plan: a finished folder (an earlier sitting's) is reused; a failed one is trained
    again, with the gpu profile's command; the sweep projection counts what is left."""
    runs = tmp_path / "runs"
    done = runs / "gpu" / "fashion_mnist" / "baseline" / "seed0"
    failed = runs / "gpu" / "fashion_mnist" / "stage_ratio" / "seed0"
    for d, status in ((done, "finished"), (failed, "failed")):
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"status": status, "top1": 91.5, "wall_s": 100.0}))
    (done / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "epoch_s": 9.0, "img_per_s": 6000.0}) + "\n")
    c = _offline_check(runs, gc.PLANS["cuda"], tmp_path, calls := [], monkeypatch)
    c.do_runs(["baseline", "stage_ratio"])
    assert [r["status"] for r in c.records] == ["reused", "ok"]
    assert c.records[0]["top1"] == 91.5 and c.records[0]["img_per_s"] == [6000.0]
    ((cmd, timeout),) = calls
    assert cmd[1:] == ["run_ablation.py", "bar=stage_ratio", "profile=gpu", "seed=0", "device=cuda",
                       "data.root=.data/fashion-mnist", "progress=false", f"hydra.run.dir={failed}"]  # fmt: skip
    assert timeout == pytest.approx(3 * c.records[1]["estimate_s"] + 30, abs=0.2)
    projection = c.sweep_projection(gc.RUN_ORDER)
    assert projection["bars_left"] == [b for b in gc.RUN_ORDER if b != "baseline"]


def test_run_estimates_scale_the_short_run_by_the_benchmark(tmp_path, monkeypatch):
    """A run's estimate: the short run's start-up + the run's epochs at the short run's epoch time, scaled by the
    benchmark's train img/s of the bar's step against separate_downsampling's (FLOPs when not measured)."""
    c = _offline_check(tmp_path / "runs", gc.PLANS["cuda"], tmp_path, [], monkeypatch)
    sd = gc.GFLOPS["separate_downsampling"]
    assert c.run_estimate("separate_downsampling") == gc.PLANS["cuda"].run_prior_s  # nothing measured yet
    assert c.run_estimate("depthwise_conv") == pytest.approx(gc.PLANS["cuda"].run_prior_s * 2.35 / sd)
    c.records.append({"stage": "short_run", "wall_s": 60.0, "epoch_s": [20.0, 20.0]})
    assert c.run_estimate("separate_downsampling") == pytest.approx(20 + 10 * 20 * 1.1)
    assert c.run_estimate("baseline_classic") == pytest.approx(20 + 10 * 20 * 4.09 / sd * 1.1)  # FLOPs
    rows = [{"model": "separate_downsampling", "train_img_s": "1000"}, {"model": "baseline", "train_img_s": "2000"}]
    c.records.append({"stage": "benchmark", "rows": rows})
    assert c.run_estimate("baseline_classic") == pytest.approx(20 + 10 * 20 * 0.5 * 1.1)  # the baseline's speed
    assert c.run_estimate("gelu") == pytest.approx(20 + 10 * 20 * 4.15 / sd * 1.1)  # not benchmarked: FLOPs


def test_budget_cut_off_skips_the_stages_that_do_not_fit_and_says_so(tmp_path, fmnist_dir):
    """35 s with 20 kept for packing: no stage of the dry run (estimates 20-30 s) fits, so each is skipped with its
    reason, in the report and the device tool's output tail, and the files still appear."""
    p = _check(tmp_path, fmnist_dir, 35 / 60, GPU_CHECK_STAGES="tests,short_run,benchmark,compile,jpeg_run,runs")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "out"
    st = _stages(out)
    assert st.pop("env") == {"stage": "env", "status": "skipped", "reason": "not in GPU_CHECK_STAGES"}
    assert list(st) == ["tests", "short_run", "benchmark", "compile", "jpeg_run", "run baseline"]
    report = (out / "report.md").read_text()
    for name, r in st.items():
        assert r["status"] == "skipped" and re.fullmatch(rf"needs ~{r['estimate_s']:.0f} s, 1[45] s of the budget left",
                                                         r["reason"])  # fmt: skip
        assert f"| {name} | skipped |" in report and r["reason"] in report
        assert f"{name}: skipped (needs ~" in p.stdout
    assert sorted(f.name for f in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "report.md", "work.tar.gz"]


def test_budget_with_a_clock():
    now = [0.0]
    b = gc.Budget(100, reserve=10, clock=lambda: now[0])
    assert b.refuse(90) is None and b.refuse(91) == "needs ~91 s, 90 s of the budget left"
    now[0] = 45
    assert b.left() == 45 and b.refuse(45) is None and b.refuse(50) == "needs ~50 s, 45 s of the budget left"
    assert b.timeout(1) == 33  # 3x the estimate + 30 s: a hung stage leaves time to the later ones
    assert b.timeout(40) == 45  # never past the budget
    now[0] = 200
    assert b.refuse(0.5) == "needs ~0 s, 0 s of the budget left" and b.timeout(5) == 1.0


def test_a_stage_that_runs_long_is_stopped_and_keeps_what_it_wrote(tmp_path):
    """SIGTERM at the timeout (as the trainer expects: it saves and exits), its output and files kept."""
    script = tmp_path / "long.py"
    script.write_text(
        "import signal, sys, time\n"
        f"def stop(*a):\n    open({str(tmp_path / 'saved')!r}, 'w').write('saved'); sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('epoch 1 done', flush=True)\n"
        "time.sleep(60)\n"
    )
    log = open(tmp_path / "log", "w")
    res = gc.run_stage([sys.executable, "-I", "-S", str(script)], log, timeout=5)  # -I -S: starts in ms, not s
    log.close()
    assert res["timed_out"] and res["rc"] == 124 and 4.5 < res["wall_s"] < 25
    assert res["tail"] == ["epoch 1 done"] and "epoch 1 done" in (tmp_path / "log").read_text()
    assert (tmp_path / "saved").read_text() == "saved"
    assert gc._status(res) == "timed out"


def test_run_order_is_the_sweep_with_the_headline_and_big_steps_first():
    from ablations import STEP_NAMES, table10_gflops
    from analysis.fidelity import BIG_STEP, PAPER_TOP1

    sweep = yaml.safe_load((ROOT / "conf" / "sweep" / "roadmap.yaml").read_text())
    bars = sweep["hydra"]["sweeper"]["params"]["bar"].split(",")
    assert sorted(gc.RUN_ORDER) == sorted(bars) and len(set(gc.RUN_ORDER)) == len(bars) == 17
    assert gc.RUN_ORDER[:2] == ["baseline", "separate_downsampling"]
    paper = PAPER_TOP1["r50"]
    big = [s for p, s in zip(STEP_NAMES, STEP_NAMES[1:]) if abs(round(paper[s] - paper[p], 2)) >= BIG_STEP]
    assert len(big) == 7
    needed = {*gc.RUN_ORDER[:2], *big, *(STEP_NAMES[STEP_NAMES.index(s) - 1] for s in big)}
    assert set(gc.RUN_ORDER[: len(needed)]) == needed  # every big step and the step before it, before the rest
    assert {b: gc.GFLOPS[b] for b in bars} == {b: table10_gflops(b) for b in bars}


def test_settings_name_the_valid_choices(monkeypatch):
    monkeypatch.setenv("GPU_CHECK_STAGES", "env,benchmarks")
    with pytest.raises(SystemExit, match="unknown benchmarks; valid choices are env, tests, short_run"):
        gc._settings()
    monkeypatch.setenv("GPU_CHECK_STAGES", "env")
    monkeypatch.setenv("GPU_CHECK_DEVICE", "tpu")
    with pytest.raises(SystemExit, match="GPU_CHECK_DEVICE='tpu': valid choices are cuda, cpu"):
        gc._settings()
    monkeypatch.setenv("GPU_CHECK_DEVICE", "cpu")
    monkeypatch.setenv("GPU_CHECK_MINUTES", "0")
    with pytest.raises(SystemExit, match="must be a positive number"):
        gc._settings()


def test_gpu_wheels_carries_what_the_machine_lacks():
    """The project's requirements walked through this venv: what the GPU image has is not carried (nor walked)."""
    have = gw.machine_packages()
    assert {"torch", "timm", "pyyaml", "tqdm", "filelock", "portalocker", "tabulate", "pytest"} <= have
    need = gw.needed(have)
    assert set(need) == CARRIED
    assert need["hydra-core"] == gw.md.version("hydra-core") and need["antlr4-python3-runtime"] == "4.9.3"
    # with nothing on the machine the walk goes through every requirement (torch's too), not the dev tools
    everything = gw.needed(set())
    assert CARRIED | {"torch", "timm", "pyyaml", "portalocker", "tabulate", "joblib"} <= set(everything)
    assert "ruff" not in everything and "pytest" not in everything
