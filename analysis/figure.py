"""The roadmap figure (the paper's Fig. 2 with our numbers beside the paper's) and accuracy vs GFLOPs."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ablations import ROADMAP, SWIN, VARIANTS

# The paper's Fig. 2 groups the steps under these headings (left margin); we colour bars by group instead.
GROUPS = [
    ("ResNet", "#7f7f7f", ["baseline_classic", "baseline"]),
    ("macro design", "#4c72b0", ["stage_ratio", "patchify_stem"]),
    ("ResNeXt", "#dd8452", ["depthwise_conv", "increase_width"]),
    ("inverted bottleneck", "#55a868", ["inverted_bottleneck"]),
    ("large kernel", "#c44e52", ["move_up_dwconv", "large_kernel", *[v for v in VARIANTS if v.startswith("large_")]]),
    ("micro design", "#8172b3", ["gelu", "fewer_activations", "fewer_norms", "bn_to_ln", "separate_downsampling"]),
]
GROUP_OF = {bar: (label, colour) for label, colour, bars in GROUPS for bar in bars}
UNKNOWN_GROUP = ("other", "#bcbd22")
ROADMAP_NAMES = [s.name for s in ROADMAP]
ARCH = {"r50": ("ResNet-50", "ConvNeXt-T"), "r200": ("ResNet-200", "ConvNeXt-B")}
STATUS_COLOUR = {"running": "#1f77b4", "failed": "#d62728", "broken": "#d62728", "missing": "#7f7f7f"}
HATCH = "///"
LABEL_GAP = 2.0  # points of free space a point label keeps from every marker, line and error bar


STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 10,
    "legend.fontsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "grid.alpha": 0.35,
    "grid.linestyle": ":",
    "hatch.linewidth": 0.8,
    "savefig.dpi": 150,
    "svg.fonttype": "none",  # searchable, small SVGs; the tests also find bar ids and labels in them
}


def set_plot_style() -> None:
    """Make the project's figure style (readable sizes, light grid, text kept as text in SVG) the global default."""
    mpl.rcParams.update(STYLE)


