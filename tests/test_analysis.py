"""Tests for analysis: collecting fabricated run folders, the tables, the figures, the CLI and the Hydra callback."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from ablations import ROADMAP, VARIANTS
from analysis import analyze, collect, roadmap_figure, set_plot_style, summarize
from analysis.callback import RoadmapFigureCallback
from analysis.runs import FIGURE_ORDER

REPO = Path(__file__).resolve().parents[1]
ALL_BARS = [s.name for s in ROADMAP] + list(VARIANTS)


def write_run(
    root: Path,
    bar: str,
    seed: int = 0,
    status: str | None = "finished",
    top1: float = 80.0,
    regime: str = "r50",
    epochs: int = 3,
    metrics: int | None = None,
    gflops: float = 4.2,
) -> Path:
    """Fabricate one run folder laid out like a sweep: config.yaml, complexity.json, metrics.jsonl, summary.json."""
    step = VARIANTS[bar][0] if bar in VARIANTS else bar
    run = root / bar / f"seed{seed}"
    (run / ".hydra").mkdir(parents=True)
    cfg = {
        "step": step,
        "bar": bar,
        "seed": seed,
        "regime": {"name": regime},
        "profile": "cpu",
        "data": {"name": "fashion_mnist"},
        "train": {"name": "classic" if bar == "baseline_classic" else "modern", "epochs": epochs},
        "model": {"kernel_size": 7},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))  # Hydra's copy: must not count as a run
    cx = {
        "params": 1000,
        "gflops": gflops,
        "gflops_total": gflops + 0.1,
        "activations_m": 1.0,
        "train_gflops": 3 * gflops,
    }
    (run / "complexity.json").write_text(json.dumps(cx))
    n_metrics = epochs if metrics is None else metrics
    lines = [
        {
            "epoch": e + 1,
            "train_loss": 1.0 / (e + 1),
            "lr": 0.1,
            "top1": top1 - (n_metrics - e - 1),
            "top5": 99.0,
            "epoch_s": 1.0,
            "img_per_s": 100.0,
        }
        for e in range(n_metrics)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    if status is not None:
        summary = {
            "status": status,
            "step": step,
            "bar": bar,
            "regime": regime,
            "profile": "cpu",
            "seed": seed,
            "top1": top1 if status == "finished" else None,
            "top5": 99.0,
            **cx,
            "epochs": epochs,
            "wall_s": 12.5,
            "device": "cpu",
            "code": "0123456789ab",
        }
        if status == "failed":
            summary["error"] = "RuntimeError: boom"
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def fake_top1(bar: str, seed: int) -> float:
    """A deterministic top-1 per bar and seed (seeds differ by 0.2, so std = 0.2/sqrt(2))."""
    return 85.0 + 0.25 * FIGURE_ORDER.index(bar) + 0.2 * seed


@pytest.fixture(scope="module")
def full_sweep(tmp_path_factory) -> Path:
    """13 roadmap steps + 4 variants, 2 seeds each, all finished."""
    root = tmp_path_factory.mktemp("sweep")
    for bar in ALL_BARS:
        for seed in (0, 1):
            write_run(root, bar, seed, top1=fake_top1(bar, seed), gflops=1.0 + 0.1 * FIGURE_ORDER.index(bar))
    return root


@pytest.fixture(scope="module")
def analyzed(full_sweep, tmp_path_factory):
    """analyze() on the full sweep, written to a separate folder."""
    out = tmp_path_factory.mktemp("out")
    return analyze([full_sweep], out_dir=out), out


def test_collect_finished_failed_running(tmp_path):
    """A finished, a failed and a running run: three rows with their statuses and numbers."""
    write_run(tmp_path, "baseline", status="finished", top1=81.0, epochs=3)
    write_run(tmp_path, "gelu", status="failed", epochs=3, metrics=1, top1=40.0)
    write_run(tmp_path, "large_kernel_k5", status=None, epochs=10, metrics=2, top1=55.0)
    df = collect([tmp_path])
    assert len(df) == 3
    rows = df.set_index("bar")
    assert rows.loc["baseline", "status"] == "finished"
    assert rows.loc["baseline", "top1"] == 81.0
    assert rows.loc["baseline", "epochs"] == 3 and rows.loc["baseline", "epochs_planned"] == 3
    assert rows.loc["gelu", "status"] == "failed" and "boom" in rows.loc["gelu", "error"]
    assert rows.loc["large_kernel_k5", "status"] == "running"
    assert rows.loc["large_kernel_k5", "top1"] == 55.0  # last epoch's top-1
    assert rows.loc["large_kernel_k5", "epochs"] == 2 and rows.loc["large_kernel_k5", "epochs_planned"] == 10
    assert rows.loc["large_kernel_k5", "step"] == "large_kernel"
    assert rows.loc["large_kernel_k5", "gflops"] == 4.2  # from complexity.json, no summary yet
    assert rows.loc["baseline", "recipe"] == "modern" and rows.loc["baseline", "regime"] == "r50"
    assert rows.loc["baseline", "code"] == "0123456789ab" and pd.isna(rows.loc["large_kernel_k5", "code"])
    assert list(df["bar"]) == ["baseline", "large_kernel_k5", "gelu"]  # figure order


def test_collect_tolerates_broken_folders(tmp_path):
    """Unreadable JSON, empty or torn metrics, bad YAML: rows marked, no crash, figure still drawn."""
    good = write_run(tmp_path, "baseline", top1=81.0)
    bad = write_run(tmp_path, "gelu", status=None)
    (bad / "summary.json").write_text("{not json")
    empty = write_run(tmp_path, "bn_to_ln", status=None, metrics=0)
    torn = write_run(tmp_path, "fewer_norms", status=None, metrics=2, top1=50.0)
    with open(torn / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "top')  # the trainer was mid-write
    no_cfg = tmp_path / "garbage" / "seed0"
    no_cfg.mkdir(parents=True)
    (no_cfg / "config.yaml").write_text(": : [")
    (tmp_path / "stray" / ".hydra").mkdir(parents=True)
    (tmp_path / "stray" / ".hydra" / "config.yaml").write_text("step: baseline\n")  # no trainer output: not a run
    df = collect([tmp_path, good])  # overlapping paths count each run once
    rows = df.set_index("run_dir")
    assert len(df) == 5
    assert rows.loc[str(bad.resolve()), "status"] == "broken" and math.isnan(rows.loc[str(bad.resolve()), "top1"])
    assert rows.loc[str(empty.resolve()), "status"] == "running" and rows.loc[str(empty.resolve()), "epochs"] == 0
    assert math.isnan(rows.loc[str(empty.resolve()), "top1"])
    assert rows.loc[str(torn.resolve()), "epochs"] == 2 and rows.loc[str(torn.resolve()), "top1"] == 50.0
    assert rows.loc[str(no_cfg.resolve()), "status"] == "broken"
    s = summarize(df)  # and the table and figure still come out
    assert set(s.loc[s["bar"] == "gelu", "status"]) == {"broken"}
    set_plot_style()
    fig = roadmap_figure(s, tmp_path / "fig", regime="r50")
    assert (tmp_path / "fig.png").exists() and (tmp_path / "fig.svg").exists()
    assert len(_bars(fig)) == len(s[s["regime"] == "r50"])


def _bars(fig) -> list[str]:
    """gids of the roadmap bars drawn in the left panel of a roadmap figure."""
    return [p.get_gid() for p in fig.axes[0].patches if (p.get_gid() or "").startswith("bar:")]


def test_analyze_full_table(analyzed, full_sweep):
    """The full figure (13 steps + 4 variants, 2 seeds): every output file, one CSV row per run."""
    written, out = analyzed
    for name in (
        "results.csv",
        "results.md",
        "roadmap.png",
        "roadmap.svg",
        "roadmap_flops.png",
        "roadmap_flops.svg",
        "curves.png",
        "curves.svg",
    ):
        assert name in written and (out / name).stat().st_size > 0, name
    assert not any(n.endswith("_r200.png") for n in written)
    runs = pd.read_csv(out / "results.csv")
    assert len(runs) == 2 * len(ALL_BARS)
    assert set(runs["status"]) == {"finished"}
    md = (out / "results.md").read_text()
    assert "ResNet-50 (original recipe)" in md and "kernel sz. → 9 (not adopted)" in md
    table, fid = md.split("## Fidelity")
    assert table.count("\n|") == len(ALL_BARS) + 1  # header separator + one line per bar
    # fake_top1 rises 0.25 per bar and every step's seeds are 0.2 apart: the figures follow by hand
    (rec,) = json.loads((out / "fidelity.json").read_text())["groups"]
    gap = FIGURE_ORDER.index("separate_downsampling") - FIGURE_ORDER.index("baseline")
    assert rec["headline"]["value"] == pytest.approx(0.25 * gap)
    assert rec["headline"]["se"] == pytest.approx(0.2 / math.sqrt(2))  # sqrt(s^2/2 + s^2/2) with s = 0.2/sqrt(2)
    assert rec["big_step_signs"]["text"] == "5/7"  # the paper's two falls (depthwise conv, move up) rise here
    assert rec["big_step_signs"]["disagree"] == ["depthwise_conv", "move_up_dwconv"]
    assert rec["noise_floor"]["value"] == pytest.approx(0.2 / math.sqrt(2)) and rec["missing"] == []
    assert "| big steps (paper change ≥ 0.5) with the paper's sign | 5/7;" in fid
    assert "vs paper (Table 10): headline +3.75 ± 0.14 (paper +3.15)" in (out / "roadmap.svg").read_text()


def test_summary_mean_std_and_order(full_sweep):
    """Figure order, mean/std over seeds and the paper's numbers in the summary."""
    s = summarize(collect([full_sweep]))
    assert list(s["bar"]) == FIGURE_ORDER
    assert FIGURE_ORDER[:2] == ["baseline_classic", "baseline"]
    k = FIGURE_ORDER.index("large_kernel")
    assert FIGURE_ORDER[k + 1 : k + 4] == ["large_kernel_k5", "large_kernel_k9", "large_kernel_k11"]
    row = s.set_index("bar").loc["gelu"]
    assert row["n"] == 2
    assert row["top1_mean"] == pytest.approx((fake_top1("gelu", 0) + fake_top1("gelu", 1)) / 2)
    assert row["top1_std"] == pytest.approx(0.2 / math.sqrt(2))
    assert row["paper_top1"] == 80.6 and row["paper_gflops"] == 4.2 and bool(row["adopted"])
    assert not s.set_index("bar").loc["large_kernel_k11", "adopted"]


