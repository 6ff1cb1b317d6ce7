"""The GPU check: one prepared, time-boxed command that turns a lent GPU into every number the project needs.

    bash scripts/gpu_check.sh            (= make gpu-check: installs the carried wheels, then `gpu_check.py check`)
    python scripts/gpu_wheels.py         (= make gpu-wheels, here: the wheels and the data the check carries)
    python scripts/gpu_check.py env FILE (stage 1 on its own: the environment as JSON)

`check` runs these stages in order of value, each in its own process, stopped by coreutils `timeout` (SIGTERM,
then SIGKILL) so that what it wrote is kept, and each admitted only when its estimated cost fits the time left:
env (devices, versions, TF32 settings), tests (`pytest -m cuda`), short_run (2 epochs of separate_downsampling on
the gpu profile), benchmark (every step beside timm at 224 px, batch 128, bf16 + channels_last, eager), compile
(torch.compile of the two endpoints and their timm twins), jpeg_run (the short run's model fed from a folder of
500 x 375 JPEGs decoded on the GPU, data.decode=device: its img/s against the short run's in-memory img/s, the
model's own pace), runs (the gpu profile's bars, one seed, headline pair
and big steps first, as many as fit; finished run folders from earlier sittings are reused, so the sweep resumes
across sittings). Then everything is packed into at most 8 files (docs/gpu.md says how to read them).

Settings, all from the environment (docs/gpu.md has the device call):
  GPU_CHECK_MINUTES   the budget of the whole check, packing included (default 8)
  GPU_CHECK_DEVICE    cuda (default) | cpu: the dry run, every stage at tiny sizes (tests/test_gpu_check.py)
  GPU_CHECK_STAGES    comma list of the stages to run, in that order (default all, in the order above)
  GPU_CHECK_BARS      comma list of the bars of the runs stage (default RUN_ORDER)
  GPU_CHECK_DATA      Fashion-MNIST's four idx .gz files (default .data/fashion-mnist, filled by make gpu-wheels)
  GPU_CHECK_RUNS      root of the runs stage's run folders (default runs: runs/gpu/fashion_mnist/<bar>/seed0)
  GPU_CHECK_WORK      scratch folder of this check (default runs/gpu_check/<UTC time>)
  GPU_CHECK_OUT       where the packed files go (default $OUT when set, else the work folder)
  GPU_CHECK_CODE      the code's commit for the report (default .whl/code.txt from make gpu-wheels, else git)

This file uses the standard library only: the driver must run, and report, whatever is broken in the packages.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("env", "tests", "short_run", "benchmark", "compile", "jpeg_run", "runs")
# The runs stage's order of value: the headline pair, then each of the paper's big steps (|change| >= 0.5 points,
# analysis.fidelity.BIG_STEP) together with the step before it, so that every two runs add a big-step sign, then
# the rest of conf/sweep/roadmap.yaml's 17 bars (tests/test_gpu_check.py keeps this list equal to both).
RUN_ORDER = [
    "baseline", "separate_downsampling",  # the headline: ConvNeXt minus ResNet
    "stage_ratio",  # vs baseline
    "depthwise_conv", "increase_width",  # width vs depthwise (+2.2, the biggest step)
    "patchify_stem",  # depthwise vs patchify (-1.2)
    "inverted_bottleneck", "move_up_dwconv",  # move up vs inverted (-0.7)
    "large_kernel",  # vs move up (+0.7)
    "gelu", "fewer_activations",  # fewer activations vs GELU (+0.7)
    "bn_to_ln",  # separate downsampling vs BN -> LN (+0.5)
    "fewer_norms", "baseline_classic", "large_kernel_k5", "large_kernel_k9", "large_kernel_k11",
]  # fmt: skip
# Paper GFLOPs at 224 px (ablations.TABLE10_GFLOPS, misprints corrected): the cost prior of a run before anything
# was measured in this sitting (tests/test_gpu_check.py keeps it equal to ablations.table10_gflops)
GFLOPS = {
    "baseline_classic": 4.09, "baseline": 4.09, "stage_ratio": 4.53, "patchify_stem": 4.42, "depthwise_conv": 2.35,
    "increase_width": 5.27, "inverted_bottleneck": 4.64, "move_up_dwconv": 4.07, "large_kernel_k5": 4.10,
    "large_kernel": 4.15, "large_kernel_k9": 4.21, "large_kernel_k11": 4.29, "gelu": 4.15, "fewer_activations": 4.15,
    "fewer_norms": 4.15, "bn_to_ln": 4.15, "separate_downsampling": 4.46,
}  # fmt: skip
STEP_OF = {"baseline_classic": "baseline", **{f"large_kernel_k{k}": "large_kernel" for k in (5, 9, 11)}}
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20  # what the device tool brings back from $OUT


@dataclasses.dataclass
class Plan:
    """The sizes of one device's check: the real one (cuda) or the dry run (cpu, tiny, seconds)."""

    device: str
    profile: str  # run_ablation.py profile of the short run and the runs
    run_overrides: list[str]  # more overrides on every training run
    short_epochs: int  # epochs of the short run
    run_epochs: int  # epochs of one run of the runs stage (the profile's)
    bench_flags: list[str]  # ablations.benchmark flags shared by the eager and compile stages
    bench_steps: str
    compile_steps: str
    compile_flags: list[str]
    estimate: dict  # stage -> seconds it is expected to take (guesses until a sitting measures them)
    jpeg: list[str]  # the jpeg_run's folder (ablations.loader_bench --make flags) and run overrides
    jpeg_overrides: list[str]
    run_prior_s: float  # one run of separate_downsampling before the short run calibrated anything
    reserve_s: float  # kept for packing (analysis, tar) out of the budget
    bars: list[str]


