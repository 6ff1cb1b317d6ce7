"""Leave-one-out: what each step still contributes to the final network, beside what it gained on the paper's roadmap.

From the summary frame (`analysis.runs.summarize`): every toggled bar (a model built `without=` some steps) is
compared with its full model (the same bar, regime and roadmap with nothing left out). A step's contribution is the
full model's value minus the value without the step, so a positive number means the step still helps (top-1) or
still costs compute (GFLOPs); the paper's roadmap gain of the step (Table 10: the step's value minus the previous
step's) is on the same scale. Error bars are the standard error of the difference of the two means over seeds,
sqrt(s_full^2/n_full + s_without^2/n_without) with sample stds (ddof=1): the seeds of the two models are not paired.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ablations import table10_gflops_gain
from analysis.fidelity import PAPER_TOP1
from analysis.figure import ARCH, STYLE, _colour, _fmt, _isnum, _new_figure, _save, _subtitle
from analysis.runs import paper_step
from models import STEPS

COLUMNS = [
    "regime", "roadmap", "full", "without", "title", "status", "n", "full_n", "top1_mean", "top1_std",
    "full_top1_mean", "full_top1_std", "top1_contribution", "top1_contribution_se", "gflops", "full_gflops",
    "gflops_contribution", "params", "full_params", "paper_top1_gain", "paper_gflops_gain",
]  # fmt: skip
PAPER_COLOUR = "#9e9e9e"


def paper_gain(step: str, regime: str) -> tuple[float, float]:
    """The paper's roadmap gain of a step: (top-1, GFLOPs) of the step minus the previous step's (Table 10 for r50,
    Table 11 top-1 for r200 which gives no GFLOPs); NaN for baseline and unknown names."""
    if step not in STEPS or STEPS.index(step) == 0:
        return math.nan, math.nan
    prev = STEPS[STEPS.index(step) - 1]
    top1 = PAPER_TOP1.get(regime, {})
    d_top1 = round(top1[step] - top1[prev], 2) if step in top1 and prev in top1 else math.nan
    gain = table10_gflops_gain(step) if regime == "r50" else None
    return d_top1, math.nan if gain is None else round(gain, 2)


def _num(x) -> float:
    """x as a float, NaN when missing."""
    return float(x) if _isnum(x) else math.nan


def leave_one_out(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per toggled bar of the summary: its top-1 / GFLOPs, its full model's, the contributions, the paper's."""
    if "without" not in summary.columns or not len(summary):
        return pd.DataFrame(columns=COLUMNS)
    toggled = summary[summary["without"].fillna("").astype(bool)]
    rows = []
    for _, r in toggled.iterrows():
        same = (
            (summary["regime"] == r["regime"])
            & (summary["roadmap"] == r["roadmap"])
            & (summary["bar"] == r["base_bar"])
            & ~summary["without"].fillna("").astype(bool)
        )
        full = summary[same].iloc[0] if same.any() else pd.Series(dtype=object)
        n, full_n = int(r["n"]), int(full.get("n", 0) or 0)
        se = math.nan
        if n >= 2 and full_n >= 2:
            se = math.sqrt(r["top1_std"] ** 2 / n + full["top1_std"] ** 2 / full_n)
        removed = r["without"].split("+")
        gain = paper_gain(removed[0], r["regime"]) if len(removed) == 1 else (math.nan, math.nan)
        rows.append(
            {
                "regime": r["regime"],
                "roadmap": r["roadmap"],
                "full": r["base_bar"],
                "without": r["without"],
                "title": ", ".join(_step_title(s, r["regime"]) for s in removed),
                "status": r["status"],
                "n": n,
                "full_n": full_n,
                "top1_mean": _num(r["top1_mean"]),
                "top1_std": _num(r["top1_std"]),
                "full_top1_mean": _num(full.get("top1_mean")),
                "full_top1_std": _num(full.get("top1_std")),
                "top1_contribution": _num(full.get("top1_mean")) - _num(r["top1_mean"]),
                "top1_contribution_se": se,
                "gflops": _num(r["gflops"]),
                "full_gflops": _num(full.get("gflops")),
                "gflops_contribution": _num(full.get("gflops")) - _num(r["gflops"]),
                "params": _num(r["paper_params"]) if _isnum(r["paper_params"]) else _num(r["params"]),
                "full_params": _num(full.get("paper_params")) if _isnum(full.get("paper_params")) else math.nan,
                "paper_top1_gain": gain[0],
                "paper_gflops_gain": gain[1],
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def _step_title(step: str, regime: str) -> str:
    """The paper's short title of a step (its name when unknown)."""
    ref = paper_step(step)
    return ref.title if ref else step


def leave_one_out_markdown(loo: pd.DataFrame) -> str:
    """The leave-one-out table as Markdown: per full model, one line per removal, ours beside the paper's gain."""
    out = []
    for (regime, roadmap, full), t in loo.groupby(["regime", "roadmap", "full"], sort=False):
        ref = t.iloc[0]
        where = f"{full} ({regime}{'' if roadmap == 'paper' else f', roadmap {roadmap}'})"
        out += [
            f"### Leave-one-out from {where}: full model top-1 {_pm(ref['full_top1_mean'], ref['full_top1_std'])}, "
            f"{_fmt(ref['full_gflops'], 2)} GFLOPs, n = {int(ref['full_n'])}",
            "",
            "Contribution = full model minus the model without the step (positive: the step still helps / still "
            "costs compute); ± = standard error of that difference over seeds (unpaired, sample stds). Paper gain = "
            "the step's change on the paper's roadmap (Table 10, ImageNet).",
            "",
            "| step left out | top-1 without (%) | n | top-1 contribution | paper top-1 gain | GFLOPs without "
            "| GFLOPs contribution | paper GFLOPs gain |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for _, r in t.iterrows():
            top1 = _pm(r["top1_mean"], r["top1_std"]) if r["n"] > 0 else f"*{r['status']}*"
            se = f" ± {r['top1_contribution_se']:.2f}" if _isnum(r["top1_contribution_se"]) else ""
            contrib = f"{r['top1_contribution']:+.2f}{se}" if _isnum(r["top1_contribution"]) else "–"
            gflops = f"{_fmt(r['gflops'], 2)} | {_signed(r['gflops_contribution'], 3)}"
            out.append(
                f"| {r['title']} | {top1} | {int(r['n'])} | {contrib} | {_signed(r['paper_top1_gain'])} "
                f"| {gflops} | {_signed(r['paper_gflops_gain'])} |"
            )
        out.append("")
    return "\n".join(out)


def _pm(mean, std) -> str:
    """'mean ± std', the std left out when unknown."""
    if not _isnum(mean):
        return "–"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if _isnum(std) else "")


def _signed(x, digits: int = 2) -> str:
    """A signed number, an en dash when unknown."""
    return f"{x:+.{digits}f}" if _isnum(x) else "–"


def leave_one_out_figure(loo: pd.DataFrame, summary: pd.DataFrame, out_stem: Path) -> Figure:
    """Two panels, one row per removed step: top-1 and GFLOPs contribution (ours, ± SE) beside the paper's roadmap
    gain of the step; writes out_stem.png/.svg and returns the Figure. Each of our bars has gid 'loo:<without>'."""
    with mpl.rc_context(STYLE):
        return _figure(loo, summary, out_stem)


def _figure(loo: pd.DataFrame, summary: pd.DataFrame, out_stem: Path) -> Figure:
    """leave_one_out_figure's body, inside the style context."""
    n = len(loo)
    fig = _new_figure((13, 2.3 + 0.42 * max(n, 3)))
    ax, axg = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [1.25, 1]})
    _panel(ax, loo, "top1_contribution", "paper_top1_gain", "top1_contribution_se", top1=True)
    _panel(axg, loo, "gflops_contribution", "paper_gflops_gain", None, top1=False)
    ax.set_ylim(max(n, 1) - 0.5, -0.5)
    ax.set_yticks(np.arange(n), [f"− {t}" for t in loo["title"]] if n else [])
    ax.set_xlabel("top-1 contribution (pp): full − without the step  (ours: mean ± SE over seeds)")
    axg.set_xlabel("GFLOPs contribution: full − without (the model at 224 px, full width)")
    ax.set_title("top-1: what the step still adds", loc="left", fontweight="bold")
    axg.set_title("GFLOPs: what the step still adds (< 0: it saves compute)", loc="left", fontweight="bold")
    regime = loo["regime"].iloc[0] if n else "r50"
    full = loo["full"].iloc[0] if n else "separate_downsampling"
    arch = ARCH.get(regime, ("ResNet", "ConvNeXt"))[1] if full == STEPS[-1] else full
    ref = loo.iloc[0] if n else None
    head = f"{arch} ({full}, {regime})"
    if ref is not None:
        head += f": top-1 {_pm(ref['full_top1_mean'], ref['full_top1_std'])} %, {_fmt(ref['full_gflops'], 2)} GFLOPs"
    fig.suptitle(f"Leave-one-out: what each step still contributes to {head}", fontsize=12, fontweight="bold")
    sub = summary[summary["without"].fillna("").astype(bool)] if "without" in summary.columns else summary
    if len(sub):
        ax.text(0, 1.06, _subtitle(sub), transform=ax.transAxes, fontsize=8.5, color="dimgrey")
    handles = [
        Patch(color="#555555", label="ours, coloured by roadmap group (error bar: SE of the difference)"),
        Patch(
            facecolor=PAPER_COLOUR,
            edgecolor="white",
            hatch="///",
            alpha=0.55,
            label="paper: the step's gain on its roadmap (Table 10, ImageNet)",
        ),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, frameon=False)
    _save(fig, out_stem)
    return fig


