"""Live status of a sweep, from its run folders only: `python -m analysis DIR --status`. Writes nothing.

Each job's folder says where it is: config.yaml the epochs planned (train.epochs), metrics.jsonl the epochs done
(with their times), summary.json whether it finished or failed; no summary means running (or killed). A job that
has not started has no folder yet, so it is not listed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

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


def sweep_eta(df: pd.DataFrame) -> float:
    """Seconds until the sweep's listed jobs end: their time left, shared by the jobs running now (1 for a
    one-process sweep, n_jobs for a parallel one); NaN when some running job's time cannot be estimated."""
    if df.empty:
        return 0.0
    running = df[df["status"] == "running"]
    if running["eta_s"].isna().any():
        return math.nan
    return float(running["eta_s"].sum()) / max(1, int((running["eta_s"] > 0).sum()))


def _duration(s: float) -> str:
    """1h 02m, 4m 10s, 12s; 'unknown' for NaN."""
    if not math.isfinite(s):
        return "unknown"
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def format_status(df: pd.DataFrame) -> str:
    """The status table as aligned text, with one line of counts and the sweep's ETA."""
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
    summary = ", ".join(f"{int(counts[k])} {k}" for k in ("finished", "running", "failed", "broken") if k in counts)
    out += ["", f"{len(df)} jobs: {summary or 'none'} · sweep ETA: {_duration(sweep_eta(df))}"]
    return "\n".join(out)


def print_status(paths: Iterable[str | Path]) -> str:
    """Print (and return) the status table of every job under paths."""
    text = format_status(sweep_status(paths))
    print(text)
    return text


__all__ = ["format_status", "print_status", "sweep_eta", "sweep_status"]