PLANS = {
    # One H100/H200. Estimates are docs/gpu.md's sizing, not measurements: the first sitting's report gives the real
    # times (each stage's wall_s), which should replace these.
    "cuda": Plan(
        device="cuda",
        profile="gpu",
        run_overrides=[],
        short_epochs=2,
        run_epochs=10,
        bench_flags="--batch-size 128 --img-size 224 --dtype bf16 --channels-last --tf32 on --repeats 3 "
        "--min-run-time 0.2".split(),
        bench_steps="all",
        compile_steps="baseline,separate_downsampling",
        compile_flags=["--compile"],
        estimate={"env": 15, "tests": 60, "short_run": 60, "benchmark": 150, "compile": 200, "jpeg_run": 90},
        jpeg=["--images", "4096"],
        jpeg_overrides=["train.batch_size=256", "train.epochs=2", "data.workers=8"],
        run_prior_s=130,
        reserve_s=45,
        bars=RUN_ORDER,
    ),
    # The dry run: the same stages, commands and files at toy sizes (smoke profile, batch 2 at 32 px, eager backend).
    "cpu": Plan(
        device="cpu",
        profile="smoke",
        run_overrides=["max_steps=2", "data.test_subset=64"],
        short_epochs=2,
        run_epochs=1,
        bench_flags="--batch-size 2 --img-size 32 --repeats 1 --iters 1".split(),
        bench_steps="baseline",
        compile_steps="baseline",
        compile_flags=["--compile", "--compile-backend", "eager", "--no-timm"],
        estimate={"env": 10, "tests": 20, "short_run": 25, "benchmark": 30, "compile": 30, "jpeg_run": 30},
        jpeg=["--images", "16"],
        jpeg_overrides=["train.batch_size=4", "train.epochs=1", "data.workers=1", "data.img_size=32"],
        run_prior_s=25,
        reserve_s=20,
        bars=["baseline"],
    ),
}


# ---------------------------------------------------------------------------------------------------- budget
class Budget:
    """The check's time: a stage is admitted only if its estimate fits what is left after the packing reserve."""

    def __init__(self, seconds: float, reserve: float, clock=time.monotonic):
        self.total, self.reserve, self.clock, self.t0 = seconds, reserve, clock, clock()

    def elapsed(self) -> float:
        """Seconds since the check started."""
        return self.clock() - self.t0

    def left(self) -> float:
        """Seconds left for stages (the packing reserve kept back)."""
        return self.total - self.reserve - self.elapsed()

    def refuse(self, estimate: float) -> str | None:
        """Why a stage of this estimated cost may not start now, or None when it may."""
        left = self.left()
        return None if estimate <= left else f"needs ~{estimate:.0f} s, {max(left, 0):.0f} s of the budget left"

    def timeout(self, estimate: float) -> float:
        """A started stage may run to the end of the budget, but no longer than 3x its estimate + 30 s (a hang)."""
        return max(1.0, min(self.left(), 3 * estimate + 30))