def test_roadmap_figure_one_bar_per_summary_row(analyzed, full_sweep):
    """The roadmap SVG has exactly one bar per summary row."""
    # analyze's SVG: each bar patch carries gid "bar:<name>" (the Figure itself is checked in the broken-folder test).
    s = summarize(collect([full_sweep]))
    svg = (analyzed[1] / "roadmap.svg").read_text()
    assert svg.count('id="bar:') == len(s) == len(ALL_BARS)
    assert all(f'id="bar:{b}"' in svg for b in s["bar"])


def test_callback_writes_figures_missing_bars_and_two_regimes(tmp_path):
    """The callback analyses a sweep: both regimes' figures, missing and running bars."""
    # One sweep folder analysed through the Hydra callback, as at the end of a multirun.
    write_run(tmp_path / "a", "baseline", 0, top1=80.0)
    write_run(tmp_path / "a", "baseline", 1, top1=80.4)
    write_run(tmp_path / "a", "gelu", 0, status=None, metrics=1, epochs=4, top1=60.0)
    write_run(tmp_path / "a", "large_kernel_k5", 0, top1=70.0)
    write_run(tmp_path / "b", "baseline", 0, regime="r200", top1=82.0)
    RoadmapFigureCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    for name in (
        "roadmap.png",
        "roadmap.svg",
        "roadmap_r200.png",
        "roadmap_r200.svg",
        "roadmap_flops.png",
        "roadmap_flops_r200.svg",
        "results.md",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    assert len(pd.read_csv(tmp_path / "results.csv")) == 5
    groups = {g["regime"]: g for g in json.loads((tmp_path / "fidelity.json").read_text())["groups"]}
    assert set(groups) == {"r50", "r200"}  # one fidelity record per regime, like the figures
    missing = groups["r50"]["missing"]
    assert missing[:2] == ["stage_ratio (0 seeds)", "patchify_stem (0 seeds)"]
    assert "gelu (0 seeds; 1 running)" in missing
    assert len(missing) == 12  # every step but the baseline, which has both seeds
    r200 = groups["r200"]["headline"]
    assert r200["value"] is None and r200["reason"] == "no finished run of separate_downsampling"
    assert groups["r200"]["paper"].startswith("Table 11")
    assert "gelu (0 seeds; 1 running)" in (tmp_path / "results.md").read_text()
    s = summarize(collect([tmp_path]))
    r50 = s[s["regime"] == "r50"].set_index("bar")
    # roadmap steps without runs are listed as missing; variants (recipe, kernel sizes) only when they have runs
    steps = [st.name for st in ROADMAP]
    assert list(r50.index) == steps[:8] + ["large_kernel_k5"] + steps[8:]
    assert r50.loc["baseline", "top1_mean"] == pytest.approx(80.2)
    assert r50.loc["gelu", "status"] == "running" and r50.loc["gelu", "running_top1"] == 60.0
    assert r50.loc["stage_ratio", "status"] == "missing" and r50.loc["stage_ratio", "n"] == 0
    assert "running: 60.00" in (tmp_path / "results.md").read_text()
    assert s.set_index(["regime", "bar"]).loc[("r200", "baseline"), "title"] == "ResNet-200 (modern recipe)"


def test_callback_never_raises(tmp_path, caplog):
    """A nonexistent sweep dir or no sweep dir at all is logged, not raised."""
    cb = RoadmapFigureCallback()
    with caplog.at_level(logging.WARNING, logger="analysis.callback"):
        cb.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "nope")}}}))
        cb.on_multirun_end(OmegaConf.create({"hydra": {}}))
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


