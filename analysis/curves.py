"""Learning curves of a sweep: test top-1 and training loss per epoch for every bar (mean over seeds, a band for
the spread), coloured by the roadmap's groups as in the roadmap figure."""

from __future__ import annotations

import math
from itertools import cycle
from pathlib import Path

import matplotlib as mpl
import pandas as pd
from matplotlib.figure import Figure

from analysis.figure import STYLE, _colour, _new_figure, _save
from analysis.runs import collect_epochs, paper_step

LINESTYLES = ("-", "--", ":", "-.")  # bars of one group share its colour; the line style tells them apart
CURVES = (("top1", "test top-1 (%)"), ("train_loss", "training loss"))


def epoch_curves(runs: pd.DataFrame, epochs: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (regime, bar, seed, epoch): top1 and train_loss (NaN where the epoch was not evaluated), from
    epochs (analysis.runs.collect_epochs: metrics.jsonl, or an epochs.csv beside a results.csv) or, when None,
    from each run's metrics.jsonl. Finished and running runs only; runs without records are skipped."""
    columns = ["regime", "bar", "seed", "order", "epoch", "top1", "train_loss"]
    live = runs[runs["status"].isin(("finished", "running"))]
    if epochs is None:
        epochs = collect_epochs(live)
    ep = live[["run_dir", "regime", "bar", "seed", "order"]].merge(epochs, on="run_dir", how="inner", sort=False)
    return ep[columns].dropna(subset=["epoch"]).reset_index(drop=True)


def curves_figure(
    runs: pd.DataFrame, out_stem: Path, regime: str = "r50", epochs: pd.DataFrame | None = None
) -> Figure:
    """Top-1 and training loss vs epoch, one line per bar (gid '<metric>:<bar>') with a min-max band over seeds;
    writes out_stem.png/.svg and returns the Figure. Epochs without a value (eval_every) are skipped. epochs: the
    per-epoch records (analysis.runs.collect_epochs); None reads each run's metrics.jsonl."""
    with mpl.rc_context(STYLE):
        return _curves_figure(runs, out_stem, regime, epochs)


def _curves_figure(runs: pd.DataFrame, out_stem: Path, regime: str, epochs: pd.DataFrame | None) -> Figure:
    """curves_figure's body, run inside the style context."""
    sub = runs[runs["regime"].fillna("unknown") == regime] if "regime" in runs.columns else runs
    ep = epoch_curves(sub, epochs)
    fig = _new_figure((14, 6.2))
    axes = fig.subplots(1, 2)
    bars = list(dict.fromkeys(ep.sort_values(["order", "bar"], kind="stable")["bar"])) if len(ep) else []
    styles: dict[str, cycle] = {}
    for bar in bars:
        colour = _colour(bar)
        style = next(styles.setdefault(colour, cycle(LINESTYLES)))
        ref = paper_step(bar)
        label = ref.title if ref is not None else str(bar)
        label = label.replace("ResNet-50", "ResNet-200") if regime == "r200" else label
        per_bar = ep[ep["bar"] == bar]
        n_seeds = per_bar["seed"].nunique()
        for ax, (col, _) in zip(axes, CURVES):
            g = per_bar.dropna(subset=[col]).groupby("epoch")[col]
            if not len(g):
                continue
            mean, lo, hi = g.mean(), g.min(), g.max()
            ax.plot(mean.index, mean.values, style, color=colour, lw=1.4, marker="o", ms=3, gid=f"{col}:{bar}",
                    label=f"{label} (n={n_seeds})")  # fmt: skip
            if (hi - lo).max() > 0:
                ax.fill_between(mean.index, lo.values, hi.values, color=colour, alpha=0.15, lw=0)
    for ax, (_, ylabel) in zip(axes, CURVES):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True)
        if not bars:  # a finished run without records: its metrics.jsonl is gone, or a results.csv came alone
            empty = (
                "no per-epoch records in this input" if sub["status"].eq("finished").any() else "no finished epochs yet"
            )
            ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", color="grey")
        elif ax.get_lines():
            ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_title("Test top-1", loc="left", fontweight="bold")
    axes[1].set_title("Training loss", loc="left", fontweight="bold")
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    if handles:
        ncol = min(4, max(1, math.ceil(len(handles) / 5)))
        fig.legend(handles, labels, loc="outside lower center", ncol=ncol, frameon=False, fontsize=8)
    fig.suptitle(f"Learning curves ({regime}): mean over seeds, band = min–max", fontsize=13, fontweight="bold")
    _save(fig, out_stem)
    return fig


__all__ = ["curves_figure", "epoch_curves"]