# ------------------------------------------------------------------------------------------------ processes
def run_stage(cmd: list[str], log, timeout: float, cwd: Path = ROOT, keep: int = 60) -> dict:
    """Run cmd under coreutils timeout (SIGTERM at `timeout` s, SIGKILL 15 s later), its output teed into log and
    stdout; returns rc, wall_s, cpu_s (of all its processes), timed_out and the last `keep` lines."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log.write(f"$ {' '.join(cmd)}   (timeout {timeout:.0f} s)\n")
    log.flush()
    t, cpu = time.monotonic(), _children_cpu()
    p = subprocess.Popen(["timeout", "-k", "15", f"{timeout:.1f}", *cmd], cwd=cwd, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, errors="replace")  # fmt: skip
    tail: list[str] = []
    for line in p.stdout:
        log.write(line)
        sys.stdout.write(line)
        tail = (tail + [line.rstrip("\n")])[-keep:]
    rc = p.wait()
    log.flush()
    sys.stdout.flush()
    wall, cpu = round(time.monotonic() - t, 1), round(_children_cpu() - cpu, 1)
    return {"rc": rc, "wall_s": wall, "cpu_s": cpu, "timed_out": rc in (124, 137), "tail": tail}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _status(res: dict) -> str:
    return "timed out" if res["timed_out"] else "ok" if res["rc"] == 0 else f"failed (rc {res['rc']})"


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    except (OSError, ValueError):
        return []


def _csv_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if v == v else None  # NaN -> None


# ---------------------------------------------------------------------------------------------------- stages
class Check:
    """One sitting: the plan, the budget, the folders, the log and a record per stage."""

    def __init__(self, plan: Plan, budget: Budget, work: Path, runs: Path, data: Path, log):
        self.plan, self.budget, self.work, self.runs, self.data, self.log = plan, budget, work, runs, data, log
        self.py = sys.executable
        self.records: list[dict] = []
        self.env: dict = {}
        self.abort: str | None = None  # set when no later stage can mean anything (e.g. no CUDA)
        self.output: list[str] = []  # the last lines the latest stage printed

    def stage(self, name: str, estimate: float, cmd: list[str]) -> dict | None:
        """Admit, run and record one stage; None (recorded as skipped) when it does not fit or must not run."""
        rec = {"stage": name, "estimate_s": round(estimate, 1), "started_s": round(self.budget.elapsed(), 1)}
        reason = self.abort or self.budget.refuse(estimate)
        if reason:
            self.records.append({**rec, "status": "skipped", "reason": reason})
            self._say(f"{name}: skipped ({reason})")
            return None
        self._say(f"{name}: start (estimate {estimate:.0f} s, {self.budget.left():.0f} s left)")
        res = run_stage(cmd, self.log, self.budget.timeout(estimate))
        self.output = res["tail"]
        rec.update(status=_status(res), wall_s=res["wall_s"], cpu_s=res["cpu_s"], rc=res["rc"])
        if res["rc"] != 0:
            rec["tail"] = res["tail"][-15:]
        self.records.append(rec)
        self._say(f"{name}: {rec['status']} in {res['wall_s']:.0f} s")
        return rec

    def _say(self, msg: str) -> None:
        line = f"[gpu_check {self.budget.elapsed():6.0f} s] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def train_cmd(self, run_dir: Path, *overrides: str) -> list[str]:
        """run_ablation.py on this plan's device and profile, seed 0, the carried data, into run_dir."""
        return [self.py, "run_ablation.py", *overrides, f"profile={self.plan.profile}", "seed=0",
                f"device={self.plan.device}", f"data.root={self.data}", "progress=false",
                *self.plan.run_overrides, f"hydra.run.dir={run_dir}"]  # fmt: skip

    # -------------------------------------------------------------------------------------- the stages
    def do_env(self) -> None:
        """Stage 1: devices, versions and TF32 settings (a subprocess: a broken import must not stop the check)."""
        path = self.work / "env.json"
        rec = self.stage("env", self.plan.estimate["env"], [self.py, str(Path(__file__)), "env", str(path)])
        self.env = _json(path) or {}
        if rec is not None:
            rec["env"] = self.env
            if self.plan.device == "cuda" and not self.env.get("cuda_available"):
                self.abort = "no CUDA device (stage env): nothing on the GPU can run"

    def do_tests(self) -> None:
        """Stage 2a: the suite's CUDA-only tests (`pytest -m cuda` over the files that have any: no time spent
        collecting the rest)."""
        files = [_rel(f) for f in sorted((ROOT / "tests").glob("test_*.py")) if "pytest.mark.cuda" in f.read_text()]
        cmd = [self.py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files]
        rec = self.stage("tests", self.plan.estimate["tests"], cmd)
        if rec is not None:
            rec["summary"] = _pytest_summary(self.output)

    def do_short_run(self) -> None:
        """Stage 2b: 2 epochs of ConvNeXt (separate_downsampling) on the plan's profile: wall, img/s, top-1."""
        run_dir = self.work / "short_run"
        cmd = self.train_cmd(run_dir, "step=separate_downsampling", f"train.epochs={self.plan.short_epochs}")
        rec = self.stage("short_run", self.plan.estimate["short_run"], cmd)
        if rec is not None:
            rec.update(_run_numbers(run_dir))

    def do_jpeg_run(self) -> None:
        """Stage 3b: the GPU-decode feed (issue 24): separate_downsampling on the plan's profile from a folder of
        500 x 375 JPEGs made here, data.decode=device; img/s beside the short run's (in-memory: the model's pace)."""
        folder, run_dir = self.work / "jpegs", self.work / "jpeg_run"
        make = [self.py, "-m", "ablations.loader_bench", "--make", str(folder), *self.plan.jpeg]
        train = [self.py, "run_ablation.py", "step=separate_downsampling", f"profile={self.plan.profile}", "seed=0",
                 f"device={self.plan.device}", "data=imagefolder", f"data.root={folder}", "data.decode=device",
                 "progress=false", *self.plan.run_overrides,
                 *self.plan.jpeg_overrides, f"hydra.run.dir={run_dir}"]  # fmt: skip
        cmd = ["sh", "-c", " ".join(map(shlex.quote, make)) + " && " + " ".join(map(shlex.quote, train))]
        rec = self.stage("jpeg_run", self.plan.estimate["jpeg_run"], cmd)
        if rec is not None:
            rec.update(_run_numbers(run_dir))
            short = next((r for r in self.records if r["stage"] == "short_run" and r.get("img_per_s")), None)
            if short and rec["img_per_s"]:
                rec["vs_in_memory"] = round(max(rec["img_per_s"]) / max(short["img_per_s"]), 3)

    def do_benchmark(self, name: str, steps: str, extra: list[str]) -> None:
        """Stage 3: ablations.benchmark (eager every step, or compiled endpoints), CSV and Markdown kept."""
        cmd = [self.py, "-m", "ablations.benchmark", "--steps", steps, "--device", self.plan.device,
               *self.plan.bench_flags, *extra, "--no-progress", "--csv", str(self.work / f"bench_{name}.csv"),
               "--markdown", str(self.work / f"bench_{name}.md")]  # fmt: skip
        rec = self.stage(name, self.plan.estimate[name], cmd)
        if rec is not None:
            rows = _csv_rows(self.work / f"bench_{name}.csv")
            keys = ("model", "mode", "train_img_s", "infer_img_s", "train_ratio", "infer_ratio", "train_mem_mib")
            rec["rows"] = [{k: r.get(k) for k in (*keys, "compiled")} for r in rows]

    def run_dir(self, bar: str) -> Path:
        """The runs stage's folder of a bar: what run_ablation.py names it by default (runs/<profile>/<data>/...)."""
        return self.runs / self.plan.profile / "fashion_mnist" / bar / "seed0"

    def do_runs(self, bars: list[str]) -> None:
        """Stage 4: one seed of each bar that fits, in order of value; finished folders are reused, not rerun."""
        for bar in bars:
            run_dir = self.run_dir(bar)
            done = _json(run_dir / "summary.json") or {}
            if done.get("status") == "finished":
                self.records.append({"stage": f"run {bar}", "status": "reused", "estimate_s": 0,
                                     "reason": "finished in an earlier sitting", **_run_numbers(run_dir)})  # fmt: skip
                continue
            rec = self.stage(f"run {bar}", self.run_estimate(bar), self.train_cmd(run_dir, f"bar={bar}"))
            if rec is not None:
                rec.update(_run_numbers(run_dir))

    # ------------------------------------------------------------------------------------- estimates
    def run_estimate(self, bar: str) -> float:
        """Seconds one run of `bar` should take: the short run's overhead and epoch time scaled to the run's
        epochs and to the bar's speed (the benchmark's train img/s against separate_downsampling's, else FLOPs)."""
        short = next((r for r in self.records if r["stage"] == "short_run" and r.get("epoch_s")), None)
        slow = self.slowdown(bar)
        if short is None:
            return self.plan.run_prior_s * slow
        epoch = sum(short["epoch_s"]) / len(short["epoch_s"])
        overhead = max(short["wall_s"] - sum(short["epoch_s"]), 0)  # start-up, FLOP counting, evaluation
        # 10 % for the evaluation after each epoch, which epoch_s leaves out
        return overhead + self.plan.run_epochs * epoch * slow * 1.1

    def slowdown(self, bar: str) -> float:
        """How much slower than separate_downsampling one training step of `bar` is."""
        step = STEP_OF.get(bar, bar)
        ips = {}
        for r in self.records:
            if r["stage"] == "benchmark" and r.get("rows"):
                ips = {x["model"]: _num(x["train_img_s"]) for x in r["rows"]}
        if ips.get(step) and ips.get("separate_downsampling"):
            return ips["separate_downsampling"] / ips[step]
        return GFLOPS.get(bar, GFLOPS["separate_downsampling"]) / GFLOPS["separate_downsampling"]

    def sweep_projection(self, bars: list[str]) -> dict:
        """What the rest of the sweep costs at this sitting's calibration: one seed of every bar not finished."""
        left = [b for b in bars if (_json(self.run_dir(b) / "summary.json") or {}).get("status") != "finished"]
        each = {b: round(self.run_estimate(b)) for b in bars}
        return {"bars_left": left, "seconds_per_run": each, "left_one_seed_s": sum(each[b] for b in left),
                "all_17_one_seed_s": sum(each.values())}  # fmt: skip


