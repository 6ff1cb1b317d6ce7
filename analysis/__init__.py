"""Turn run folders (any number of sweeps) into results tables and the roadmap figure: `python -m analysis DIR`."""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

# The package's names, imported on first use (PEP 562): run_ablation.py's end-of-sweep callback imports
# analysis.callback, hence this package, in every run, which would import pandas, scipy.stats and matplotlib (about
# 670 modules) at each run's start for a figure drawn only when a multirun ends.
_LAZY = {
    "curves_figure": "analysis.curves",
    "fidelity": "analysis.fidelity",
    "flops_figure": "analysis.figure",
    "roadmap_figure": "analysis.figure",
    "set_plot_style": "analysis.figure",
    "heads_figure": "analysis.heads",
    "leave_one_out": "analysis.leave_one_out",
    "leave_one_out_figure": "analysis.leave_one_out",
    **dict.fromkeys(("FIGURE_ORDER", "collect", "find_run_dirs", "results_csv", "summarize"), "analysis.runs"),
}

__all__ = [
    "FIGURE_ORDER", "analyze", "collect", "curves_figure", "fidelity", "find_run_dirs", "flops_figure", "heads_figure",
    "leave_one_out", "leave_one_out_figure", "markdown_table", "results_csv", "roadmap_figure", "set_plot_style",
    "summarize",
]  # fmt: skip


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")


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
    import pandas as pd

    from analysis.runs import PAPER

    out = []
    keys = list(dict.fromkeys(zip(summary["regime"], summary.get("roadmap", pd.Series(PAPER, summary.index)))))
    for regime, roadmap in keys:
        s = summary[(summary["regime"] == regime) & (summary.get("roadmap", PAPER) == roadmap)]
        if len(keys) > 1:
            out += [f"### {regime}" + ("" if roadmap == PAPER else f", roadmap {roadmap}"), ""]
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


def _has_curves(runs: pd.DataFrame, epochs: pd.DataFrame, stem: str) -> bool:
    """Whether the learning curves of runs can be drawn; says which finished runs have no per-epoch records (a
    results.csv without its epochs.csv, from before epochs.csv, or a run folder whose metrics.jsonl is gone).
    False, and the figure is skipped (an existing one is left as it is), when no finished run has any."""
    from analysis.runs import EPOCHS_CSV

    finished = runs.loc[runs["status"] == "finished", "run_dir"]
    bare = finished[~finished.isin(set(epochs["run_dir"]))]
    if len(finished) and len(bare) == len(finished):
        print(
            f"note: no per-epoch records in this input for any of its {len(finished)} finished runs (a results.csv "
            f"without its {EPOCHS_CSV}, or run folders without metrics.jsonl): {stem}.png not drawn"
        )
        return False
    if len(bare):
        print(f"note: {len(bare)} of {len(finished)} finished runs have no per-epoch records: not in {stem}.png")
    return True


METRICS = ("top1", "best_top1", "top1_ema", "best_top1_ema")  # what the tables and figures rank (results.csv has all)


def analyze(
    paths: Iterable[str | Path] | str | Path, out_dir: str | Path | None = None, metric: str = "top1"
) -> dict[str, Path]:
    """Collect every run under paths and write results.csv/.md, epochs.csv (every run's per-epoch records),
    summary.csv, fidelity.json and the figures (the roadmap, top-1 vs GFLOPs, and the learning curves from each
    run's metrics.jsonl, or from the epochs.csv beside a results.csv given as input; not drawn, with a note, when the
    input has finished runs and no per-epoch record); with leave-one-out runs (without=) also
    leave_one_out.csv/.md/.png/.svg (analysis.leave_one_out); with heads / fine-tuning runs (model.head given,
    data.classes, pretrained=) heads.csv/.md/.png/.svg (analysis.heads), and those runs stay out of the roadmap's
    bars, the design and leave-one-out.

    out_dir defaults to the first path (its folder when it is a results.csv). Run folders are named relative to
    out_dir in every file written, so the results stay valid when the folder is moved or committed. With a two-level
    design of steps among the runs (a +sweep=factorial folder, or recognised from the runs' sets of steps) also
    factorial.json/.md/.png/.svg and factorial_halfnormal.png/.svg (analysis.factorial). One roadmap/flops figure
    per regime and roadmap present, drawn in that roadmap's order; with several regimes the non-r50 ones get a
    _<regime> suffix, with several roadmaps the non-paper ones a _<roadmap> suffix. Leave-one-out
    runs alone (no roadmap walked besides their full models) get no roadmap figures and no fidelity.json.
    `metric` picks the number the summary, the figures and the fidelity measures use: top1 (the last epoch's, the
    default), best_top1 (the best evaluated epoch's), or the EMA's (top1_ema, best_top1_ema); results.csv keeps
    them all. Returns {file name: path written}. Raises ValueError when no run exists under paths.
    """
    from analysis.factorial import write_factorial
    from analysis.fidelity import fidelity, fidelity_json, fidelity_markdown
    from analysis.heads import write_heads
    from analysis.runs import EPOCHS_CSV, PAPER, collect_epochs, groups, is_roadmap, portable, summarize

    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    results, df, heads_df = _collect(paths, metric)
    out = Path(out_dir) if out_dir is not None else paths[0].parent if paths[0].is_file() else paths[0]
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(df)
    # the fidelity measures compare the paper's roadmap with the paper's; other orders and removals have no such pair
    plain = summary["without"].eq("") & summary["roadmap"].eq(PAPER)
    walks = [g for g in groups(df) if is_roadmap(df[(df["regime"] == g[0]) & (df["roadmap"] == g[1])])]
    records = fidelity(summary[plain]) if (plain.any() and any(r == PAPER for _, r in walks)) else []
    written: dict[str, Path] = {}

    def put(name: str) -> Path:
        written[name] = out / name
        return out / name

    epochs = collect_epochs(results, paths)  # read before anything is written: out may hold the input's epochs.csv
    portable(results, out).to_csv(put("results.csv"), index=False)
    portable(epochs, out).to_csv(put(EPOCHS_CSV), index=False)
    summary.to_csv(put("summary.csv"), index=False)
    if records:
        put("fidelity.json").write_text(fidelity_json(records))
    table = markdown_table(summary) + ("\n" + fidelity_markdown(records) if records else "")
    put("results.md").write_text(table)
    print(table)
    _roadmap_figures(df, summary, walks, records, epochs, out, put)
    written.update(write_heads(heads_df, epochs, out))
    if not len(df):  # heads runs only: no roadmap, design or leave-one-out among them
        if "heads.md" in written:
            note = "No roadmap runs in this input; its heads / fine-tuning runs (heads.md):\n\n"
            written["results.md"].write_text(note + written["heads.md"].read_text())
        return written
    factorial, in_design = write_factorial(df, summary, out, paths)
    written.update(factorial)
    _leave_one_out(summary, in_design, out, put)
    return written


