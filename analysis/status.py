"""Live status of a sweep, from its run folders only: `python -m analysis DIR --status`. Writes nothing.

Each job's folder says where it is: config.yaml the epochs planned (train.epochs), metrics.jsonl the epochs done
(with their times), summary.json whether it finished or failed; no summary means running (or killed). A job that
has not started has no folder yet, so it is not listed; it is counted, though, where its sweep's folder holds
Hydra's multirun.yaml (the jobs it was launched with), and the sweep's ETA counts it at the listed jobs' mean time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from analysis.runs import _num, _read_metrics, find_run_dirs, load_run

COLUMNS = ["bar", "seed", "epochs_done", "epochs_planned", "top1", "img_per_s", "status", "eta_s", "error"]


def sweep_status(paths: Iterable[str | Path] | str | Path) -> pd.DataFrame:
    """One row per run folder under paths: bar, seed, epochs done / planned, latest top-1 and img/s, status and the
    job's own time left (eta_s; 0 when finished or failed, NaN when it cannot be estimated)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    rows = []
    for run_dir in find_run_dirs(paths):
        run = load_run(run_dir)
        metrics = _read_metrics(Path(run_dir) / "metrics.jsonl")
        top1 = [_num(m.get("top1")) for m in metrics]
        top1 = [v for v in top1 if not math.isnan(v)]
        speeds = [_num(m.get("img_per_s")) for m in metrics]
        speeds = [v for v in speeds if not math.isnan(v)]
        times = [_num(m.get("epoch_s")) for m in metrics]
        times = [v for v in times if not math.isnan(v)]
        rows.append(
            {
                "run_dir": str(run_dir),
                "bar": run["bar"],
                "seed": run["seed"],
                "order": run["order"],
                "epochs_done": int(run["epochs"]) if not math.isnan(_num(run["epochs"])) else 0,
                "epochs_planned": run["epochs_planned"],
                "top1": top1[-1] if top1 else math.nan,
                "img_per_s": speeds[-1] if speeds else math.nan,
                "status": run["status"],
                "epoch_s": sum(times) / len(times) if times else math.nan,
                "error": run["error"],
            }
        )
    df = pd.DataFrame(rows, columns=["run_dir", "order", "epoch_s", *COLUMNS])
    if df.empty:
        return df
    df = df.sort_values(["order", "bar", "seed"], key=lambda c: c if c.name == "order" else c.astype(str))
    # a job that has not finished an epoch yet: the sweep's typical epoch time (same profile, other bars)
    typical = df["epoch_s"].median()
    left = (df["epochs_planned"] - df["epochs_done"]).clip(lower=0)
    per_epoch = df["epoch_s"].fillna(typical)
    done = df["status"].isin(["finished", "failed", "broken"])
    df["eta_s"] = (left * per_epoch).where(~done, 0.0)
    return df.reset_index(drop=True)


def launched_jobs(sweep_dir: str | Path) -> int | None:
    """How many jobs the sweep in sweep_dir was launched with, from its multirun.yaml: hydra.sweeper.params and
    the command line's overrides, expanded as Hydra's basic sweeper expands them (its own parser and
    split_arguments, so `a,b`, ranges, globs and a command line that overrides a sweep file's key count as they
    ran). None without a multirun.yaml, or for one this cannot expand (another sweeper's syntax)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ablations.config import register

    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return None
    register()  # the project's resolvers: `+sweep=factorial`'s params are ${factorial.without:}
    try:
        cfg = OmegaConf.load(path)
        params = [f"{k}={v}" for k, v in (OmegaConf.select(cfg, "hydra.sweeper.params") or {}).items()]
        task = list(OmegaConf.select(cfg, "hydra.overrides.task") or [])
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params + task), None)
    except Exception:  # noqa: BLE001 -- a status display: an unreadable plan only means "not counted"
        return None
    return sum(len(b) for b in batches)


def not_started(df: pd.DataFrame, paths: Iterable[str | Path] | str | Path) -> int:
    """Jobs that the sweeps under paths were launched with and that have no run folder yet: per sweep folder
    (one holding multirun.yaml), its launched jobs minus the listed jobs under it."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    plans = [p for root in map(Path, paths) for p in [root / "multirun.yaml", *root.rglob("*/multirun.yaml")]]
    sweeps = {p.parent.resolve() for p in plans if p.is_file()}
    runs = [Path(r).resolve() for r in df["run_dir"]] if len(df) else []
    missing = 0
    for sweep in sweeps:
        launched = launched_jobs(sweep)
        if launched is not None:
            missing += max(0, launched - sum(sweep in r.parents for r in runs))
    return missing