def _pytest_summary(output: list[str]) -> dict:
    """The counts of pytest's last summary line ('4 passed, 1 skipped, 396 deselected in 6.7s')."""
    pattern = r"\b(passed|failed|skipped|errors?|deselected)\b.* in [\d.]+s"
    lines = [ln for ln in output if re.search(pattern, ln)]
    if not lines:
        return {}
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed)", lines[-1])}


def _run_numbers(run_dir: Path) -> dict:
    """A run folder's headline numbers: status, top-1, per-epoch seconds and img/s, wall (summary.json's)."""
    s = _json(run_dir / "summary.json") or {}
    m = _jsonl(run_dir / "metrics.jsonl")
    return {
        "run_dir": str(run_dir),
        "run_status": s.get("status", "no summary"),
        "top1": s.get("top1"),
        "epochs_done": len(m),
        "epoch_s": [e["epoch_s"] for e in m],
        "img_per_s": [e["img_per_s"] for e in m],
        "train_wall_s": s.get("wall_s"),
        "error": s.get("error"),
    }


# ------------------------------------------------------------------------------------------ stage 1: env
def environment() -> dict:
    """Devices, versions, TF32 / matmul-precision settings and where the carried packages were imported from."""
    import importlib
    import importlib.metadata
    import platform

    env: dict = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}
    for dist in ("torchvision", "timm", "numpy", "pandas", "tensorboard"):  # the image's own: versions only
        try:
            env[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env[dist] = "NOT INSTALLED"
    env["imported_from"] = {}
    for mod in ("torch", "hydra", "omegaconf", "fvcore", "iopath", "submitit"):  # the carried ones: really imported
        try:
            m = importlib.import_module(mod)
            env[mod] = getattr(m, "__version__", "?")
            env["imported_from"][mod] = str(Path(m.__file__).parent.parent)  # GPU_CHECK_SITE for the carried
        except Exception as e:  # a missing or broken package is a finding, not a crash
            env[mod] = f"NOT IMPORTABLE: {type(e).__name__}: {e}"
    import torch

    b = torch.backends
    env.update(
        torch_cuda=torch.version.cuda,
        cudnn=b.cudnn.version() if b.cudnn.is_available() else None,
        cuda_available=torch.cuda.is_available(),
        allow_tf32_matmul=b.cuda.matmul.allow_tf32,
        allow_tf32_cudnn=b.cudnn.allow_tf32,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        cudnn_benchmark_default=b.cudnn.benchmark,
    )
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(
            device=torch.cuda.get_device_name(0),
            device_count=torch.cuda.device_count(),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            memory_gib=round(p.total_memory / 2**30, 1),
            multiprocessors=p.multi_processor_count,
            bf16_supported=torch.cuda.is_bf16_supported(),
            bf16_matmul_tflops=_matmul_tflops(torch),
        )
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
            env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def _matmul_tflops(torch) -> float:
    """bf16 8192^3 matrix products per second, in TFLOP/s: the chip's ceiling as this sitting finds it."""
    from torch.utils.benchmark import Timer

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    m = Timer("a @ a", globals={"a": a}).blocked_autorange(min_run_time=0.5)
    return round(2 * 8192**3 / m.median / 1e12, 1)


# ------------------------------------------------------------------------------------------------ the check
def _settings() -> dict:
    """The GPU_CHECK_* settings in force, validated (a bad value is one clear line, exit 2)."""
    e = os.environ
    device = e.get("GPU_CHECK_DEVICE", "cuda")
    if device not in PLANS:
        raise SystemExit(f"gpu_check: GPU_CHECK_DEVICE={device!r}: valid choices are {', '.join(PLANS)}")
    plan = PLANS[device]
    stages = list(dict.fromkeys(s for s in e.get("GPU_CHECK_STAGES", ",".join(STAGES)).split(",") if s))
    bars = [b for b in e.get("GPU_CHECK_BARS", ",".join(plan.bars)).split(",") if b]
    for what, got, valid in (("GPU_CHECK_STAGES", stages, STAGES), ("GPU_CHECK_BARS", bars, RUN_ORDER)):
        if bad := [x for x in got if x not in valid]:
            raise SystemExit(f"gpu_check: {what}: unknown {', '.join(bad)}; valid choices are {', '.join(valid)}")
    try:
        minutes = float(e.get("GPU_CHECK_MINUTES", "8"))
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise SystemExit(f"gpu_check: GPU_CHECK_MINUTES={e.get('GPU_CHECK_MINUTES')!r} must be a positive number")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
    work = Path(e.get("GPU_CHECK_WORK") or ROOT / "runs" / "gpu_check" / stamp)
    data = Path(e.get("GPU_CHECK_DATA") or ROOT / ".data" / "fashion-mnist")
    out = Path(e.get("GPU_CHECK_OUT") or e.get("OUT") or work)
    return {"plan": plan, "stages": stages, "bars": bars, "minutes": minutes, "work": work, "data": data,
            "runs": Path(e.get("GPU_CHECK_RUNS") or ROOT / "runs"), "out": out, "code": _code()}  # fmt: skip


def _code() -> str:
    """The commit of the code under test: GPU_CHECK_CODE, else what make gpu-wheels wrote, else git, else unknown."""
    if os.environ.get("GPU_CHECK_CODE"):
        return os.environ["GPU_CHECK_CODE"]
    stamp = ROOT / ".whl" / "code.txt"
    if stamp.is_file():
        return stamp.read_text().strip() + " (as of make gpu-wheels)"
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha.stdout.strip() or "unknown"


def _rel(p: Path) -> str:
    """p relative to the repository when inside it: run folders' config.yaml then match across machines."""
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def check() -> int:
    """Run the stages that fit the budget, then pack the results; 1 when an admitted stage failed or timed out."""
    s = _settings()
    if shutil.which("timeout") is None:  # coreutils: every stage runs under it
        raise SystemExit("gpu_check: coreutils `timeout` is not on PATH; every stage needs it")
    plan, work = s["plan"], s["work"]
    work.mkdir(parents=True, exist_ok=True)
    data = s["data"]
    if not data.is_dir() and plan.device == "cuda":
        print(f"gpu_check: warning: no data folder {data} (make gpu-wheels fills it; carry .data)", flush=True)
    budget = Budget(s["minutes"] * 60, plan.reserve_s)
    with open(work / "gpu_check.log", "w") as log:
        c = Check(plan, budget, work, s["runs"], Path(_rel(data)), log)
        c.runs = Path(_rel(s["runs"]))
        c._say(f"plan {plan.device}; budget {s['minutes']:g} min ({plan.reserve_s:.0f} s kept for packing); "
               f"stages {','.join(s['stages'])}; work {work}; out {s['out']}; code {s['code']}")  # fmt: skip
        steps = {
            "env": c.do_env,
            "tests": c.do_tests,
            "short_run": c.do_short_run,
            "benchmark": lambda: c.do_benchmark("benchmark", plan.bench_steps, []),
            "compile": lambda: c.do_benchmark("compile", plan.compile_steps, plan.compile_flags),
            "jpeg_run": c.do_jpeg_run,
            "runs": lambda: c.do_runs(s["bars"]),
        }
        for name in s["stages"]:  # in the order given (runs before compile, say)
            steps[name]()
        for name in (n for n in STAGES if n not in s["stages"]):
            c.records.append({"stage": name, "status": "skipped", "reason": "not in GPU_CHECK_STAGES"})
        files = pack(c, s)
    bad = [r for r in c.records if r["status"].startswith(("failed", "timed out"))]
    print(f"gpu_check: {len(files)} files in {s['out']}: {', '.join(files)}", flush=True)
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------------- packing
def pack(c: Check, s: dict) -> list[str]:
    """Analysis of the run folders, then at most 8 files into the out folder: report.md, gpu_check.json,
    gpu_check.log, benchmark.csv, results.csv, runs.tar.gz (run folders, no checkpoints), work.tar.gz."""
    out, work = s["out"], c.work
    out.mkdir(parents=True, exist_ok=True)
    sweep = c.runs / c.plan.profile / "fashion_mnist"
    run_dirs = [p.parent for p in sorted((ROOT / sweep).glob("*/seed*/config.yaml"))]
    if run_dirs:
        left = max(c.budget.total - c.budget.elapsed() - 10, 10)  # the reserve is for this
        res = run_stage([c.py, "-m", "analysis", str(sweep), "--out", str(work / "analysis")], c.log, left)
        c.records.append({"stage": "analysis", "status": _status(res), "wall_s": res["wall_s"], "cpu_s": res["cpu_s"],
                          "rc": res["rc"]})  # fmt: skip
    files: dict[str, Path] = {}
    bench = [r for name in ("benchmark", "compile") for r in _csv_rows(work / f"bench_{name}.csv")]
    if bench:
        files["benchmark.csv"] = _write_csv(out / "benchmark.csv", bench)
    if (work / "analysis" / "results.csv").is_file():
        files["results.csv"] = Path(shutil.copyfile(work / "analysis" / "results.csv", out / "results.csv"))
    if run_dirs:  # named as under the repository, so `tar -xzf runs.tar.gz` there restores them for the next sitting
        trees = [(p, Path("runs") / p.relative_to(ROOT / c.runs)) for p in run_dirs]
        files["runs.tar.gz"] = _tar(out / "runs.tar.gz", trees)
    packed = {out / n for n in ("report.md", "gpu_check.json", "gpu_check.log", *files)}
    skip = packed | {work / "gpu_check.log", work / "jpegs"}  # the jpeg_run's images: made there, 200 MB
    files["work.tar.gz"] = _tar(out / "work.tar.gz", [(work, Path(work.name))], skip=skip)
    c._say("packed; writing the report")
    settings = {**{k: str(v) for k, v in s.items()}, "plan": c.plan.device, "minutes": s["minutes"],
                "stages": ",".join(s["stages"]), "bars": ",".join(s["bars"])}  # fmt: skip
    report = {"settings": settings, "env": c.env, "stages": c.records,
              "sweep": c.sweep_projection(RUN_ORDER), "elapsed_s": round(c.budget.elapsed(), 1)}  # fmt: skip
    files["gpu_check.json"] = out / "gpu_check.json"
    files["report.md"] = out / "report.md"
    files["gpu_check.log"] = out / "gpu_check.log"
    report["files"] = sorted(files)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "report.md").write_text(markdown_report(report, work))
    c.log.flush()
    if out / "gpu_check.log" != work / "gpu_check.log":
        _copy_tail(work / "gpu_check.log", out / "gpu_check.log", MAX_FILE_BYTES - 2**20)
    assert len(files) <= MAX_FILES, sorted(files)
    return sorted(files)