@pytest.mark.parametrize("make", [False, True])
def test_cli_bad_dir_exits_2(tmp_path, make):
    """`python -m analysis` on a missing or empty DIR: exit 2 and a one-line message."""
    target = tmp_path / "empty" if make else tmp_path / "missing"
    if make:
        target.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "analysis", str(target)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert str(target) in proc.stderr


def _written_text(folder: Path) -> dict[str, str]:
    """Every text file analyze wrote into folder."""
    return {p.name: p.read_text() for p in folder.iterdir() if p.suffix in (".csv", ".md", ".json", ".svg")}


def test_cli_writes_fidelity_and_portable_results(tmp_path):
    """`python -m analysis DIR`: fidelity.json, a Fidelity section, run folders relative to DIR, still valid after
    DIR moves; no file written names the machine's absolute path."""
    sweep = tmp_path / "sweep"
    for bar in [s.name for s in ROADMAP if s.name != "gelu"]:
        for seed in (0, 1):
            write_run(sweep, bar, seed, top1=fake_top1(bar, seed))
    proc = subprocess.run(
        [sys.executable, "-m", "analysis", str(sweep)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rec,) = json.loads((sweep / "fidelity.json").read_text())["groups"]
    assert rec["missing"] == ["gelu (0 seeds)"]
    assert rec["big_step_signs"]["not_measured"] == ["fewer_activations"]  # its previous step is gelu
    assert rec["rank_correlation"]["n_steps"] == 12
    md = (sweep / "results.md").read_text()
    assert "## Fidelity" in md and "Missing: gelu (0 seeds)" in md
    texts = _written_text(sweep)
    assert {"results.csv", "summary.csv", "results.md", "fidelity.json", "roadmap.svg", "curves.svg"} <= set(texts)
    assert not [name for name, text in texts.items() if str(tmp_path) in text]
    moved = tmp_path / "elsewhere" / "sweep"
    shutil.move(str(sweep), str(moved))
    runs = pd.read_csv(moved / "results.csv")
    assert sorted(runs["run_dir"])[:2] == ["baseline/seed0", "baseline/seed1"]
    assert all((moved / d / "summary.json").is_file() for d in runs["run_dir"])


def test_results_csv_is_an_input_and_merges(tmp_path, full_sweep):
    """A results.csv written elsewhere (--out) names runs relative to itself and redraws the same summary."""
    out = tmp_path / "docs"
    analyze([full_sweep], out_dir=out)
    runs = pd.read_csv(out / "results.csv", dtype={"code": str})
    assert not runs["run_dir"].str.startswith("/").any() and (runs["code"] == "0123456789ab").all()
    assert all((out / d / "config.yaml").is_file() for d in runs["run_dir"])  # e.g. ../../sweep0/gelu/seed1
    redrawn = tmp_path / "redrawn"
    analyze([out], out_dir=redrawn)  # a folder with a results.csv and no run folder: the CSV is read
    a, b = (pd.read_csv(d / "summary.csv") for d in (out, redrawn))
    pd.testing.assert_frame_equal(a, b)
    assert (redrawn / "fidelity.json").read_text() == (out / "fidelity.json").read_text()
    merged = collect([out / "results.csv", full_sweep])  # the same runs by CSV and by folder: counted once
    assert len(merged) == len(runs)


def test_flops_figure_plots_each_steps_gflops_and_top1(full_sweep, tmp_path):
    """The trajectory line of our panel joins (GFLOPs, mean top-1) of the 13 steps in roadmap order, and the
    paper's panel joins Fig. 2's numbers."""
    from analysis.figure import flops_figure

    s = summarize(collect([full_sweep]))
    fig = flops_figure(s, tmp_path / "flops", regime="r50")
    ours, paper = ([ln for ln in ax.lines if len(ln.get_xydata()) > 2][0].get_xydata() for ax in fig.axes[:2])
    steps = s.set_index("bar").loc[[r.name for r in ROADMAP]]
    assert ours.flatten().tolist() == pytest.approx(steps[["gflops", "top1_mean"]].to_numpy().flatten().tolist())
    assert paper.flatten().tolist() == pytest.approx([v for r in ROADMAP for v in (r.gflops["r50"], r.top1["r50"])])
    assert (tmp_path / "flops.png").exists() and (tmp_path / "flops.svg").exists()


def _label_overlaps(fig) -> list[str]:
    """Point labels of a flops figure (final layout) whose text touches a marker, an error bar or another label."""
    from matplotlib.collections import LineCollection
    from matplotlib.text import Annotation, Text

    fig.canvas.draw()
    renderer, px = fig.canvas.get_renderer(), fig.dpi / 72
    found = []
    for ax in fig.axes:
        labels = [t for t in ax.texts if isinstance(t, Annotation)]
        boxes = [Text.get_window_extent(t, renderer) for t in labels]  # the text alone, not its leader line
        marks = []
        for line in ax.get_lines():
            if line.get_marker() in (None, "None", "none", "", " "):
                continue
            r = (line.get_markersize() + line.get_markeredgewidth()) * px / 2
            xy = line.get_transform().transform(np.column_stack(line.get_data()).astype(float))
            marks += [(x - r, y - r, x + r, y + r, "marker") for x, y in xy]
        for coll in ax.collections:
            if isinstance(coll, LineCollection):
                for seg in coll.get_segments():
                    (x0, y0), (x1, y1) = coll.get_transform().transform(np.asarray(seg, dtype=float))[[0, -1]]
                    marks.append((min(x0, x1) - 0.5, min(y0, y1), max(x0, x1) + 0.5, max(y0, y1), "error bar"))
        for k, (t, bb) in enumerate(zip(labels, boxes)):
            other = [
                (o.x0, o.y0, o.x1, o.y1, f"label {u.get_text()!r}") for u, o in zip(labels[k + 1 :], boxes[k + 1 :])
            ]
            for x0, y0, x1, y1, what in marks + other:
                if bb.x0 < x1 and bb.x1 > x0 and bb.y0 < y1 and bb.y1 > y0:
                    found.append(f"{ax.get_title(loc='left')}: {t.get_text()!r} on a {what}")
    return found


def test_flops_figure_labels_clear_markers_error_bars_and_each_other(tmp_path):
    """The committed sweep's crowded kernel-size cluster (docs/results.csv): no point label touches a marker, an
    error bar or another label once the figure is laid out as saved (legend and title included)."""
    from analysis.figure import flops_figure

    s = summarize(collect([REPO / "docs" / "results.csv"]))
    fig = flops_figure(s, tmp_path / "flops", regime="r50")
    labels = [t.get_text() for ax in fig.axes[:2] for t in ax.texts if hasattr(t, "xyann")]
    assert len(labels) == 2 * 17 and labels.count("kernel sz. → 9") == 2
    assert _label_overlaps(fig) == []


def test_curves_one_line_per_bar_with_mean_top1_per_epoch(tmp_path):
    """curves.png/.svg: one top-1 and one loss line per bar; the top-1 line is the mean over seeds at each epoch;
    a running run adds its epochs, failed runs and unevaluated epochs (top1 None) are left out."""
    from analysis.curves import curves_figure

    write_run(tmp_path, "baseline", 0, top1=80.0, epochs=3)  # top-1 per epoch: 78, 79, 80
    write_run(tmp_path, "baseline", 1, top1=81.0, epochs=3)  # 79, 80, 81
    write_run(tmp_path, "gelu", 0, top1=70.0, epochs=3)
    write_run(tmp_path, "gelu", 1, status=None, top1=60.0, epochs=3, metrics=2)  # running: 59, 60
    write_run(tmp_path, "bn_to_ln", 0, status="failed", top1=10.0, epochs=3, metrics=1)
    skip = tmp_path / "gelu" / "seed0" / "metrics.jsonl"  # epoch 2 not evaluated (eval_every)
    recs = [json.loads(line) for line in skip.read_text().splitlines()]
    recs[1]["top1"] = recs[1]["top5"] = None
    skip.write_text("".join(json.dumps(r) + "\n" for r in recs))

    written = analyze([tmp_path])
    assert {"curves.png", "curves.svg"} <= set(written)
    assert (tmp_path / "curves.png").stat().st_size > 0
    fig = curves_figure(collect([tmp_path]), tmp_path / "again")
    lines = {ln.get_gid(): ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid()}
    assert set(lines) == {"top1:baseline", "top1:gelu", "train_loss:baseline", "train_loss:gelu"}
    assert lines["top1:baseline"].get_xydata().tolist() == [[1, 78.5], [2, 79.5], [3, 80.5]]
    # gelu: epoch 1 is the mean of both seeds, epoch 2 only the running seed's, epoch 3 only seed 0's
    assert lines["top1:gelu"].get_xydata().tolist() == [[1, (68 + 59) / 2], [2, 60.0], [3, 70.0]]
    assert lines["train_loss:gelu"].get_xydata()[:, 1].tolist() == pytest.approx([1.0, 0.5, 1 / 3])
    svg = (tmp_path / "curves.svg").read_text()
    assert 'id="top1:baseline"' in svg and 'id="train_loss:gelu"' in svg and 'id="top1:bn_to_ln"' not in svg


def test_epochs_csv_carries_the_learning_curves_of_a_results_csv(tmp_path, capsys):
    """analyze writes epochs.csv beside results.csv (one row per run and epoch, run folders relative to it); a
    results.csv whose run folders are gone draws the same curves from it. Without epochs.csv (a results.csv from
    before it, e.g. docs/results.csv) the curves are not drawn, an existing curves.png is kept, and it says so."""
    from analysis.curves import curves_figure
    from analysis.runs import collect_epochs

    sweep = tmp_path / "sweep"
    for bar, seed in (("baseline", 0), ("baseline", 1), ("gelu", 0)):
        write_run(sweep, bar, seed, top1=80.0 + seed + (bar == "gelu"), epochs=3)
    kept = tmp_path / "kept"
    analyze([sweep], out_dir=kept)
    ep = pd.read_csv(kept / "epochs.csv")
    assert len(ep) == 3 * 3 and list(ep.columns[:2]) == ["run_dir", "epoch"]
    first = ep[ep["run_dir"] == "../sweep/baseline/seed1"].sort_values("epoch")
    assert first["top1"].tolist() == [79.0, 80.0, 81.0] and first["train_loss"].tolist() == pytest.approx(
        [1, 0.5, 1 / 3]
    )

    def lines(fig) -> dict:
        """gid -> xy data of the curves' lines."""
        return {ln.get_gid(): ln.get_xydata().tolist() for ax in fig.axes for ln in ax.get_lines() if ln.get_gid()}

    from_folders = lines(curves_figure(collect([sweep]), tmp_path / "a"))
    shutil.rmtree(sweep)  # what docs/ keeps: the tables, not the run folders
    redrawn = tmp_path / "redrawn"
    written = analyze([kept / "results.csv"], out_dir=redrawn)
    assert "curves.png" in written and pd.read_csv(redrawn / "epochs.csv").shape == ep.shape
    runs = collect([kept])  # the results.csv, its run folders gone
    assert lines(curves_figure(runs, tmp_path / "b", epochs=collect_epochs(runs, [kept]))) == from_folders
    assert set(from_folders) == {"top1:baseline", "top1:gelu", "train_loss:baseline", "train_loss:gelu"}
    assert 'id="top1:gelu"' in (redrawn / "curves.svg").read_text()

    (kept / "epochs.csv").unlink()
    before = (kept / "curves.png").read_bytes()
    capsys.readouterr()
    written = analyze([kept / "results.csv"])  # into the same folder, as `python -m analysis docs/results.csv`
    assert "curves.png" not in written and (kept / "curves.png").read_bytes() == before
    assert "no per-epoch records in this input for any of its 3 finished runs" in capsys.readouterr().out
    fig = curves_figure(collect([kept]), tmp_path / "c")
    assert "no per-epoch records in this input" in [t.get_text() for t in fig.axes[0].texts]


def test_status_lists_finished_running_and_failed(tmp_path):
    """`python -m analysis DIR --status`: every job with epochs done/planned, top-1, status and an ETA; writes
    nothing. An unknown epoch time makes the ETA 'unknown'."""
    from analysis.status import format_status, sweep_status

    write_run(tmp_path, "baseline", 0, top1=80.0, epochs=3)
    write_run(tmp_path, "gelu", 1, status=None, top1=60.0, epochs=10, metrics=4)  # epoch_s 1.0: 6 s left
    write_run(tmp_path, "large_kernel_k5", 2, status="failed", top1=40.0, epochs=5, metrics=1)
    write_run(tmp_path, "bn_to_ln", 0, status=None, top1=50.0, epochs=10, metrics=8)  # 2 s left
    write_run(tmp_path, "stage_ratio", 0, status=None, epochs=3, metrics=0)  # no epoch yet: the sweep's 1 s/epoch
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = subprocess.run(
        [sys.executable, "-m", "analysis", str(tmp_path), "--status"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # writes nothing
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.split()[:1] != []}
    assert rows["baseline"][1:6] == ["0", "3/3", "80.00", "100", "finished"]
    assert rows["gelu"][1:7] == ["1", "4/10", "60.00", "100", "running", "6s"]
    assert rows["large_kernel_k5"][1:6] == ["2", "1/5", "40.00", "100", "failed:"]
    assert "RuntimeError: boom" in " ".join(rows["large_kernel_k5"])
    assert rows["bn_to_ln"][1:7] == ["0", "8/10", "50.00", "100", "running", "2s"]
    assert rows["stage_ratio"][1:7] == ["0", "0/3", "–", "–", "running", "3s"]
    # 11 s of work left, shared by the 3 jobs running now
    assert "5 jobs: 1 finished, 3 running, 1 failed · sweep ETA: 4s" in proc.stdout
    df = sweep_status(tmp_path)  # with no epoch time anywhere, the ETA is unknown
    df.loc[df["bar"] == "gelu", "eta_s"] = float("nan")
    assert "sweep ETA: unknown" in format_status(df)


def test_status_counts_the_jobs_a_sweep_launched_that_have_not_started(tmp_path):
    """Jobs without a folder yet are counted from the sweep folder's multirun.yaml, expanded as Hydra's basic
    sweeper expands it (here `+sweep=factorial`'s resolver: a full design of 3 steps = 8 runs, and the command
    line's seed=1 replacing the sweep file's 0,1), and the ETA counts them at the listed jobs' mean time."""
    from analysis.status import format_status, launched_jobs, not_started, sweep_status

    sweep = tmp_path / "fact"
    sweep.mkdir()
    plan = {
        "factorial": {"factors": ["gelu", "fewer_norms", "bn_to_ln"], "design": "full"},
        "hydra": {
            "sweeper": {"params": {"step": "separate_downsampling", "without": "${factorial.without:}", "seed": "0,1"}},
            "overrides": {"task": ["+sweep=factorial", "seed=1", "progress=false"]},
        },
    }
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(plan))
    assert launched_jobs(sweep) == 8
    write_run(sweep, "gelu", 1, epochs=4)  # finished: 4 epochs of 1 s
    write_run(sweep, "bn_to_ln", 1, status=None, epochs=4, metrics=1)  # running: 3 s left
    write_run(tmp_path / "other", "baseline", 0, status=None, epochs=4, metrics=2)  # no plan: 2 s left
    df = sweep_status(tmp_path)
    assert not_started(df, [tmp_path]) == 6 and not_started(df, [tmp_path / "other"]) == 0
    # (3 + 2 s left + 6 jobs x 4 s) shared by the 2 jobs running
    line = format_status(df, 6).splitlines()[-1]
    assert line == (
        "9 jobs: 1 finished, 2 running, 6 not started · sweep ETA: 14s "
        "(the 6 not started at the listed jobs' mean time, 4s)"
    )
    (sweep / "multirun.yaml").write_text("hydra: {sweeper: {params: {x: 'interval(0, 1)'}}}")  # not a grid
    assert launched_jobs(sweep) is None and not_started(df, [tmp_path]) == 0