def _panel(a, loo: pd.DataFrame, col: str, pcol: str, se_col: str | None, top1: bool) -> None:
    """One panel: per removed step our contribution (column col, error bar se_col) above the paper's gain (pcol),
    values written at the bar ends; the top-1 panel names the status of a removal without a result."""
    h = 0.38
    ours, paper = loo[col].map(_num), loo[pcol].map(_num)
    err_all = loo[se_col].map(_num).fillna(0.0) if se_col else pd.Series(0.0, loo.index)
    ends = [v for v in (*(ours + err_all), *(ours - err_all), *paper) if _isnum(v)] + [0.0]
    lo, hi = min(ends), max(ends)
    span = max(hi - lo, 0.1)
    for i, r in loo.reset_index(drop=True).iterrows():
        colour = _colour(r["without"].split("+")[0])
        if i % 2 == 0:
            a.axhspan(i - 0.5, i + 0.5, color="#f2f2f2", zorder=0, lw=0)
        err = r[se_col] if se_col and _isnum(r[se_col]) else None
        if _isnum(ours[i]):
            a.barh(
                i - h / 2,
                ours[i],
                height=h,
                color=colour,
                alpha=0.9,
                xerr=err,
                zorder=2,
                error_kw={"ecolor": "black", "capsize": 2.5, "elinewidth": 1},
                gid=f"loo:{r['without']}" if top1 else None,
            )
            _value(a, ours[i] + (np.sign(ours[i]) * err if err else 0), i - h / 2, ours[i], span, err)
        elif top1:
            a.barh(i - h / 2, 0, height=h, gid=f"loo:{r['without']}")
            a.text(0, i - h / 2, f"  {r['status']}", va="center", ha="left", fontsize=8.5, style="italic",
                   color="#d62728")  # fmt: skip
        if _isnum(paper[i]):
            a.barh(
                i + h / 2,
                paper[i],
                height=h,
                color=PAPER_COLOUR,
                alpha=0.55,
                hatch="///",
                edgecolor="white",
                linewidth=0.5,
                zorder=2,
            )
            _value(a, paper[i], i + h / 2, paper[i], span, None, colour="dimgrey")
    a.axvline(0, color="black", linewidth=0.8, zorder=3)
    a.set_xlim(lo - 0.22 * span, hi + 0.22 * span)  # room for the value labels beyond the bars
    a.grid(axis="x", zorder=1)
    a.tick_params(axis="y", length=0)


def _value(a, x_end, y, value, span, err, colour="black") -> None:
    """The value as text just beyond the bar's end (and its error bar)."""
    text = f"{value:+.2f}" + (f" ± {err:.2f}" if err else "")
    pad = 0.02 * span
    a.text(
        x_end + (pad if x_end >= 0 else -pad),
        y,
        text,
        va="center",
        ha="left" if x_end >= 0 else "right",
        fontsize=7.5,
        color=colour,
        zorder=4,
    )


__all__ = ["leave_one_out", "leave_one_out_figure", "leave_one_out_markdown", "paper_gain"]