def _write_csv(path: Path, rows: list[dict]) -> Path:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    return path


def _tar(path: Path, trees: list[tuple[Path, Path]], skip: set[Path] = frozenset()) -> Path:
    """A .tar.gz of folders (source, name inside), without checkpoints (*.pt: too big to bring back, and a
    finished run is reused from its summary alone) and without the files and folders in `skip`."""
    skip = {p.resolve() for p in skip}
    with tarfile.open(path, "w:gz") as tar:
        for src, name in trees:
            for f in sorted(src.rglob("*")):
                skipped = f.resolve() in skip or any(d in skip for d in f.resolve().parents)  # a file or its folder
                if f.is_file() and f.suffix != ".pt" and not skipped and f.resolve() != path.resolve():
                    tar.add(f, arcname=str(name / f.relative_to(src)))
    return path


def _copy_tail(src: Path, dst: Path, limit: int) -> None:
    """Copy src, keeping only its last `limit` bytes when it is longer (the device tool's per-file limit)."""
    data = src.read_bytes()
    dst.write_bytes(data if len(data) <= limit else b"[... head cut to fit 16 MiB ...]\n" + data[-limit:])


# ----------------------------------------------------------------------------------------------------- report
def markdown_report(rep: dict, work: Path) -> str:
    """report.md: what ran, what it measured, what was skipped and why, and what the sweep still needs."""
    env, st, stages = rep["env"], rep["settings"], rep["stages"]
    by = {r["stage"]: r for r in stages}
    lines = [
        f"# GPU check, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- device: {env.get('device', '?')}"
        + (
            f" (capability {env['capability']}, {env['memory_gib']} GiB, {env['multiprocessors']} SMs, "
            f"{env['device_count']} visible); bf16 8192^3 matmul {env['bf16_matmul_tflops']} TFLOP/s; nvidia-smi: "
            f"{env.get('nvidia_smi', '-')}"
            if "capability" in env
            else ""
        ),
        f"- torch {env.get('torch', '?')}, CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}; timm "
        f"{env.get('timm', '?')}; torchvision {env.get('torchvision', '?')}; python {env.get('python', '?')}",
        f"- carried packages: hydra {env.get('hydra', '?')}, omegaconf {env.get('omegaconf', '?')}, fvcore "
        f"{env.get('fvcore', '?')}, submitit {env.get('submitit', '?')}, imported from "
        f"{env.get('imported_from', {}).get('hydra', '?')}",
        f"- TF32 as a process starts (PyTorch's defaults): matmul {env.get('allow_tf32_matmul')}, cuDNN "
        f"{env.get('allow_tf32_cudnn')}, float32 matmul precision {env.get('float32_matmul_precision')!r}; the "
        "benchmark sets TF32 on for matmuls and convs alike, for every model",
        f"- code {st['code']}; plan {st['plan']}; budget {st['minutes']:g} min (GPU_CHECK_MINUTES), "
        f"{rep['elapsed_s']:.0f} s used; stages {st['stages']}; bars {st['bars']}",
        "",
        "## Stages",
        "",
        "| stage | status | wall s | cpu s | estimate s | note |",
        "|:--|:--|--:|--:|--:|:--|",
    ]
    for r in stages:
        note = r.get("reason") or _note(r)
        cells = [r["stage"], r["status"], *(str(r.get(k, "")) for k in ("wall_s", "cpu_s", "estimate_s")), note]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Benchmark", ""]
    for name in ("benchmark", "compile"):
        md = work / f"bench_{name}.md"
        if md.is_file():
            lines += [f"### {name} ({'torch.compile' if name == 'compile' else 'eager'})", ""]
            for ln in md.read_text().splitlines()[1:]:  # without its '# Throughput benchmark' title
                if ln or lines[-1]:  # one blank line at most
                    lines.append("#### " + ln[3:] if ln.startswith("## ") else ln)
            lines.append("")
        elif name in by:
            lines += [f"{name}: {by[name]['status']} {by[name].get('reason', '')}", ""]
    lines += _runs_section(stages, rep["sweep"])
    lines += ["## Files", "", *[f"- {f}" for f in rep["files"]], ""]
    return "\n".join(lines)