def _new_figure(figsize) -> Figure:
    """A Figure on its own Agg canvas: no pyplot, so no global backend switch and nothing to close."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_stem: Path) -> list[Path]:
    """Write out_stem.png and out_stem.svg, return both paths."""
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        path = out_stem.with_name(out_stem.name + f".{ext}")
        fig.savefig(path)
        paths.append(path)
    return paths


def _colour(bar: str) -> str:
    """Group colour of a bar."""
    return GROUP_OF.get(bar, UNKNOWN_GROUP)[1]


def _for_regime(summary: pd.DataFrame, regime: str) -> pd.DataFrame:
    """Rows of one regime in figure order (all rows when the table has no regime column)."""
    s = summary
    if "regime" in s.columns:
        s = s[s["regime"] == regime]
    if "order" in s.columns:
        s = s.sort_values("order", kind="stable")
    return s.reset_index(drop=True)


def _isnum(x) -> bool:
    """True for a finite number."""
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _fmt(x, digits=1, suffix="") -> str:
    """A number for a label, an en dash when unknown."""
    return f"{float(x):.{digits}f}{suffix}" if _isnum(x) else "–"


def _zoom(values: list[float], left_room: float = 0.45, right_room: float = 0.12) -> tuple[float, float]:
    """X limits around the data, not from 0 (as in the paper), so step-to-step differences are visible."""
    values = [v for v in values if _isnum(v)]
    if not values:
        return 0.0, 100.0
    lo, hi = min(values), max(values)
    span = max(hi - lo, 0.5)
    return max(lo - left_room * span, 0.0), min(hi + right_room * span, 100.0 + right_room * span)


def _subtitle(s: pd.DataFrame) -> str:
    """What our runs are: profile, recipes, finished seeds per bar."""
    parts = []
    for col in ("profile", "recipe"):
        if col in s.columns:
            vals = sorted({v for cell in s[col].dropna() for v in str(cell).split(",") if v})
            if vals:
                parts.append(f"{col} {', '.join(vals)}")
    if "n" in s.columns and (s["n"] > 0).any():
        ns = sorted(set(s.loc[s["n"] > 0, "n"].astype(int)))
        parts.append(f"{'–'.join(map(str, [ns[0], ns[-1]] if len(ns) > 1 else ns))} seed{'s' * (ns[-1] > 1)} per bar")
    return " · ".join(parts)


def _status_label(row) -> str:
    """Short text for a bar without a finished run: what state it is in."""
    status = row.get("status", "missing")
    if status == "running":
        done, planned = row.get("epochs_done"), row.get("epochs_planned")
        ep = f" ep {int(done)}/{int(planned)}" if _isnum(done) and _isnum(planned) else ""
        top1 = f": {row['running_top1']:.1f}" if _isnum(row.get("running_top1")) else ""
        return f"running{ep}{top1}"
    if status in ("failed", "broken"):
        k = row.get("n_failed", 0) + row.get("n_broken", 0)
        return f"{status} ({int(k)} run{'s' if k != 1 else ''})" if _isnum(k) and k else status
    return "finished, no top-1 recorded" if status == "finished" else "missing"


def roadmap_figure(
    summary: pd.DataFrame, out_stem: Path, regime: str = "r50", caption: str | None = None, roadmap: str = "paper"
) -> Figure:
    """The roadmap as horizontal bars (ours | numbers | paper), written to out_stem.png/.svg; returns the Figure.

    Every bar of the summary gets exactly one bar patch in the left panel with gid 'bar:<name>' (zero width
    when there is nothing to show), so callers can count bars in the Figure or in the SVG. caption (e.g. the
    fidelity line of analysis.fidelity.fidelity_caption) is drawn in a box under the title, with gid 'caption'.
    Bars are drawn in the summary's order column: the paper's figure order, or another roadmap's own (named in the
    title when it is not the paper's).
    """
    with mpl.rc_context(STYLE):  # the project style without changing the caller's global rcParams
        return _roadmap_figure(summary, out_stem, regime, caption, roadmap)


def _roadmap_figure(
    summary: pd.DataFrame, out_stem: Path, regime: str, caption: str | None = None, roadmap: str = "paper"
) -> Figure:
    """roadmap_figure's body, run inside the style context."""
    s = _for_regime(summary, regime)
    n = len(s)
    big, small = ARCH.get(regime, ("ResNet", "ConvNeXt"))
    fig, ax, axt, axp, axpt = _roadmap_axes(n, caption)
    finished = s["status"].eq("finished") & s["top1_mean"].map(_isnum) if n else pd.Series(dtype=bool)
    std = s["top1_std"].where(s["top1_std"].map(_isnum), 0.0) if n else pd.Series(dtype=float)
    ends = list(s.loc[finished, "top1_mean"] + std[finished]) + list(s.loc[finished, "top1_mean"] - std[finished])
    if n:
        ends += [v for v in s.loc[s["status"].eq("running"), "running_top1"] if _isnum(v)]
    x0, x1 = _zoom(ends)

    for i, row in s.iterrows():
        if i % 2 == 0:  # zebra rows across all three panels so a row can be followed from label to paper value
            for a in (ax, axt, axp, axpt):
                a.axhspan(i - 0.5, i + 0.5, color="#f2f2f2", zorder=0, lw=0)
        if finished.iloc[i]:
            _result_bar(ax, i, row, x0)
        else:
            _unfinished_bar(ax, i, row, x0, x1)
        _numbers_row(axt, i, row, finished.iloc[i])

    ax.set_xlim(x0, x1)
    ax.set_ylim(max(n, 1) - 0.5, -0.5)  # first bar at the top, as in the paper
    ax.set_yticks(np.arange(n), list(s["title"]) if n else [])
    ax.set_xlabel("top-1 accuracy (%), mean ± std over seeds")
    ax.set_title(f"Ours ({regime})", loc="left", fontweight="bold")
    ax.set_title(_subtitle(s), loc="right", fontsize=8.5, color="dimgrey")
    ax.grid(axis="x", zorder=1)
    ax.tick_params(axis="y", length=0)
    if not n:
        ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center", color="grey")

    _column_headers(axt, [(0.04, "left", "top-1"), (0.50, "left", "GFLOPs"), (0.97, "right", "n")] if n else [])

    _paper_panel(axp, axpt, s, regime)
    name = (
        "the modernization roadmap" if roadmap == "paper" else f"roadmap {roadmap!r} (the paper's steps, another order)"
    )
    fig.suptitle(f"{big} → {small}: {name}", fontsize=13, fontweight="bold")
    _roadmap_legend(fig, s, regime)
    _save(fig, out_stem)
    return fig


