"""Training and inference throughput (images/s) of roadmap steps beside timm's reference models.

python -m ablations.benchmark [--steps baseline,separate_downsampling] [--regime r50] [--device auto|cpu|cuda]
    [--batch-size N] [--img-size 224] [--modes fp32,bf16] [--channels-last] [--compile] [--tf32 off|on] [--flops]
    [--clock wall|process] [--min-run-time S | --iters N] [--warmup N] [--repeats R]
    [--csv PATH] [--markdown docs/benchmark.md]

The timing is torch.utils.benchmark's: each visit of a model times its training step and its inference step with
`Timer.blocked_autorange` (or `Timer.timeit(--iters)`), which warms up, synchronises CUDA around the timed blocks,
fixes the thread count and keeps every block's time; a visit's figure is batch / the median step time. What this
module adds is what Timer does not do: every model is built once per dtype mode and visited in turn, interleaved,
over `--repeats` (so slow drift of the machine - clocks, other jobs - hits all models alike) and the median over
repeats is reported; the ours/timm table; the compile isolation; and on CUDA the peak memory of each model's train
and infer step (torch.cuda.max_memory_allocated after a reset, the other models' resident tensors subtracted). The
targets: baseline >= 0.95x timm resnet50 and separate_downsampling >= 0.95x timm convnext_tiny on CPU, >= 1.0x on GPU.

Settings that must be the same for every model are set explicitly for the whole measurement: TF32 for both matmuls
and cuDNN convs (PyTorch's defaults differ: TF32 on for convs, off for matmuls, which would run our 1x1 convs in
TF32 and timm's nn.Linear MLP in full fp32), and cudnn.benchmark on CUDA. With --compile every model is compiled in
its own Dynamo cache (or under a raised recompile limit), so the many models of one process never hit Dynamo's
recompile limit, which silently falls back to eager; the `compiled` column says whether each model really ran
compiled code in every call.

On a shared CPU machine (other jobs running) wall time measures the neighbours as much as the model:
`--clock process` times with this process's CPU time instead (all its threads together; Timer's `timer=`), so the
figures are images per CPU-second and the ours/timm ratios stay meaningful under load; run it with OMP_NUM_THREADS=1
for the least interference. CPU only (on CUDA the host's CPU time says nothing about the GPU's).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import inspect
import math
import os
import platform
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from models import STEPS, build_model

# regime -> (timm reference, the roadmap step with exactly its architecture)
TIMM_REFS = {
    "r50": (("resnet50", "baseline"), ("convnext_tiny", "separate_downsampling")),
    "r200": (("resnet200", "baseline"), ("convnext_base", "separate_downsampling")),
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
# Timer's own default clock is the wall clock with a CUDA synchronisation before each reading (None: keep it);
# process: CPU seconds of this process
CLOCKS: dict[str, Callable[[], float] | None] = {"wall": None, "process": time.process_time}
TARGET = {"cpu": 0.95, "cuda": 1.0}  # ours / timm throughput we aim for
CSV_COLUMNS = [
    "model",
    "kind",
    "step",
    "mode",
    "dtype",
    "channels_last",
    "compile",
    "compiled",
    "graphs",
    "tf32",
    "batch",
    "img_size",
    "train_img_s",
    "infer_img_s",
    "train_img_s_all",
    "infer_img_s_all",
    "train_mem_mib",
    "infer_mem_mib",
    "params",
    "ref",
    "train_ratio",
    "infer_ratio",
    "device",
    "torch",
]
# seconds of timed steps per phase and visit (blocked_autorange's min_run_time): a CPU training step of ResNet-50
# at batch 16 and 160 px takes about 1.5 CPU-seconds, so 3 s times 2-6 steps per phase there
DEFAULTS = {"cuda": {"batch_size": 128, "min_run_time": 0.5}, "cpu": {"batch_size": 32, "min_run_time": 3.0}}
MIB = 2**20


def model_factories(
    steps: Iterable[str], regime: str = "r50", num_classes: int = 1000, timm_refs: bool = True
) -> dict[str, Callable[[], nn.Module]]:
    """Name -> zero-argument builder for the roadmap steps and (optionally) the regime's timm references.

    Each timm reference follows right after its paired step (or comes last when that step is not chosen), so
    the two models of a ratio are measured back to back.
    """
    import timm

    out: dict[str, Callable[[], nn.Module]] = {}
    refs = dict((step, name) for name, step in TIMM_REFS[regime]) if timm_refs else {}
    for step in steps:
        out[step] = lambda s=step: build_model(s, regime, num_classes=num_classes)
        if step in refs:
            name = refs.pop(step)
            out[name] = lambda n=name: timm.create_model(n, num_classes=num_classes)
    for name in refs.values():
        out[name] = lambda n=name: timm.create_model(n, num_classes=num_classes)
    return out


def mode_name(dtype: str, channels_last: bool, compile: bool) -> str:
    """Short label of a measurement mode, e.g. 'bf16+cl+compile'."""
    return dtype + ("+cl" if channels_last else "") + ("+compile" if compile else "")


def images_per_s(
    step: Callable[[], object],
    batch_size: int,
    clock: Callable[[], float] | None = None,
    iters: int | None = None,
    min_run_time: float = 0.2,
) -> float:
    """batch_size / the median time of `step` by torch.utils.benchmark: timeit(iters) when given (a fixed count
    after its own 2 warm-up calls), else blocked_autorange(min_run_time) (warm-up, then blocks until that many
    seconds are timed). `clock` None is Timer's wall clock that synchronises CUDA; the current thread count is kept."""
    kw = {} if clock is None else {"timer": clock}
    timer = _timer_class()("step()", globals={"step": step}, num_threads=torch.get_num_threads(), **kw)
    m = timer.timeit(iters) if iters else timer.blocked_autorange(min_run_time=min_run_time)
    return batch_size / m.median