def mean_job_s(df: pd.DataFrame) -> float:
    """The listed jobs' mean time: epochs planned x mean epoch time; NaN when no job has a time yet."""
    return float((df["epochs_planned"] * df["epoch_s"]).mean())


def sweep_eta(df: pd.DataFrame, not_started: int = 0) -> float:
    """Seconds until the sweep ends: the listed jobs' time left plus not_started jobs at the listed jobs' mean
    time (epochs planned x mean epoch time), shared by the jobs running now (1 for a one-process sweep, n_jobs
    for a parallel one); NaN when some running job's time, or every listed job's time, cannot be estimated."""
    if df.empty:
        return 0.0 if not not_started else math.nan
    running = df[df["status"] == "running"]
    if running["eta_s"].isna().any():
        return math.nan
    left = float(running["eta_s"].sum())
    if not_started:
        left += not_started * mean_job_s(df)
    return left / max(1, int((running["eta_s"] > 0).sum()))


def _duration(s: float) -> str:
    """1h 02m, 4m 10s, 12s; 'unknown' for NaN."""
    if not math.isfinite(s):
        return "unknown"
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def format_status(df: pd.DataFrame, not_started: int = 0) -> str:
    """The status table as aligned text, with one line of counts (not_started: jobs launched without a folder
    yet) and the sweep's ETA."""
    header = ["bar", "seed", "epochs", "top-1", "img/s", "status", "time left"]
    lines = []
    for _, r in df.iterrows():
        planned = _num(r["epochs_planned"])
        seed = _num(r["seed"])
        status = r["status"] + (f": {r['error'][:60]}" if r["status"] in ("failed", "broken") and r["error"] else "")
        lines.append(
            [
                str(r["bar"]),
                "?" if math.isnan(seed) else str(int(seed)),
                f"{r['epochs_done']}/{'?' if math.isnan(planned) else int(planned)}",
                "–" if math.isnan(_num(r["top1"])) else f"{r['top1']:.2f}",
                "–" if math.isnan(_num(r["img_per_s"])) else f"{r['img_per_s']:.0f}",
                status,
                "" if r["status"] != "running" else _duration(_num(r["eta_s"])),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
    out = [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)]
    counts = df["status"].value_counts() if len(df) else pd.Series(dtype=int)
    counts = {k: int(counts[k]) for k in ("finished", "running", "failed", "broken") if k in counts}
    if not_started:
        counts["not started"] = not_started
    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    eta = _duration(sweep_eta(df, not_started))
    if not_started and eta != "unknown":
        eta += f" (the {not_started} not started at the listed jobs' mean time, {_duration(mean_job_s(df))})"
    out += ["", f"{len(df) + not_started} jobs: {summary or 'none'} · sweep ETA: {eta}"]
    return "\n".join(out)


def print_status(paths: Iterable[str | Path]) -> str:
    """Print (and return) the status table of every job under paths, and the count of those not started."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    df = sweep_status(paths)
    text = format_status(df, not_started(df, paths))
    print(text)
    return text


__all__ = ["format_status", "launched_jobs", "not_started", "print_status", "sweep_eta", "sweep_status"]