def _roadmap_axes(n: int, caption: str | None):
    """The roadmap figure for n bars: (figure, our bars, our numbers, the paper's bars, the paper's numbers), all
    sharing the rows' y axis; with a caption, the fidelity box in its own row under the title, across all panels."""
    body = 1.9 + 0.36 * max(n, 3)
    cap = 0.22 * (caption.count("\n") + 1) + 0.2 if caption else 0.0  # inches for the caption row
    fig = _new_figure((14, body + cap))
    heights = [cap, body] if caption else [body]
    gs = fig.add_gridspec(len(heights), 4, width_ratios=[4.3, 1.6, 2.6, 1.05], height_ratios=heights)
    ax = fig.add_subplot(gs[-1, 0])
    axt = fig.add_subplot(gs[-1, 1], sharey=ax)  # our numbers
    axp = fig.add_subplot(gs[-1, 2], sharey=ax)  # the paper's bars
    axpt = fig.add_subplot(gs[-1, 3], sharey=ax)  # the paper's numbers
    if caption:
        axc = fig.add_subplot(gs[0, :])
        axc.axis("off")
        axc.text(
            0.0,
            0.5,
            caption,
            transform=axc.transAxes,
            ha="left",
            va="center",
            fontsize=9.5,
            gid="caption",
            bbox={"boxstyle": "round,pad=0.4", "facecolor": "#fff8e1", "edgecolor": "#d9a400", "linewidth": 0.8},
        )
    return fig, ax, axt, axp, axpt


def _result_bar(ax, i: int, row, x0: float) -> None:
    """A finished bar from x0 to its mean top-1, std as the error bar; hatched and paler when not adopted."""
    colour, adopted = _colour(row["bar"]), bool(row.get("adopted", True))
    hatch = None if adopted else HATCH
    err = row["top1_std"] if _isnum(row["top1_std"]) else None
    ax.barh(
        i,
        row["top1_mean"] - x0,
        left=x0,
        height=0.68,
        color=colour,
        alpha=0.5 if hatch else 0.9,
        hatch=hatch,
        edgecolor="white" if hatch else colour,
        linewidth=0.6,
        xerr=err,
        error_kw={"ecolor": "black", "capsize": 2.5, "elinewidth": 1},
        gid=f"bar:{row['bar']}",
        zorder=2,
    )


def _unfinished_bar(ax, i: int, row, x0: float, x1: float) -> None:
    """A bar without a result: outline only, so it cannot be mistaken for one (as far as a running job's last
    evaluation), with its status in words."""
    status = row.get("status", "missing")
    partial = status == "running" and _isnum(row.get("running_top1"))
    width = max(row["running_top1"] - x0, 0.0) if partial else 0.0
    colour = STATUS_COLOUR.get(status, "grey")
    ax.barh(
        i,
        width,
        left=x0,
        height=0.68,
        fill=False,
        edgecolor=colour,
        linestyle="--",
        linewidth=1.0,
        gid=f"bar:{row['bar']}",
        zorder=2,
    )
    ax.text(
        x0 + 0.01 * (x1 - x0),
        i,
        _status_label(row),
        va="center",
        ha="left",
        fontsize=8.5,
        style="italic",
        color=colour,
        zorder=3,
    )


def _numbers_row(axt, i: int, row, finished: bool) -> None:
    """Our numbers beside bar i: top-1 ± std, GFLOPs, and n (finished runs; "finished/all" in red when some runs of
    the bar failed or are still going)."""
    axt.text(
        0.04,
        i,
        _fmt(row["top1_mean"], 1) + (f" ± {row['top1_std']:.1f}" if _isnum(row["top1_std"]) else ""),
        va="center",
        ha="left",
        fontsize=9,
        color="black" if finished else "grey",
    )
    axt.text(
        0.50,
        i,
        _fmt(row["gflops"], 2 if _isnum(row["gflops"]) and row["gflops"] < 10 else 1),
        va="center",
        ha="left",
        fontsize=9,
    )
    total = sum(int(row.get(k, 0) or 0) for k in ("n", "n_failed", "n_running", "n_broken"))
    n_done = int(row.get("n", 0) or 0)
    axt.text(
        0.97,
        i,
        f"{n_done}/{total}" if total != n_done else f"{n_done}",
        va="center",
        ha="right",
        fontsize=9,
        color="#d62728" if total != n_done else "black",
    )


def _column_headers(axt, headers: list[tuple[float, str, str]]) -> None:
    """Bold headers above a numbers column (an axes with the axis switched off)."""
    axt.set_xlim(0, 1)
    axt.axis("off")
    for x, ha, label in headers:
        axt.text(x, -0.75, label, ha=ha, va="bottom", fontsize=9, fontweight="bold", clip_on=False)


