"""Turn run folders (any number of sweeps) into results tables and the roadmap figure: `python -m analysis DIR`."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from analysis.curves import curves_figure
from analysis.fidelity import fidelity, fidelity_caption, fidelity_json, fidelity_markdown
from analysis.figure import flops_figure, roadmap_figure, set_plot_style
from analysis.runs import FIGURE_ORDER, collect, find_run_dirs, portable, results_csv, summarize

__all__ = [
    "FIGURE_ORDER", "analyze", "collect", "curves_figure", "fidelity", "find_run_dirs", "flops_figure",
    "markdown_table", "results_csv", "roadmap_figure", "set_plot_style", "summarize",
]  # fmt: skip


def _f(x, fmt: str) -> str:
    """Format a number, an en dash when missing."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "–"
    return format(x, fmt) if math.isfinite(x) else "–"


def _top1_cell(row) -> str:
    """'mean ± std' for finished bars, else the bar's state (running with its last top-1, failed, missing)."""
    if row["n"] > 0:
        std = f" ± {row['top1_std']:.2f}" if math.isfinite(row["top1_std"]) else ""
        return f"{row['top1_mean']:.2f}{std}"
    if row["status"] == "running" and math.isfinite(row["running_top1"]):
        return f"*running: {row['running_top1']:.2f}*"
    return f"*{row['status']}*"


def markdown_table(summary) -> str:
    """The summary as Markdown: one table per regime, our numbers beside the paper's."""
    out = []
    regimes = list(dict.fromkeys(summary["regime"]))
    for regime in regimes:
        s = summary[summary["regime"] == regime]
        if len(regimes) > 1:
            out += [f"### {regime}", ""]
        out += [
            "| bar | GFLOPs | params (M) | top-1 (%) | n | not finished | paper top-1 | paper GFLOPs |",
            # GFLOPs and params describe the step at ImageNet scale (224 px, full width), like the paper's
            "|---|---:|---:|---:|---:|---|---:|---:|",
        ]
        for _, r in s.iterrows():
            title = r["title"] if r.get("adopted", True) else f"{r['title']} (not adopted)"
            pending = ", ".join(f"{int(r[k])} {k[2:]}" for k in ("n_running", "n_failed", "n_broken") if r[k] > 0)
            params = _f((r["paper_params"] if math.isfinite(r["paper_params"]) else r["params"]) / 1e6, ".2f")
            out.append(
                f"| {title} | {_f(r['gflops'], '.2f')} | {params} | {_top1_cell(r)} | {int(r['n'])} | {pending} "
                f"| {_f(r['paper_top1'], '.1f')} | {_f(r['paper_gflops'], '.1f')} |"
            )
        out.append("")
    return "\n".join(out)


def analyze(paths: Iterable[str | Path] | str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Collect every run under paths and write results.csv/.md, summary.csv, fidelity.json and the figures (the
    roadmap, top-1 vs GFLOPs, and the learning curves from each run's metrics.jsonl).

    out_dir defaults to the first path (its folder when it is a results.csv). Run folders are named relative to
    out_dir in every file written, so the results stay valid when the folder is moved or committed. One
    roadmap/flops figure per regime present; with several regimes the non-r50 ones get a _<regime> suffix.
    Returns {file name: path written}. Raises ValueError when no run exists under paths.
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise ValueError("no path given")
    df = collect(paths)
    if df.empty:
        raise ValueError(f"no run folders (config.yaml) under {', '.join(map(str, paths))}")
    out = Path(out_dir) if out_dir is not None else paths[0].parent if paths[0].is_file() else paths[0]
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(df)
    records = fidelity(summary)
    written: dict[str, Path] = {}

    def put(name: str) -> Path:
        written[name] = out / name
        return out / name

    portable(df, out).to_csv(put("results.csv"), index=False)
    summary.to_csv(put("summary.csv"), index=False)
    put("fidelity.json").write_text(fidelity_json(records))
    table = markdown_table(summary) + "\n" + fidelity_markdown(records)
    put("results.md").write_text(table)
    print(table)

    set_plot_style()
    regimes = list(dict.fromkeys(summary["regime"]))
    captions = {rec["regime"]: fidelity_caption(rec) for rec in records}
    for regime in regimes:
        suffix = "" if regime == "r50" or len(regimes) == 1 else f"_{regime}"
        roadmap_figure(summary, out / f"roadmap{suffix}", regime=regime, caption=captions.get(regime))
        flops_figure(summary, out / f"roadmap_flops{suffix}", regime=regime)
        curves_figure(df, out / f"curves{suffix}", regime=regime)
        for stem in (f"roadmap{suffix}", f"roadmap_flops{suffix}", f"curves{suffix}"):
            for ext in ("png", "svg"):
                put(f"{stem}.{ext}")
    return written