def _collect(paths: list[Path], metric: str):
    """(every run as collected, the roadmap runs ranked by `metric`, the heads / fine-tuning runs): transfer runs
    get their own table and figure, not the roadmap's bars. ValueError for no path, no run or a metric no run has."""
    import pandas as pd

    from analysis.runs import collect, is_transfer

    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid choices: {', '.join(METRICS)}")
    if not paths:
        raise ValueError("no path given")
    df = collect(paths)
    if df.empty:
        raise ValueError(f"no run folders (config.yaml) under {', '.join(map(str, paths))}")
    results = df  # written as collected; the figures rank `metric`
    if metric != "top1":
        ranked = pd.to_numeric(df[metric], errors="coerce") if metric in df else pd.Series(dtype=float)
        if not ranked.notna().any():
            raise ValueError(f"no run here records {metric} (runs before it existed, or EMA off); use --metric top1")
        df = df.assign(top1=ranked)
    transfer = is_transfer(df)
    return results, df[~transfer], df[transfer]


def _roadmap_figures(df, summary, walks, records, epochs, out: Path, put) -> None:
    """The roadmap, top-1 vs GFLOPs and learning-curve figures of each (regime, roadmap) walked; file names by put."""
    from analysis.curves import curves_figure
    from analysis.fidelity import fidelity_caption
    from analysis.figure import flops_figure, roadmap_figure, set_plot_style
    from analysis.runs import PAPER

    set_plot_style()
    regimes = list(dict.fromkeys(r for r, _ in walks))
    roadmaps = list(dict.fromkeys(m for _, m in walks))
    captions = {rec["regime"]: fidelity_caption(rec) for rec in records}
    for regime, roadmap in walks:
        suffix = "" if regime == "r50" or len(regimes) == 1 else f"_{regime}"
        suffix += "" if roadmap == PAPER or len(roadmaps) == 1 else f"_{roadmap}"
        rows = summary[(summary["roadmap"] == roadmap) & summary["without"].eq("")]
        runs = df[(df["roadmap"] == roadmap) & df["without"].eq("")]
        caption = captions.get(regime) if roadmap == PAPER else None
        roadmap_figure(rows, out / f"roadmap{suffix}", regime=regime, caption=caption, roadmap=roadmap)
        flops_figure(rows, out / f"roadmap_flops{suffix}", regime=regime)
        stems = [f"roadmap{suffix}", f"roadmap_flops{suffix}"]
        if _has_curves(runs[runs["regime"] == regime], epochs, f"curves{suffix}"):
            curves_figure(runs, out / f"curves{suffix}", regime=regime, epochs=epochs)
            stems.append(f"curves{suffix}")
        for stem in stems:
            for ext in ("png", "svg"):
                put(f"{stem}.{ext}")


def _leave_one_out(summary, in_design, out: Path, put) -> None:
    """leave_one_out.csv/.md and a figure per (regime, roadmap, full model) for the removals that are not points
    of a factorial design (those are the factorial analysis's)."""
    from analysis.leave_one_out import leave_one_out, leave_one_out_figure, leave_one_out_markdown

    loo = leave_one_out(summary)
    loo = loo[~(loo["without"].str.contains("+", regex=False) & loo["without"].isin(in_design))].reset_index(drop=True)
    if not len(loo):
        return
    loo.to_csv(put("leave_one_out.csv"), index=False)
    text = leave_one_out_markdown(loo)
    put("leave_one_out.md").write_text(text)
    print(text)
    keys = list(dict.fromkeys(zip(loo["regime"], loo["roadmap"], loo["full"])))
    for regime, roadmap, full in keys:
        stem = "leave_one_out" if len(keys) == 1 else f"leave_one_out_{full}_{regime}_{roadmap}"
        part = loo[(loo["regime"] == regime) & (loo["roadmap"] == roadmap) & (loo["full"] == full)]
        leave_one_out_figure(part, summary[summary["regime"] == regime], out / stem)
        for ext in ("png", "svg"):
            put(f"{stem}.{ext}")