def _paper_panel(axp, axpt, s: pd.DataFrame, regime: str) -> None:
    """Right-hand panels: the paper's ImageNet-1K top-1 bars for the same bars, and its top-1/GFLOPs as numbers."""
    top = [v for v in s.get("paper_top1", []) if _isnum(v)]
    swin = SWIN.get(regime)
    p0, p1 = _zoom(top + ([swin[1]] if swin and top else []), left_room=0.3, right_room=0.08)
    has_gflops = len(s) > 0 and s["paper_gflops"].map(_isnum).any()  # the paper gives r200 GFLOPs nowhere
    for i, row in s.iterrows():
        if not _isnum(row.get("paper_top1")):
            axp.text(p0 + 0.01 * (p1 - p0), i, "not in paper", va="center", fontsize=8.5, style="italic", color="grey")
            continue
        adopted, colour = bool(row.get("adopted", True)), _colour(row["bar"])
        axp.barh(
            i,
            row["paper_top1"] - p0,
            left=p0,
            height=0.68,
            color=colour,
            alpha=0.35 if adopted else 0.25,
            hatch=None if adopted else HATCH,
            edgecolor=colour,
            linewidth=0.6,
            zorder=2,
        )
        axpt.text(0.08, i, f"{row['paper_top1']:.1f}", va="center", ha="left", fontsize=9)
        if has_gflops:
            axpt.text(0.62, i, _fmt(row.get("paper_gflops"), 1), va="center", ha="left", fontsize=9)
    if swin and top:
        axp.axvline(swin[1], color="black", linestyle="--", linewidth=0.9, zorder=3)
    axp.set_xlim(p0, p1)
    axp.set_xlabel("ImageNet-1K top-1 (%)")
    axp.set_title("Paper (Liu et al. 2022, Fig. 2)", loc="left", fontweight="bold")
    axp.grid(axis="x", zorder=1)
    axp.tick_params(axis="y", left=False, labelleft=False)
    headers = [(0.08, "left", "top-1"), *([(0.62, "left", "GFLOPs")] if has_gflops else [])]
    _column_headers(axpt, headers if len(s) else [])


def _roadmap_legend(fig: Figure, s: pd.DataFrame, regime: str) -> None:
    """Legend under the panels: groups present, hatch = not adopted, dashed = Swin, outline = unfinished."""
    bars = set(s["bar"]) if len(s) else set()
    handles = [Patch(color=c, label=label) for label, c, members in GROUPS if bars & set(members)]
    if bars - set(GROUP_OF):
        handles.append(Patch(color=UNKNOWN_GROUP[1], label=UNKNOWN_GROUP[0]))
    if len(s) and not s["adopted"].astype(bool).all():
        handles.append(Patch(facecolor="white", edgecolor="grey", hatch=HATCH, label="not adopted"))
    if len(s) and s["status"].ne("finished").any():
        handles.append(Patch(fill=False, edgecolor="grey", linestyle="--", label="no finished run yet"))
    swin = SWIN.get(regime)
    if swin:
        handles.append(Line2D([], [], color="black", linestyle="--", label=f"{swin[0]} (paper): {swin[1]:.1f}"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), frameon=False)


def _obstacles(ax, renderer) -> np.ndarray:
    """Display-space boxes (x0, y0, x1, y1) covering the markers, lines, error bars and texts already in ax."""
    boxes = [tuple(t.get_window_extent(renderer).extents) for t in ax.texts]

    def trace(xy: np.ndarray, joined: bool, r: float) -> None:
        """Boxes along a polyline (sampled every few pixels) or around each vertex."""
        xy = xy[np.isfinite(xy).all(axis=1)]
        if joined and len(xy) > 1:
            for a, b in zip(xy[:-1], xy[1:]):
                k = max(int(np.hypot(*(b - a)) / 3), 1)
                xy = np.vstack([xy, a + np.linspace(0, 1, k + 1)[:, None] * (b - a)])
        boxes.extend((x - r, y - r, x + r, y + r) for x, y in xy)

    px = ax.figure.dpi / 72  # marker sizes are in points
    gap = LABEL_GAP * px  # a label that only grazes a marker or an error bar still reads as sitting on it
    for line in ax.get_lines():
        xy = line.get_transform().transform(np.column_stack(line.get_data()).astype(float))
        joined = line.get_linestyle() not in ("None", "none", "", " ")
        if joined:
            trace(xy, True, gap)
        if line.get_marker() not in (None, "None", "none", "", " "):  # half the marker plus its edge
            trace(xy, False, (line.get_markersize() + line.get_markeredgewidth()) * px / 2 + gap)
    for coll in ax.collections:  # error bars
        if isinstance(coll, LineCollection):
            for seg in coll.get_segments():
                trace(coll.get_transform().transform(np.asarray(seg, dtype=float)), True, gap)
    return np.array(boxes, dtype=float).reshape(-1, 4)