def _note(r: dict) -> str:
    """One cell of a stage's headline numbers (or its error's last line)."""
    if r.get("summary"):
        return ", ".join(f"{n} {k}" for k, n in r["summary"].items())
    if "epochs_done" in r:
        ips = max(r["img_per_s"]) if r["img_per_s"] else None
        top1 = f"top-1 {r['top1']:.2f} %" if isinstance(r.get("top1"), (int, float)) else f"{r['run_status']}"
        vs = f"; {r['vs_in_memory']:.2f}x the in-memory short run's img/s" if r.get("vs_in_memory") else ""
        return (f"{top1}; {r['epochs_done']} epochs; {ips or '-'} img/s (best epoch); {r['train_wall_s'] or '-'} s "
                f"train{vs}")  # fmt: skip
    if r.get("rows"):  # the endpoints: train / infer img/s, and the ratio to their timm twin where it was measured
        ends = [x for x in r["rows"] if x["model"] in ("baseline", "separate_downsampling")] or r["rows"][:2]
        return "; ".join(_bench_note(x) for x in ends) + f" (train / infer; {len(r['rows'])} models)"
    if r.get("env"):
        return str(r["env"].get("device", ""))
    return (r.get("tail") or [""])[-1][:200].replace("|", "/")


def _bench_note(x: dict) -> str:
    ips = f"{x['model']} {_num(x['train_img_s']) or 0:.0f} / {_num(x['infer_img_s']) or 0:.0f} img/s"
    ratio = [_num(x.get("train_ratio")), _num(x.get("infer_ratio"))]
    mem = _num(x.get("train_mem_mib"))
    return (
        ips
        + (f", {ratio[0]:.2f}x / {ratio[1]:.2f}x timm" if None not in ratio else "")
        + (f", {mem:.0f} MiB" if mem else "")
    )