def _timer_class():
    # torch.utils.benchmark imports torch.utils.cpp_extension, which warns "No CUDA runtime is found" on every
    # CPU-only machine: a false alarm here (the Timer compiles nothing), so that one logger is quiet for the import.
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils.benchmark import Timer
    finally:
        log.setLevel(level)
    return Timer


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class _Runner:
    """One model on the device with its optimizer and input batch; times its training and inference steps."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        batch_size: int,
        img_size: int,
        num_classes: int,
        dtype: str,
        channels_last: bool,
        compile: bool,
        compile_backend: str = "inductor",
        clock: Callable[[], float] | None = None,
    ):
        self.device, self.batch_size, self.img_size, self.num_classes = device, batch_size, img_size, num_classes
        self.clock = clock
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.params = sum(p.numel() for p in model.parameters())
        self.in_chans = _in_chans(model)
        self.module = model = model.to(device=device, memory_format=self.memory_format)
        # The optimizer holds the plain module's parameters; the compiled wrapper shares them.
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.model = _compile(model, compile_backend) if compile else model
        self.compile = compile
        self.graphs = [0]  # graphs Dynamo compiled for this model, per visit
        # Hooks that count forward calls that ran eagerly: inside a compiled graph they are traced with
        # is_compiling() True and do nothing, so any count means Dynamo fell back to eager (e.g. a recompile limit).
        self.eager_calls = 0
        self._hooks = [c.register_forward_hook(self._eager_hook) for c in model.children()] if compile else []
        self.criterion = nn.CrossEntropyLoss()
        cast = DTYPES[dtype]
        self.autocast = (lambda: torch.autocast(device.type, dtype=cast)) if cast else contextlib.nullcontext
        # Compiled graphs and inference_mode tensors have not always mixed well; no_grad is safe for both.
        self.no_grad = torch.no_grad if compile else torch.inference_mode
        self.peak = {"train": math.nan, "infer": math.nan}  # bytes, CUDA only: the largest over visits

    def _eager_hook(self, module, inputs, output):
        if not torch.compiler.is_compiling():
            self.eager_calls += 1

    @property
    def compiled(self) -> bool:
        """Compiled graphs were built on the first visit only, and no forward call ever ran eagerly."""
        return self.compile and self.graphs[0] > 0 and not any(self.graphs[1:]) and self.eager_calls == 0

    def visit(self, warmup: int, iters: int | None, min_run_time: float) -> tuple[float, float]:
        """(train, infer) images/s of one visit; counts the graphs Dynamo compiles during it."""
        before = _graph_count()
        out = tuple(self.measure(phase, warmup, iters, min_run_time) for phase in ("train", "infer"))
        if self.compile:
            self.graphs[-1] = _graph_count() - before
            self.graphs.append(0)
        return out

    def _batch(self):
        x = torch.randn(self.batch_size, self.in_chans, self.img_size, self.img_size, device=self.device)
        y = torch.randint(0, self.num_classes, (self.batch_size,), device=self.device)
        return x.contiguous(memory_format=self.memory_format), y

    def _step(self, phase: str) -> Callable[[], None]:
        """'train': forward + backward + AdamW step; 'infer': the eval-mode forward pass without autograd."""
        x, y = self._batch()
        if phase == "infer":
            self.model.eval()

            def infer():
                with self.no_grad(), self.autocast():
                    self.model(x)

            return infer
        self.model.train()

        def train():
            with self.autocast():
                loss = self.criterion(self.model(x), y)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        return train

    def _own_bytes(self) -> int:
        """Bytes of this model's resident tensors: parameters, buffers, gradients, optimizer state."""
        m = self.module
        state = [t for s in self.optimizer.state.values() for t in s.values()]
        return _nbytes([*m.parameters(), *m.buffers(), *(p.grad for p in m.parameters()), *state])

    def measure(self, phase: str, warmup: int, iters: int | None, min_run_time: float) -> float:
        """Images/s of one phase after `warmup` untimed steps; on CUDA also its peak memory (see self.peak)."""
        cuda = self.device.type == "cuda"
        if cuda:  # the other models' weights and optimizer state stay resident: they are not this model's peak
            others = torch.cuda.memory_allocated(self.device) - self._own_bytes()
            torch.cuda.reset_peak_memory_stats(self.device)
        step = self._step(phase)
        for _ in range(warmup):
            step()
        ips = images_per_s(step, self.batch_size, self.clock, iters, min_run_time)
        if cuda:
            peak = torch.cuda.max_memory_allocated(self.device) - others
            self.peak[phase] = peak if math.isnan(self.peak[phase]) else max(self.peak[phase], peak)
        return ips


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _compile(model: nn.Module, backend: str) -> nn.Module:
    # torch.compile caches per code object: every RoadmapNet shares one forward, so without isolation the models of
    # one process share one cache. isolate_recompiles (recent torch) gives each model its own; older torch relies on
    # the raised recompile limit of benchmark().
    kw = {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {}
    return torch.compile(model, backend=backend, **kw)


@contextlib.contextmanager
def backend_settings(device: torch.device, tf32: bool, compile: bool = False, n_models: int = 1):
    """TF32 (cuBLAS matmuls and cuDNN convs alike), cudnn.benchmark on CUDA and, with compile, a clean Dynamo state
    with room for every model's train and eval graphs; everything is restored afterwards."""
    cuda, cudnn = torch.backends.cuda, torch.backends.cudnn
    saved = cuda.matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark
    cuda.matmul.allow_tf32 = cudnn.allow_tf32 = tf32
    if device.type == "cuda":
        cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels, for every model
    with contextlib.ExitStack() as stack:
        if compile:
            import torch._dynamo as dynamo

            dynamo.reset()  # nothing left from earlier models of this process counts against the limits
            stack.callback(dynamo.reset)  # and the compiled graphs of these models go with them
            name = "recompile_limit" if hasattr(dynamo.config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
            limit = max(getattr(dynamo.config, name), 4 * n_models)
            stack.enter_context(dynamo.config.patch(**{name: limit}))
        try:
            yield
        finally:
            cuda.matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = saved


def _in_chans(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def benchmark(
    models: dict[str, Callable[[], nn.Module]],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    img_size: int = 224,
    num_classes: int = 1000,
    repeats: int = 5,
    warmup: int = 0,
    iters: int | None = None,
    min_run_time: float | None = None,
    dtype: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
    tf32: bool = False,
    progress: bool | None = None,
    compile_backend: str = "inductor",
    clock: str = "wall",
) -> pd.DataFrame:
    """Median train and infer images/s of every model (name -> builder), interleaved over `repeats`; one row each.

    Each visit times a phase with torch.utils.benchmark: `iters` given, Timer.timeit(iters); else
    blocked_autorange(min_run_time) (default per device, DEFAULTS), after `warmup` extra untimed steps. All models
    stay built (with their AdamW state) across repeats, so each is built and compiled once; only the per-visit
    tensors are freed between models. With `compile`, the first visit warms up at least twice per phase so that
    compilation never lands in a timed step, and `compiled` says whether it really ran compiled. `tf32` applies to
    matmuls and convs alike, for every model (see backend_settings). `clock` "process" times with this process's
    CPU time (CPU only), so neighbours on a shared machine do not count. On CUDA, train_mem_mib / infer_mem_mib are
    the peak memory of the model's own phase (weights, gradients, optimizer state, batch, activations, workspace).
    Under stop_on_sigterm a SIGTERM ends the measurement early: the rows hold the visits done so far, models never
    visited have none, and df.attrs["stopped"] is the repeat it stopped in (None when complete).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    device = torch.device(device)
    if clock not in CLOCKS or (clock == "process" and device.type != "cpu"):
        raise ValueError(f"clock must be one of {sorted(CLOCKS)} ('process' on CPU only), got {clock!r} on {device}")
    if min_run_time is None:
        min_run_time = DEFAULTS[device.type]["min_run_time"]
    stopped = None  # the repeat during which a SIGTERM arrived (see stop_on_sigterm)
    train: dict[str, list[float]] = {n: [] for n in models}
    infer: dict[str, list[float]] = {n: [] for n in models}
    with backend_settings(device, tf32, compile, len(models)):
        runners: dict[str, _Runner] = {}
        bar = _progress(repeats * len(models), progress)
        try:
            for name, make in models.items():
                torch.manual_seed(0)  # identical random init across runs: the kernels then see the same numbers
                runners[name] = _Runner(
                    make(),
                    device,
                    batch_size,
                    img_size,
                    num_classes,
                    dtype,
                    channels_last,
                    compile,
                    compile_backend,
                    CLOCKS[clock],
                )
            for r in range(repeats):
                stopped = r + 1
                for name, runner in runners.items():
                    w = max(warmup, 2) if compile and r == 0 else warmup
                    bar.set_postfix_str(f"repeat {r + 1}/{repeats} {name}", refresh=False)
                    t, i = runner.visit(w, iters, min_run_time)
                    train[name].append(t)
                    infer[name].append(i)
                    _free(device)  # the batch and activations of this model must not crowd the next one
                    bar.update()
            stopped = None
        except Stopped:  # a time limit: keep every visit measured so far (a model with none has no row)
            stopped = stopped or 0
        finally:
            bar.close()
            params = {n: r.params for n, r in runners.items()}
            compiled = {n: r.compiled for n, r in runners.items()}
            graphs = {n: sum(r.graphs) for n, r in runners.items()}
            peak = {n: r.peak for n, r in runners.items()}
            runners.clear()
            _free(device)
    mode = mode_name(dtype, channels_last, compile)
    rows = [
        {
            "model": n,
            "mode": mode,
            "dtype": dtype,
            "channels_last": channels_last,
            "compile": compile,
            "compiled": compiled[n],
            "graphs": graphs[n],
            "tf32": tf32,
            "batch": batch_size,
            "img_size": img_size,
            "train_img_s": statistics.median(train[n]),
            "infer_img_s": statistics.median(infer[n]),
            "train_img_s_all": ";".join(f"{v:.2f}" for v in train[n]),
            "infer_img_s_all": ";".join(f"{v:.2f}" for v in infer[n]),
            "train_mem_mib": peak[n]["train"] / MIB,
            "infer_mem_mib": peak[n]["infer"] / MIB,
            "params": params[n],
            "device": device_name(device),
            "torch": torch.__version__,
        }
        for n in models
        if train[n]
    ]
    df = pd.DataFrame(rows, columns=None if rows else ["model", "mode"])
    df.attrs["stopped"] = stopped
    return df


class Stopped(Exception):
    """A SIGTERM arrived (a time limit, e.g. the GPU check's): the benchmark ends with what it has measured."""


@contextlib.contextmanager
def stop_on_sigterm():
    """Turn SIGTERM into Stopped while measuring, so that the visits already measured are kept and written."""

    def handler(signum, frame):
        raise Stopped("SIGTERM")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _progress(total: int, enabled: bool | None):
    # tqdm on stderr, and off when stderr is not a terminal (disable=None), so it never mixes into the table.
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but the benchmark must not need it
        enabled = False
    if enabled is False:
        return _NoBar()
    return tqdm(total=total, file=sys.stderr, leave=False, disable=None if enabled is None else not enabled)


class _NoBar:
    """Stand-in for a tqdm bar when progress is off."""

    def set_postfix_str(self, *a, **k):
        """Ignore."""

    def update(self, *a, **k):
        """Ignore."""

    def close(self):
        """Ignore."""


def device_name(device: torch.device) -> str:
    """Human-readable device: the GPU's name, or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor()
    if not cpu:  # empty on most Linux systems; /proc/cpuinfo has the model name
        with contextlib.suppress(OSError):
            cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    return f"{cpu or platform.machine()} ({os.cpu_count()} CPUs)"


def add_ratios(df: pd.DataFrame, regime: str = "r50") -> pd.DataFrame:
    """Add kind, step, ref and the ours/timm train and infer ratios (for the two reference pairs) per mode."""
    df = df.copy()
    ref_of = {step: name for name, step in TIMM_REFS[regime]}
    timm_names = set(ref_of.values())
    df["kind"] = ["timm" if m in timm_names else "roadmap" for m in df["model"]]
    # A timm row's step is the roadmap step with exactly its architecture, so the pairs join on (step, mode).
    df["step"] = [{n: s for n, s in TIMM_REFS[regime]}.get(m, m) for m in df["model"]]
    df["ref"] = [ref_of.get(m, "") if k == "roadmap" else "" for m, k in zip(df["model"], df["kind"])]
    for col in ("train", "infer"):
        ratio = []
        for _, row in df.iterrows():
            ref = df[(df["model"] == row["ref"]) & (df["mode"] == row["mode"])] if row["ref"] else df.iloc[:0]
            ratio.append(row[f"{col}_img_s"] / ref[f"{col}_img_s"].iloc[0] if len(ref) else math.nan)
        df[f"{col}_ratio"] = ratio
    return df[[c for c in CSV_COLUMNS if c in df.columns] + [c for c in df.columns if c not in CSV_COLUMNS]]


def time_flops(regime: str = "r50", img_size: int = 224, rows: Callable | None = None) -> tuple[float, int]:
    """Seconds fvcore takes to count the whole roadmap table (steps and kernel variants), and the row count.

    `rows` stands in for ablations.complexity.roadmap_rows (tests pass a fake; counting at 224px takes a while).
    """
    if rows is None:
        from ablations.complexity import roadmap_rows as rows  # fvcore is imported only when asked for

    t = time.perf_counter()
    n = sum(1 for _ in rows(regime, img_size))
    return time.perf_counter() - t, n


def format_table(df: pd.DataFrame, markdown: bool = False, target: float | None = None) -> str:
    """The table of one mode: model | kind | train img/s | infer img/s | train and infer ratio vs timm
    [| train MiB | infer MiB, where peak memory was measured (CUDA)] [| compiled]."""
    head = ["model", "kind", "train img/s", "infer img/s", "train vs timm", "infer vs timm"]
    with_compiled = "compile" in df.columns and bool(df["compile"].any())
    mem = [c for c in ("train_mem_mib", "infer_mem_mib") if c in df.columns and df[c].notna().any()]

    def ratio(row, col):
        if row["kind"] == "timm":
            return "(ref)"
        v = row[f"{col}_ratio"]
        if math.isnan(v):
            return ""
        mark = "" if target is None else (" ok" if v >= target else " LOW")
        return f"{v:.3f}x{mark}"

    body = [
        [
            r["model"],
            r["kind"],
            f"{r['train_img_s']:.1f}",
            f"{r['infer_img_s']:.1f}",
            ratio(r, "train"),
            ratio(r, "infer"),
            *[f"{r[c]:.0f}" for c in mem],
            *([("yes" if r["compiled"] else "NO (eager)")] if with_compiled else []),
        ]
        for _, r in df.iterrows()
    ]
    head += [c.replace("_mem_mib", " MiB") for c in mem] + ["compiled"] * with_compiled
    if markdown:
        align = [":--", ":--"] + ["--:"] * (4 + len(mem)) + [":--"] * with_compiled
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(b) for b in body])


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _non_negative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _positive_float(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def _dtype_list(s: str) -> list[str]:
    out = [m.strip() for m in s.split(",") if m.strip()]
    bad = [m for m in out if m not in DTYPES]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"modes must be a comma list of {'|'.join(DTYPES)}, got {s!r}")
    return list(dict.fromkeys(out))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; device-dependent defaults (batch, warmup, iters) are resolved in main()."""
    ap = argparse.ArgumentParser(prog="python -m ablations.benchmark", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="all", help="comma list of roadmap steps, or 'all' (default)")
    ap.add_argument("--regime", default="r50", choices=sorted(TIMM_REFS))
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch-size", type=_positive_int, help="default 128 on cuda, 32 on cpu")
    ap.add_argument("--img-size", type=_positive_int, default=224)
    ap.add_argument("--num-classes", type=_positive_int, default=1000)
    ap.add_argument("--repeats", type=_positive_int, default=5)
    ap.add_argument(
        "--min-run-time",
        type=_positive_float,
        help="seconds of timed steps per phase and visit: torch.utils.benchmark's blocked_autorange (default "
        f"{DEFAULTS['cuda']['min_run_time']} cuda, {DEFAULTS['cpu']['min_run_time']} cpu)",
    )
    ap.add_argument(
        "--iters", type=_positive_int, help="a fixed number of timed steps per phase and visit (Timer.timeit) instead"
    )
    ap.add_argument(
        "--warmup",
        type=_non_negative_int,
        default=0,
        help="extra untimed steps per phase and visit, before Timer's own warm-up (default 0)",
    )
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="bf16 = torch.autocast bfloat16")
    ap.add_argument("--modes", type=_dtype_list, help="several dtypes in one run, e.g. fp32,bf16 (overrides --dtype)")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile every model (the warm-up covers compilation)",
    )
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    ap.add_argument(
        "--tf32",
        choices=["off", "on"],
        default="off",
        help="TF32 for cuBLAS matmuls and cuDNN convs alike, for every model (default off: fp32 means fp32; PyTorch's "
        "own defaults differ between convs and matmuls, which favours 1x1 convs over nn.Linear; 'on' is the paper's "
        "A100 setting, Table 12)",
    )
    ap.add_argument(
        "--timm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure timm's reference models too (needed for the ratios)",
    )
    ap.add_argument(
        "--clock",
        default="wall",
        choices=sorted(CLOCKS),
        help="wall (default) or process: this process's CPU time, for a CPU shared with other jobs (CPU only)",
    )
    ap.add_argument("--flops", action="store_true", help="also time fvcore counting of the roadmap table at 224px")
    ap.add_argument("--csv", help="default runs/benchmark/benchmark_<device>_<timestamp>.csv")
    ap.add_argument("--markdown", help="also write the tables as Markdown here (e.g. docs/benchmark.md)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return ap.parse_args(argv)


def resolve_steps(spec: str) -> tuple[list[str], list[str]]:
    """The chosen steps in roadmap order, and any unknown names."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["all"]:
        return list(STEPS), []
    bad = [s for s in names if s not in STEPS]
    return [s for s in STEPS if s in names], bad


def _resolve_device(args: argparse.Namespace) -> torch.device | None:
    """The device the arguments ask for, or None after printing why they cannot run (one line on stderr)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmark: error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return None
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.clock == "process" and device.type != "cpu":
        print(
            f"benchmark: error: --clock process measures CPU time, not {device.type}: add --device cpu", file=sys.stderr
        )
        return None
    return device


def _header(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    device: torch.device,
    now: datetime.datetime,
    batch: int,
    timing: str,
    dtypes: list[str],
) -> list[str]:
    """The lines that say what was measured, where and how: printed first, and the Markdown file's preamble."""
    import timm

    command = "python -m ablations.benchmark " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    return [
        f"date: {now.isoformat(timespec='seconds')}",
        f"device: {device.type}, {device_name(device)}; torch {torch.__version__}; timm {timm.__version__}; "
        f"threads {torch.get_num_threads()}",
        f"regime {args.regime}; batch {batch}; img {args.img_size}; classes {args.num_classes}; "
        f"modes {','.join(dtypes)}; channels_last {args.channels_last}; "
        f"compile {args.compile}{f' ({args.compile_backend})' if args.compile else ''}; "
        f"tf32 {args.tf32} (matmuls and convs); cudnn.benchmark {device.type == 'cuda'}; "
        f"repeats {args.repeats} x (warmup {args.warmup} + torch.utils.benchmark {timing}: median step), median; "
        f"clock {args.clock}" + (" (images per CPU-second of this process)" if args.clock == "process" else ""),
        f"command: {command}",
    ]


def _measure_modes(
    args: argparse.Namespace,
    factories: dict[str, Callable[[], nn.Module]],
    device: torch.device,
    batch: int,
    min_run_time: float,
    dtypes: list[str],
) -> tuple[list[pd.DataFrame], list[tuple[str, str, str]], int | None, str | None]:
    """Benchmark every mode (dtype) in turn, printing each table as it ends.

    Returns (frames, sections, stopped, dtype): the per-mode results with ratios, their Markdown sections
    (mode, note, table), the repeat a SIGTERM stopped in (None when complete) and the last mode visited.
    """
    frames, sections, stopped, dtype = [], [], None, None
    target = TARGET[device.type]
    for dtype in dtypes:
        with stop_on_sigterm():
            df = benchmark(
                factories,
                device=device,
                batch_size=batch,
                img_size=args.img_size,
                num_classes=args.num_classes,
                repeats=args.repeats,
                warmup=args.warmup,
                iters=args.iters,
                min_run_time=min_run_time,
                dtype=dtype,
                channels_last=args.channels_last,
                compile=args.compile,
                tf32=args.tf32 == "on",
                progress=False if args.no_progress else None,
                clock=args.clock,
                compile_backend=args.compile_backend,
            )
        stopped = df.attrs["stopped"]
        if df.empty:
            break
        df = add_ratios(df, args.regime)
        frames.append(df)
        mode = df["mode"].iloc[0]
        note = f"tf32 {args.tf32}; ratio = ours / timm; target >= {target}x on {device.type}"
        if args.compile and not df["compiled"].all():
            note += f"; NOT compiled (ran eager): {', '.join(df.loc[~df['compiled'], 'model'])}"
        print(f"\n[{mode}] ({note})")
        print(format_table(df, target=target), flush=True)
        sections.append((mode, note, format_table(df, markdown=True, target=target)))
        if stopped is not None:
            break
    return frames, sections, stopped, dtype


def _write(
    args: argparse.Namespace,
    device: torch.device,
    now: datetime.datetime,
    result: pd.DataFrame,
    header: list[str],
    sections: list[tuple[str, str, str]],
    footer: list[str],
) -> None:
    """The CSV (always; a dated name under runs/benchmark/ unless --csv) and, with --markdown, the Markdown file."""
    csv = Path(args.csv or f"runs/benchmark/benchmark_{device.type}_{now:%Y%m%d-%H%M%S}.csv")
    csv.parent.mkdir(parents=True, exist_ok=True)
    result.to_csv(csv, index=False)
    print(f"\nwrote {csv}")
    if args.markdown:
        md = Path(args.markdown)
        md.parent.mkdir(parents=True, exist_ok=True)
        text = ["# Throughput benchmark", "", *[f"- {h}" for h in header], ""]
        for mode, note, table in sections:
            text += [f"## {mode}", "", f"{note}.", "", table, ""]
        text += [f"- {f}" for f in footer]
        md.write_text("\n".join(text).rstrip() + "\n")
        print(f"wrote {md}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from the command line; print the tables and write CSV (and Markdown).

    Exit status: 0 when complete, 2 for a bad argument, 143 (128 + SIGTERM) when stopped early.
    """
    args = parse_args(argv)
    steps, bad = resolve_steps(args.steps)
    if bad or not steps:
        print(
            f"benchmark: error: unknown step(s) {', '.join(bad) or repr(args.steps)}; "
            f"valid steps: {', '.join(STEPS)} (or 'all')",
            file=sys.stderr,
        )
        return 2
    device = _resolve_device(args)
    if device is None:
        return 2
    d = DEFAULTS[device.type]
    batch = args.batch_size or d["batch_size"]
    min_run_time = args.min_run_time or d["min_run_time"]
    timing = f"Timer.timeit({args.iters})" if args.iters else f"blocked_autorange(min_run_time={min_run_time:g}s)"
    dtypes = args.modes or [args.dtype]
    now = datetime.datetime.now()
    header = _header(args, argv, device, now, batch, timing, dtypes)
    print("\n".join(header), flush=True)

    factories = model_factories(steps, args.regime, args.num_classes, args.timm)
    frames, sections, stopped, dtype = _measure_modes(args, factories, device, batch, min_run_time, dtypes)
    if stopped is not None:  # the files below then hold what was measured
        header.append(f"STOPPED by SIGTERM in repeat {stopped} of {args.repeats} ({dtype}): partial results")
        print("\n" + header[-1], flush=True)
    if not frames:
        return 143

    footer = []
    if args.flops and stopped is None:
        secs, n = time_flops(args.regime)
        footer.append(f"fvcore counting of the {args.regime} roadmap table ({n} rows at 224px): {secs:.1f}s")
        print("\n" + footer[-1])
    _write(args, device, now, pd.concat(frames, ignore_index=True), header, sections, footer)
    return 0 if stopped is None else 143  # 128 + SIGTERM


if __name__ == "__main__":
    sys.exit(main())