# Point labels are placed by our own search over fixed spots around each point (below) rather than by adjustText,
# the library for this: on the committed sweep's crowded kernel-size cluster (docs/results.csv) adjustText 1.4's
# force-based moves left labels on lines and error bars and took several times as long; this search is
# deterministic and its cost says exactly what a label may not cover.
LEADER_FROM = 12  # offsets (points) beyond which a label gets a leader line to its point
# What a label spot costs, against its distance from the point in points: a box on a marker, line, error bar or label
# (each obstacle box it touches), a leader line through another label or across another leader, or through a marker
# or line (per 3 px).
COST = {"box": 1000, "leader_label": 100, "tangle": 30, "leader_mark": 3, "distance": 2}
SPOT_RADII = (6, 9, 12, 16, 20, 25, 30, 36, 42, 50, 60, 72)  # points from the point to the label's anchor
# beside, above/below, then ever finer diagonals: equal costs go to the earlier, so labels prefer the plain sides
SPOT_ANGLES = (0, 180, 90, 270, 30, 150, 330, 210, 60, 120, 300, 240, 15, 165, 345, 195, 45, 135, 315, 225, 75, 105,
               285, 255)  # fmt: skip
UNTANGLE_TOP = 15  # spots per label tried jointly when two leaders cross
PLACEMENT_SWEEPS = 4  # passes that move each label to its best spot given the others (usually 1-2 change anything)


def _hits(taken: np.ndarray, box) -> int:
    """How many obstacle boxes overlap box (x0, y0, x1, y1)."""
    return int(
        np.count_nonzero(
            (taken[:, 0] < box[2]) & (taken[:, 2] > box[0]) & (taken[:, 1] < box[3]) & (taken[:, 3] > box[1])
        )
    )


def _leader(point, box, skip: float) -> np.ndarray:
    """Pixels sampled along the leader line from the label's box to its point: outside the box, and farther than
    skip from the point (the point's own marker), every 3 px."""
    (x, y), centre = np.asarray(point, dtype=float), np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    k = max(int(np.hypot(*(centre - (x, y))) / 3), 1)
    xy = (x, y) + np.linspace(0, 1, k + 1)[:, None] * (centre - (x, y))
    inside = (xy[:, 0] >= box[0]) & (xy[:, 0] <= box[2]) & (xy[:, 1] >= box[1]) & (xy[:, 1] <= box[3])
    return xy[~inside & (np.hypot(xy[:, 0] - x, xy[:, 1] - y) > skip)]


def _leader_hits(taken: np.ndarray, xy: np.ndarray) -> int:
    """How many leader pixels xy fall in an obstacle box (a leader through another label or marker)."""
    if not len(xy) or not len(taken):
        return 0
    inside = (
        (taken[None, :, 0] <= xy[:, None, 0])
        & (xy[:, None, 0] <= taken[None, :, 2])
        & (taken[None, :, 1] <= xy[:, None, 1])
        & (xy[:, None, 1] <= taken[None, :, 3])
    )
    return int(inside.any(axis=1).sum())


