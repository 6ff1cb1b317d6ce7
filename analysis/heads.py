"""Heads and fine-tuning (issue 26): for each body x head, the target task's top-1 after the frozen phase and after
the whole schedule, and the epochs each run needs to reach 95 % of its final top-1, over seeds.

The runs are those analysis.runs.is_transfer picks (model.head given, data.classes, or pretrained=): a +sweep=heads
folder (the source task, trained from scratch) or a +sweep=heads_finetune folder (the target task), or both. Each
task (TASK: phase, classes, epochs, frozen epochs and the other finetune.* settings) gets its own rows, so a 2-epoch
and a 6-epoch fine-tune are never seeds of one mean; the figure draws one task, a fine-tune's when there are any.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from analysis.figure import STYLE, _new_figure, _save
from analysis.runs import portable

TO_FINAL = 0.95  # "converged": the first evaluated epoch at or above this share of the run's final top-1
HEAD_ORDER = ("linear", "norm_linear", "fastai", "fastai_convnext")
HEAD_COLOUR = {"linear": "#7f7f7f", "norm_linear": "#1f77b4", "fastai": "#ff7f0e", "fastai_convnext": "#2ca02c"}
BODY_TITLE = {"baseline": "ResNet body", "separate_downsampling": "ConvNeXt body"}
RUN_COLUMNS = ["run_dir", "phase", "body", "head", "seed", "classes", "freeze_epochs", "finetune", "epochs", "top1",
               "frozen_top1", "epochs_to_95"]  # fmt: skip
SUMMARY_COLUMNS = ["phase", "classes", "freeze_epochs", "finetune", "body", "head", "n", "top1_mean", "top1_std",
                   "frozen_top1_mean", "frozen_top1_std", "epochs_to_95_mean", "epochs_to_95_max",
                   "epochs"]  # fmt: skip


def _epochs_to(curve: pd.Series, share: float = TO_FINAL) -> float:
    """The first evaluated epoch whose top-1 is at least share x the last one's (curve: top-1 by epoch)."""
    curve = curve.dropna().sort_index()
    if not len(curve):
        return math.nan
    reached = curve[curve >= share * curve.iloc[-1]]
    return float(reached.index[0])