def _runs_section(stages: list[dict], sweep: dict) -> list[str]:
    runs = [r for r in stages if r["stage"].startswith("run ")]
    lines = ["## Runs (one seed; the sweep resumes from these folders next sitting)", ""]
    if runs:
        lines += [
            "| bar | status | top-1 | epochs | best img/s | wall s | estimate s |",
            "|:--|:--|--:|--:|--:|--:|--:|",
        ]
        for r in runs:
            top1 = f"{r['top1']:.2f}" if isinstance(r.get("top1"), (int, float)) else ""
            ips = max(r["img_per_s"]) if r.get("img_per_s") else ""
            lines.append(f"| {r['stage'][4:]} | {r['status']} | {top1} | {r.get('epochs_done', '')} | {ips} | "
                         f"{r.get('wall_s', '')} | {r.get('estimate_s', '')} |")  # fmt: skip
    left = sweep["bars_left"]
    lines += [
        "",
        f"Sweep (17 bars, one seed) at this sitting's calibration: ~{sweep['all_17_one_seed_s'] / 60:.0f} "
        f"min in all; {17 - len(left)} bars finished, {len(left)} left (~{sweep['left_one_seed_s'] / 60:.0f} "
        f"min): {', '.join(left) or 'none'}. Three seeds: ~{3 * sweep['all_17_one_seed_s'] / 60:.0f} min.",
        "",
    ]
    return lines


# ----------------------------------------------------------------------------------------------------- main
def main(argv: list[str]) -> int:
    """gpu_check.py [check] | env FILE."""
    if argv[:1] == ["env"] and len(argv) == 2:
        env = environment()
        Path(argv[1]).write_text(json.dumps(env, indent=1, default=str) + "\n")
        print("\n".join(f"{k}: {v}" for k, v in env.items()))
        return 0
    if argv in ([], ["check"]):
        return check()
    print("usage: gpu_check.py [check] | env FILE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