def _overlaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) booleans: which boxes (x0, y0, x1, y1) of a overlap which of b."""
    return (
        (a[:, None, 0] < b[None, :, 2])
        & (a[:, None, 2] > b[None, :, 0])
        & (a[:, None, 1] < b[None, :, 3])
        & (a[:, None, 3] > b[None, :, 1])
    )


def _crossings(mine: np.ndarray, lines: np.ndarray) -> np.ndarray:
    """For each segment of mine (S, 2, 2), how many of lines (n, 2, 2) it crosses."""
    if not len(lines) or not len(mine):
        return np.zeros(len(mine), dtype=int)
    p, r = mine[:, None, 0], mine[:, None, 1] - mine[:, None, 0]  # (S, 1, 2)
    q, t = lines[None, :, 0], lines[None, :, 1] - lines[None, :, 0]  # (1, n, 2)
    den = r[..., 0] * t[..., 1] - r[..., 1] * t[..., 0]
    ok = np.abs(den) > 1e-9  # parallel: they may overlap, but a leader pair at one angle reads as one line anyway
    den = np.where(ok, den, 1.0)
    u = ((q[..., 0] - p[..., 0]) * t[..., 1] - (q[..., 1] - p[..., 1]) * t[..., 0]) / den
    v = ((q[..., 0] - p[..., 0]) * r[..., 1] - (q[..., 1] - p[..., 1]) * r[..., 0]) / den
    return (ok & (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)).sum(axis=1)


def _spots(x_d: float, y_d: float, w: float, h: float, frame, px: float, skip: float) -> list[tuple]:
    """Candidate spots for a w x h label of the point (x_d, y_d), nearest first, inside frame: (dx, dy in points,
    ha, va, radius, box in pixels, leader pixels outside the point's marker, the leader's whole segment)."""
    out = []
    for r in SPOT_RADII:
        for a in SPOT_ANGLES:
            dx, dy = r * math.cos(math.radians(a)), r * math.sin(math.radians(a))
            ha = "left" if dx > 1 else "right" if dx < -1 else "center"
            va = "bottom" if dy > 1 else "top" if dy < -1 else "center"
            x0 = x_d + dx * px - {"left": 0, "right": w, "center": w / 2}[ha]
            y0 = y_d + dy * px - {"bottom": 0, "top": h, "center": h / 2}[va]
            box = (x0, y0, x0 + w, y0 + h)
            if box[0] < frame.x0 or box[2] > frame.x1 or box[1] < frame.y0 or box[3] > frame.y1:
                continue
            leader = _leader((x_d, y_d), box, skip) if r > LEADER_FROM else np.empty((0, 2))
            line = np.vstack([(x_d, y_d), leader[-1]]) if len(leader) else np.empty((0, 2))  # point to box edge
            out.append((dx, dy, ha, va, r, box, leader, line))
    if not out:  # no spot inside the axes at all: beside the point anyway
        box = (x_d, y_d - h / 2, x_d + w, y_d + h / 2)
        out.append((6, 0, "left", "center", 6, box, np.empty((0, 2)), np.empty((0, 2))))
    return out


class _Placement:
    """Which candidate spot each label takes, and what its spots cost given the others (see _place_labels).

    Costs are computed for all spots of a label at once (numpy), from arrays built once per label: spot boxes
    (S, 4), leader pixels padded to (S, M, 2) with a mask, leader segments (S, 2, 2), the cost against the fixed
    obstacles (S,)."""

    def __init__(self, fixed: np.ndarray, spots: list[list[tuple]]):
        self.spots = spots
        self.choice: list[int | None] = [None] * len(spots)
        self.boxes, self.pixels, self.mask, self.lines, self.has_line, self.alone = [], [], [], [], [], []
        for spot_list in spots:
            m = max([len(sp[6]) for sp in spot_list] + [1])
            pixels, mask = np.zeros((len(spot_list), m, 2)), np.zeros((len(spot_list), m), dtype=bool)
            for k, sp in enumerate(spot_list):
                pixels[k, : len(sp[6])], mask[k, : len(sp[6])] = sp[6], True
            self.boxes.append(np.array([sp[5] for sp in spot_list], dtype=float))
            self.pixels.append(pixels)
            self.mask.append(mask)
            self.lines.append(np.array([sp[7] if len(sp[7]) else np.zeros((2, 2)) for sp in spot_list], dtype=float))
            self.has_line.append(np.array([len(sp[7]) > 0 for sp in spot_list]))
            self.alone.append(  # the fixed obstacles are thousands of boxes: counted once per spot
                np.array(
                    [
                        COST["box"] * _hits(fixed, sp[5])
                        + COST["leader_mark"] * _leader_hits(fixed, sp[6])
                        + COST["distance"] * sp[4]
                        for sp in spot_list
                    ]
                )
            )

    def costs(self, i: int) -> np.ndarray:
        """What each spot costs label i, with every other placed label where it stands now."""
        placed = [(j, c) for j, c in enumerate(self.choice) if c is not None and j != i]
        if not placed:
            return self.alone[i]
        boxes = np.array([self.boxes[j][c] for j, c in placed])  # (k, 4)
        pixels = np.vstack([self.pixels[j][c][self.mask[j][c]] for j, c in placed])  # (m, 2)
        lines = np.array([self.lines[j][c] for j, c in placed if self.has_line[j][c]]).reshape(-1, 2, 2)
        mine = self.boxes[i]
        on_labels = _overlaps(mine, boxes).sum(axis=1)
        px, inside = self.pixels[i], np.zeros(self.mask[i].shape, dtype=bool)
        for b in boxes:  # my leader through another label, pixel by pixel
            inside |= (b[0] <= px[..., 0]) & (px[..., 0] <= b[2]) & (b[1] <= px[..., 1]) & (px[..., 1] <= b[3])
        through = (inside & self.mask[i]).sum(axis=1)
        crossed = (  # other leaders through my box
            (mine[:, None, 0] <= pixels[None, :, 0])
            & (pixels[None, :, 0] <= mine[:, None, 2])
            & (mine[:, None, 1] <= pixels[None, :, 1])
            & (pixels[None, :, 1] <= mine[:, None, 3])
        ).sum(axis=1)
        tangled = _crossings(self.lines[i], lines) * self.has_line[i]
        return (
            self.alone[i]
            + COST["box"] * on_labels
            + COST["leader_label"] * (through + crossed)
            + COST["tangle"] * tangled
        )

    def settle(self, order: list[int]) -> None:
        """Greedy in order, then sweeps moving each label to its cheapest spot given the others, until none moves."""
        for sweep in range(PLACEMENT_SWEEPS + 1):
            moved = False
            for i in order:
                costs = self.costs(i)
                best = int(np.argmin(costs))  # the first of equal costs: the nearest spot
                if self.choice[i] is None or costs[best] < costs[self.choice[i]]:
                    moved |= self.choice[i] is not None
                    self.choice[i] = best
            if sweep and not moved:
                break

    def untangle(self) -> None:
        """Two labels whose leaders cross move together: one at a time, they cannot swap sides."""
        for i, j in itertools.combinations(range(len(self.spots)), 2):
            a, b = self.choice[i], self.choice[j]
            if not (self.has_line[i][a] and self.has_line[j][b]):
                continue
            if not _crossings(self.lines[i][a : a + 1], self.lines[j][b : b + 1])[0]:
                continue
            self.choice[i] = self.choice[j] = None
            top_i = [a, *np.argsort(self.costs(i), kind="stable")[:UNTANGLE_TOP].tolist()]
            top_j = [b, *np.argsort(self.costs(j), kind="stable")[:UNTANGLE_TOP].tolist()]
            cost_i = {}  # i's cost at each spot p with j at q, then j's with i at p
            for q in top_j:
                self.choice[j] = q
                cost_i[q] = self.costs(i)
            self.choice[j] = None
            cost_j = {}
            for p in top_i:
                self.choice[i] = p
                cost_j[p] = self.costs(j)
            pairs = [(cost_i[q][p] + cost_j[p][q], p, q) for p in top_i for q in top_j]
            _, self.choice[i], self.choice[j] = min(pairs, key=lambda t: t[0])  # ties: the spots they had


def _place_labels(fig: Figure, ax, points: list[tuple[float, float, str, str]], fontsize: float = 8) -> None:
    """Label points without overlaps: every label takes the cheapest of the spots around its point.

    A spot costs its distance plus COST for what it would cover: the label's box on a marker, line, error bar or
    another label (keeping LABEL_GAP from each), its leader line (far labels) through another label, across another
    leader or through a marker, another label's leader through its box. Labels of crowded points are placed first,
    then each is moved to its cheapest spot given all the others until none moves, and two whose leaders still
    cross are re-placed together: one greedy pass lets an early label take the only free spot of a later one. A
    label overlaps something only where no spot in reach is free. Call it once the figure is complete (legend,
    titles): labels sit at offsets in points, so a later change of the axes' size would move points under them.
    """
    # ---- geometry: final layout, fixed obstacles, each label's candidate spots
    fig.canvas.draw()  # settles the constrained layout so display coordinates are final
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    px = fig.dpi / 72  # offsets are in points, boxes in pixels
    skip = 7 * px  # a leader ends 3 points short of its point, which sits inside its own marker
    xy = np.array([ax.transData.transform((x, y)) for x, y, _, _ in points], dtype=float).reshape(-1, 2)
    spots = []
    for (_, _, label, _), (x_d, y_d) in zip(points, xy):
        probe = ax.text(0, 0, label, fontsize=fontsize)  # measured, never drawn
        bb = probe.get_window_extent(renderer)
        probe.remove()
        spots.append(_spots(x_d, y_d, bb.width + 2, bb.height + 2, frame, px, skip))

    # ---- choose: crowded points first, their few free spots go to them and not to a neighbour that had room
    near = (np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1]) < 40 * px).sum(axis=1)
    placement = _Placement(_obstacles(ax, renderer), spots)
    placement.settle(sorted(range(len(points)), key=lambda i: -near[i]))
    placement.untangle()

    # ---- draw
    for (x, y, label, colour), spot_list, c in zip(points, spots, placement.choice):
        dx, dy, ha, va, r = spot_list[c][:5]
        arrow = {"arrowstyle": "-", "color": colour, "lw": 0.6, "shrinkA": 1, "shrinkB": 3} if r > LEADER_FROM else None
        # Far from its point (or points that coincide): a leader line says which point the label belongs to.
        t = ax.annotate(
            label,
            (x, y),
            xytext=(dx, dy),
            textcoords="offset points",
            ha=ha,
            va=va,
            fontsize=fontsize,
            color=colour,
            zorder=5,
            arrowprops=arrow,
        )
        t.set_in_layout(False)


def _trajectory(
    ax,
    s: pd.DataFrame,
    xcol: str,
    ycol: str,
    ecol: str | None,
    title: str,
    xlabel: str,
    empty: str = "no finished runs",
) -> list[tuple[float, float, str, str]]:
    """One accuracy-vs-GFLOPs panel: roadmap steps joined in order, variants as open markers; returns the point
    labels (x, y, text, colour) for _place_labels, which must run once the whole figure is laid out."""
    pts = s[s[xcol].map(_isnum) & s[ycol].map(_isnum)] if len(s) else s
    if not len(pts):
        ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", color="grey")
        ax.set_title(title, loc="left", fontweight="bold")
        ax.set_xticks([])
        ax.set_yticks([])
        return []
    main = pts[pts["bar"].isin(ROADMAP_NAMES)]
    # joined in the order the roadmap walks them (the order column: the paper's, or a custom roadmap's)
    key = main["order"] if "order" in main.columns else main["bar"].map(ROADMAP_NAMES.index)
    main = main.assign(_k=key).sort_values("_k", kind="stable")
    ax.plot(main[xcol], main[ycol], "-", color="#555555", linewidth=1, zorder=2)
    labels = []
    for _, row in pts.iterrows():
        colour = _colour(row["bar"])
        on_path = row["bar"] in ROADMAP_NAMES
        err = row[ecol] if ecol and _isnum(row.get(ecol)) else None
        ax.errorbar(
            row[xcol],
            row[ycol],
            yerr=err,
            fmt="o",
            ms=6,
            mfc=colour if on_path else "white",
            mec=colour,
            mew=1.4,
            ecolor=colour,
            elinewidth=1,
            capsize=2,
            zorder=3,
        )
        labels.append((row[xcol], row[ycol], row["title"], colour))
    ax.set_title(title, loc="left", fontweight="bold")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 (%)")
    ax.grid(True)
    ax.margins(x=0.25, y=0.18)  # room for labels inside the axes
    return labels


def flops_figure(summary: pd.DataFrame, out_stem: Path, regime: str = "r50") -> Figure:
    """Top-1 vs GFLOPs, ours beside the paper's, steps joined in roadmap order; writes out_stem.png/.svg."""
    with mpl.rc_context(STYLE):
        return _flops_figure(summary, out_stem, regime)