def heads_runs(runs: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """One row per finished heads run (RUN_COLUMNS): phase 'finetune' (pretrained= given) or 'pretrain', its body
    (the step) and head, the final top-1, the top-1 at the end of the frozen epochs (fine-tunes with
    finetune.freeze_epochs > 0) and the epochs to 95 % of the final top-1, from epochs (analysis.runs
    .collect_epochs)."""
    done = runs[runs["status"] == "finished"]
    rows = []
    for _, r in done.iterrows():
        curve = epochs.loc[epochs["run_dir"] == r["run_dir"]].set_index("epoch")["top1"]
        curve = pd.to_numeric(curve, errors="coerce")
        freeze = r.get("freeze_epochs")
        freeze = int(freeze) if isinstance(freeze, (int, float)) and math.isfinite(freeze) else 0
        fine = str(r.get("pretrained", "")).strip() not in ("", "nan")  # a results.csv reads "" back as NaN
        frozen = curve.get(freeze, math.nan) if (fine and freeze > 0) else math.nan
        rows.append({
            "run_dir": r["run_dir"], "phase": "finetune" if fine else "pretrain", "body": r["step"],
            "head": r["head"], "seed": r["seed"], "classes": r.get("classes", ""), "freeze_epochs": freeze,
            "finetune": r.get("finetune", ""),
            "epochs": r["epochs"], "top1": r["top1"], "frozen_top1": float(frozen), "epochs_to_95": _epochs_to(curve),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


# A task: what a run was trained on, for how long and how it was fine-tuned. Runs of different tasks are never pooled
# as seeds (say a 2-epoch and a 6-epoch fine-tune of one body and head, or a source and a target task from scratch).
TASK = ["phase", "classes", "epochs", "freeze_epochs", "finetune"]


def _task(df: pd.DataFrame) -> pd.DataFrame:
    """df with TASK's columns in one comparable form (classes as text, "" for all; epochs as numbers)."""
    text = {c: df[c].astype(object).fillna("").astype(str).replace("nan", "") if c in df else ""
            for c in ("classes", "finetune")}  # fmt: skip
    return df.assign(**text,
                     epochs=pd.to_numeric(df["epochs"], errors="coerce"),
                     freeze_epochs=pd.to_numeric(df["freeze_epochs"], errors="coerce").fillna(0))  # fmt: skip


def _key(df: pd.DataFrame) -> list:
    """(TASK..., body, head) in display order: fine-tunes first, shorter schedules first, the ResNet body before
    ConvNeXt, heads in HEAD_ORDER."""
    head = {h: i for i, h in enumerate(HEAD_ORDER)}
    body = {"baseline": 0, "separate_downsampling": 1}

    def order(k: tuple) -> tuple:
        phase, classes, n_epochs, freeze, settings, b, h = k
        return (phase != "finetune", str(classes), n_epochs, freeze, settings, body.get(b, 2), str(b),
                head.get(h, len(head)), h)  # fmt: skip

    return sorted(_task(df).groupby([*TASK, "body", "head"], dropna=False).groups, key=order)


def _select(df: pd.DataFrame, key: tuple) -> pd.DataFrame:
    """The rows of df whose (TASK..., body, head) is key (or whose TASK is key, for a key of TASK's length)."""
    t = _task(df)
    mask = pd.Series(True, index=df.index)
    for col, value in zip([*TASK, "body", "head"], key):
        mask &= t[col] == value
    return df[mask]


def heads_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per task (TASK) x body x head: mean and sample std over seeds of the final and frozen top-1, and the
    mean and slowest epochs to 95 % of the final top-1."""
    rows = []
    for key in _key(table):
        phase, classes, n_epochs, freeze, settings, body, head = key
        g = _select(table, key)
        t, f, e = (pd.to_numeric(g[c], errors="coerce").dropna() for c in ("top1", "frozen_top1", "epochs_to_95"))
        rows.append({
            "phase": phase, "classes": classes, "freeze_epochs": freeze, "finetune": settings, "body": body,
            "head": head, "n": len(g),
            "top1_mean": t.mean() if len(t) else math.nan, "top1_std": t.std(ddof=1) if len(t) > 1 else math.nan,
            "frozen_top1_mean": f.mean() if len(f) else math.nan,
            "frozen_top1_std": f.std(ddof=1) if len(f) > 1 else math.nan,
            "epochs_to_95_mean": e.mean() if len(e) else math.nan, "epochs_to_95_max": e.max() if len(e) else math.nan,
            "epochs": n_epochs,
        })  # fmt: skip
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _pm(mean: float, std: float) -> str:
    """'mean ± std', '–' when missing."""
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if math.isfinite(std) else "")


def _task_title(phase: str, classes: str, epochs: float, freeze: float, settings: str) -> str:
    """'Fine-tuned on the target classes (classes 5,6,7,8,9; 6 epochs, 1 frozen; layer_decay=0.7)'."""
    what = "Fine-tuned on the target classes" if phase == "finetune" else "Trained from scratch"
    frozen = f", {freeze:.0f} frozen" if freeze > 0 else ""
    rest = f"; {settings}" if settings else ""
    return f"{what} ({f'classes {classes}' if classes else 'all classes'}; {epochs:.0f} epochs{frozen}{rest})"


def heads_markdown(summary: pd.DataFrame) -> str:
    """The summary as Markdown, one table per task (TASK)."""
    out = []
    for task in dict.fromkeys(map(tuple, summary[TASK].itertuples(index=False))):
        s = summary[(summary[TASK] == pd.Series(task, index=TASK)).all(axis=1)]
        header = (f"| body | head | n | top-1 after the frozen epochs (%) | top-1 at the end (%) | epochs to "
                  f"{TO_FINAL:.0%} of final (mean, slowest) | epochs |")  # fmt: skip
        out += [f"### {_task_title(*task)}", "", header, "|---|---|---:|---:|---:|---:|---:|"]
        for _, r in s.iterrows():
            e, e_max = r["epochs_to_95_mean"], r["epochs_to_95_max"]
            e = f"{e:.2f}, {e_max:.0f}" if math.isfinite(e) else "–"
            out.append(
                f"| {BODY_TITLE.get(r['body'], r['body'])} | {r['head']} | {int(r['n'])} | "
                f"{_pm(r['frozen_top1_mean'], r['frozen_top1_std'])} | {_pm(r['top1_mean'], r['top1_std'])} | {e} "
                f"| {r['epochs']:.0f} |"
            )
        out.append("")
    return "\n".join(out)


def heads_figure(table: pd.DataFrame, epochs: pd.DataFrame, out_stem: Path) -> Figure:
    """Three panels for the fine-tunes (else the source runs): top-1 after the frozen epochs and at the end per
    body x head (bars: seed means; dots: seeds), the learning curves (mean over seeds), and the epochs to 95 % of
    the final top-1 (dots: seeds). Writes out_stem.png/.svg and returns the Figure."""
    with mpl.rc_context(STYLE):
        return _heads_figure(table, epochs, out_stem)


def _figure_task(table: pd.DataFrame) -> tuple:
    """The task (TASK's values) the figure draws: a fine-tune's if there is one, else a run from scratch; of
    several, the one with the most runs, then the longest schedule (heads.md tables every task)."""
    t = _task(table)
    t = t[t["phase"] == ("finetune" if t["phase"].eq("finetune").any() else "pretrain")]
    sizes = t.groupby(TASK, dropna=False).size().reset_index(name="n")
    return tuple(sizes.sort_values(["n", "epochs"], ascending=False, kind="stable").iloc[0][TASK])


def _heads_figure(table: pd.DataFrame, epochs: pd.DataFrame, out_stem: Path) -> Figure:
    """heads_figure's body, run inside the style context."""
    task = _figure_task(table)
    phase, t = task[0], _select(table, task)
    keys = [k[len(TASK) :] for k in _key(t)]  # (body, head)
    fig = _new_figure((16, 6.0))
    ax_top, ax_curve, ax_ep = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.3, 1.1, 0.9]})
    x = np.arange(len(keys)) + np.array([0.6 * (k[0] != keys[0][0]) for k in keys])  # a gap between the bodies
    width = 0.38
    lows = []
    for xi, (body, head) in zip(x, keys):
        g = t[(t["body"] == body) & (t["head"] == head)]
        c = HEAD_COLOUR.get(head, "#bcbd22")
        frozen, final = (pd.to_numeric(g[col], errors="coerce").dropna() for col in ("frozen_top1", "top1"))
        for off, vals, alpha, hatch in ((-width / 2, frozen, 0.45, "///"), (width / 2, final, 0.9, None)):
            if not len(vals):
                continue
            ax_top.bar(xi + off, vals.mean(), width, color=c, alpha=alpha, hatch=hatch, edgecolor="white", lw=0.5,
                       gid=f"{'frozen' if hatch else 'final'}:{body}:{head}")  # fmt: skip
            ax_top.plot(np.full(len(vals), xi + off), vals.values, "o", color="black", ms=3, zorder=3)
            lows.append(vals.min())
        e = pd.to_numeric(g["epochs_to_95"], errors="coerce").dropna()
        if len(e):
            ax_ep.bar(xi, e.mean(), 0.7, color=c, alpha=0.9, gid=f"epochs:{body}:{head}")
            jitter = np.linspace(-0.15, 0.15, len(e)) if len(e) > 1 else np.zeros(1)
            ax_ep.plot(xi + jitter, e.values, "o", color="black", ms=3, zorder=3)
        runs = set(g["run_dir"])
        ep = epochs[epochs["run_dir"].isin(runs)].assign(top1=lambda d: pd.to_numeric(d["top1"], errors="coerce"))
        curve = ep.dropna(subset=["top1"]).groupby("epoch")["top1"].mean()
        if len(curve):
            style = "-" if body == keys[0][0] else "--"
            label = f"{BODY_TITLE.get(body, body)}, {head} (n={len(g)})"
            ax_curve.plot(curve.index, curve.values, style, color=c, marker="o", ms=3, lw=1.4, label=label,
                          gid=f"curve:{body}:{head}")  # fmt: skip
    bodies = list(dict.fromkeys(body for body, _ in keys))  # heads by colour, bodies as the x groups
    centres = [x[[i for i, k in enumerate(keys) if k[0] == body]].mean() for body in bodies]
    for ax in (ax_top, ax_ep):
        ax.set_xticks(centres, [BODY_TITLE.get(b, b) for b in bodies])
        ax.grid(True, axis="y")
    heads = list(dict.fromkeys(head for _, head in keys))
    patches = [Patch(color=HEAD_COLOUR.get(h, "#bcbd22"), label=h) for h in heads]
    if phase == "finetune":
        patches.append(Patch(facecolor="white", edgecolor="grey", hatch="///", label="after the frozen epochs"))
    ax_top.legend(handles=patches, fontsize=8, frameon=False, loc="upper left", ncol=2)
    if lows:
        top = pd.to_numeric(t["top1"], errors="coerce").max()
        ax_top.set_ylim(max(0.0, min(lows) - 3.0), min(100.0, top + 0.12 * (top - min(lows) + 3.0)))
    ax_top.set_ylabel("target top-1 (%)" if phase == "finetune" else "top-1 (%)")
    ax_top.set_title("Top-1: after the frozen epochs (hatched), at the end" if phase == "finetune" else "Top-1",
                     loc="left", fontweight="bold", fontsize=10)  # fmt: skip
    freeze = pd.to_numeric(t["freeze_epochs"], errors="coerce").max()
    if phase == "finetune" and freeze > 0:
        ax_curve.axvline(freeze, color="grey", ls=":", lw=1)
        ax_curve.text(freeze, 0.02, " end of the frozen epochs", transform=ax_curve.get_xaxis_transform(),
                      color="grey", fontsize=8)  # fmt: skip
    ax_curve.set_xlabel("epoch")
    ax_curve.set_ylabel("top-1 (%)")
    ax_curve.grid(True)
    ax_curve.xaxis.get_major_locator().set_params(integer=True)
    ax_curve.set_title("Learning curves (mean over seeds)", loc="left", fontweight="bold", fontsize=10)
    if ax_curve.get_lines():
        ax_curve.legend(fontsize=7, frameon=False, loc="best", handlelength=3.5)  # long enough to show the dashes
    ax_ep.set_ylabel(f"epochs to {TO_FINAL:.0%} of final top-1")
    ax_ep.yaxis.get_major_locator().set_params(integer=True)
    ax_ep.set_title(f"Epochs to {TO_FINAL:.0%} of final", loc="left", fontweight="bold", fontsize=10)
    n = t.groupby(["body", "head"]).size()
    seeds = f"{n.min()}" if len(n) and n.min() == n.max() else (f"{n.min()}-{n.max()}" if len(n) else "0")
    what = "fine-tuned on the target classes" if phase == "finetune" else "trained from scratch"
    plural = "" if seeds == "1" else "s"
    schedule = f"{task[2]:.0f} epochs" + (f", {task[3]:.0f} frozen" if task[3] > 0 else "")
    schedule += ", norm layers trained while frozen" if "train_norm=True" in task[4] else ""
    fig.suptitle(f"Heads x bodies, {what}, {schedule} ({seeds} seed{plural} per pair)", fontsize=13,
                 fontweight="bold")  # fmt: skip
    _save(fig, out_stem)
    return fig


def write_heads(runs: pd.DataFrame, epochs: pd.DataFrame, out: Path) -> dict[str, Path]:
    """heads.csv (one row per run), heads.md and heads.png/.svg in out for the finished heads runs among runs;
    nothing when there are none. Returns {file name: path written}."""
    table = heads_runs(runs, epochs)
    if not len(table):
        return {}
    written = {name: out / name for name in ("heads.csv", "heads.md", "heads.png", "heads.svg")}
    portable(table, out).to_csv(written["heads.csv"], index=False)
    text = heads_markdown(heads_summary(table))
    written["heads.md"].write_text(text)
    print(text)
    heads_figure(table, epochs, out / "heads")
    return written


__all__ = ["heads_figure", "heads_markdown", "heads_runs", "heads_summary", "write_heads"]