def _flops_figure(summary: pd.DataFrame, out_stem: Path, regime: str) -> Figure:
    """flops_figure's body, run inside the style context."""
    s = _for_regime(summary, regime)
    big, small = ARCH.get(regime, ("ResNet", "ConvNeXt"))
    fig = _new_figure((14, 6.2))
    ax, axp = fig.subplots(1, 2)
    ours = s[s["status"].eq("finished")] if len(s) else s
    labels = _trajectory(
        ax, ours, "gflops", "top1_mean", "top1_std", f"Ours ({regime})", "GFLOPs (the step at 224 px, full width)"
    )
    swin = SWIN.get(regime)
    if swin and len(s) and s["paper_gflops"].map(_isnum).any():  # drawn first so labels avoid it
        axp.axhline(swin[1], color="black", linestyle="--", linewidth=0.8, zorder=1)
        axp.text(
            0.01,
            swin[1],
            f" {swin[0]} {swin[1]:.1f} ({swin[2]} GF)",
            transform=axp.get_yaxis_transform(),
            va="bottom",
            fontsize=8,
        )
    paper_labels = _trajectory(
        axp,
        s,
        "paper_gflops",
        "paper_top1",
        None,
        "Paper (ImageNet-1K, 224²)",
        "GFLOPs",
        empty="the paper gives no GFLOPs for this regime",
    )
    grey = "#555555"
    handles = [
        Line2D([], [], marker="o", color=grey, mfc=grey, label="roadmap step (joined in order)"),
        Line2D([], [], marker="o", linestyle="", color=grey, mfc="white", label="variant (not on the path)"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, frameon=False)
    fig.suptitle(f"{big} → {small}: accuracy vs. compute", fontsize=13, fontweight="bold")
    # Labels last: the legend and the title shrink the axes, which moves every point relative to a label placed
    # before them (labels sit at fixed offsets in points), so they would land on markers and error bars.
    _place_labels(fig, ax, labels)
    _place_labels(fig, axp, paper_labels)
    _save(fig, out_stem)
    return fig


__all__ = ["GROUPS", "STYLE", "flops_figure", "roadmap_figure", "set_plot_style"]
