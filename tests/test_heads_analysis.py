"""The heads / fine-tuning analysis (analysis.heads, issue 26) on fabricated +sweep=heads / heads_finetune folders:
the per-run numbers (frozen top-1, epochs to 95 %), the summary over seeds, the figure, and that heads runs stay out
of the roadmap's bars."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis import analyze
from analysis.heads import heads_runs, heads_summary
from analysis.runs import collect, collect_epochs, is_transfer

BODIES = ("baseline", "separate_downsampling")
HEADS = ("linear", "fastai_convnext")


def curve(body: str, head: str, seed: int, fine: bool) -> list[float]:
    """A planted 4-epoch top-1 curve: the ConvNeXt body starts lower and catches up late (it reaches 95 % of its
    final top-1 at epoch 3, the ResNet at epoch 1); fastai_convnext adds 1 point; seeds differ by 0.5."""
    base = [90.0, 91.0, 92.0, 92.5] if body == "baseline" else [70.0, 80.0, 89.0, 93.0]
    return [v + (1.0 if head == "fastai_convnext" else 0.0) + 0.5 * seed - (0.0 if fine else 3.0) for v in base]


def write_heads_run(root: Path, body: str, head: str, seed: int, fine: bool) -> Path:
    """One finished run folder as the heads sweeps lay them out (config.yaml, summary.json, metrics.jsonl)."""
    run = root / ("finetune" if fine else "pretrain") / f"{body}_{head}" / f"seed{seed}"
    run.mkdir(parents=True)
    top1 = curve(body, head, seed, fine)
    cfg = {
        "step": body, "bar": body, "seed": seed, "regime": {"name": "r50"}, "profile": "cpu",
        "data": {"name": "fashion_mnist", "classes": [5, 6, 7, 8, 9] if fine else [0, 1, 2, 3, 4]},
        "train": {"name": "modern", "epochs": len(top1)}, "model": {"head": head, "head_norm": False},
        "pretrained": f"runs/sweeps/heads/pretrain/{body}_{head}/seed{seed}" if fine else None,
        "finetune": {"freeze_epochs": 1 if fine else 0},
    }  # fmt: skip
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = [{"epoch": e + 1, "train_loss": 1.0, "lr": 0.1, "top1": t, "top5": 99.0, "epoch_s": 1.0,
              "img_per_s": 100.0} for e, t in enumerate(top1)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    summary = {"status": "finished", "step": body, "bar": body, "seed": seed, "top1": top1[-1], "epochs": len(top1),
               "params": 1000, "gflops": 1.0}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def heads_sweeps(tmp_path) -> Path:
    """Both stages of the heads sweep, 2 bodies x 2 heads x 2 seeds each."""
    for fine in (False, True):
        for body in BODIES:
            for head in HEADS:
                for seed in (0, 1):
                    write_heads_run(tmp_path / "heads", body, head, seed, fine)
    return tmp_path / "heads"


def test_heads_runs_frozen_top1_and_epochs_to_95(heads_sweeps):
    runs = collect([heads_sweeps])
    assert is_transfer(runs).all()
    table = heads_runs(runs, collect_epochs(runs))
    assert len(table) == 16 and set(table["phase"]) == {"pretrain", "finetune"}
    for _, r in table.iterrows():
        c = curve(r["body"], r["head"], int(r["seed"]), r["phase"] == "finetune")
        assert r["top1"] == pytest.approx(c[-1])
        if r["phase"] == "finetune":
            assert r["frozen_top1"] == pytest.approx(c[0])  # the top-1 at the end of freeze_epochs=1
        else:
            assert math.isnan(r["frozen_top1"])  # trained from scratch: no frozen phase
        first = next(e + 1 for e, v in enumerate(c) if v >= 0.95 * c[-1])
        assert r["epochs_to_95"] == first
    assert set(table.loc[table["body"] == "baseline", "epochs_to_95"]) == {1.0}
    assert set(table.loc[table["body"] == "separate_downsampling", "epochs_to_95"]) == {3.0}


def test_heads_summary_over_seeds(heads_sweeps):
    runs = collect([heads_sweeps])
    s = heads_summary(heads_runs(runs, collect_epochs(runs)))
    assert len(s) == 8 and s["n"].eq(2).all()
    assert list(s["phase"][:4]) == ["finetune"] * 4  # fine-tunes first, ResNet body before ConvNeXt
    assert list(s["body"][:4]) == ["baseline", "baseline", "separate_downsampling", "separate_downsampling"]
    row = s[(s["phase"] == "finetune") & (s["body"] == "separate_downsampling") & (s["head"] == "fastai_convnext")]
    row = row.iloc[0]
    assert row["top1_mean"] == pytest.approx(93.0 + 1.0 + 0.25)  # seeds 0 and 1: +0 and +0.5
    assert row["top1_std"] == pytest.approx(pd.Series([0.0, 0.5]).std())
    assert row["frozen_top1_mean"] == pytest.approx(70.0 + 1.0 + 0.25)
    assert row["epochs_to_95_mean"] == 3.0 and row["epochs_to_95_max"] == 3.0


def test_analyze_writes_the_heads_files_and_keeps_them_off_the_roadmap(heads_sweeps, tmp_path):
    from tests.test_analysis import write_run

    write_run(heads_sweeps / "plain", "baseline", seed=0, top1=80.0)  # a roadmap run beside the heads runs
    written = analyze([heads_sweeps], tmp_path / "out")
    for name in ("heads.csv", "heads.md", "heads.png", "heads.svg", "results.csv", "roadmap.png"):
        assert name in written and written[name].exists(), name
    summary = pd.read_csv(written["summary.csv"])
    base = summary[summary["bar"] == "baseline"].iloc[0]
    assert base["n"] == 1 and base["top1_mean"] == pytest.approx(80.0)  # not pooled with the 8 heads runs
    assert len(pd.read_csv(written["results.csv"])) == 17  # results.csv still lists every run
    table = pd.read_csv(written["heads.csv"])
    assert len(table) == 16 and not table["run_dir"].str.startswith("/").any()  # portable, as results.csv
    md = written["heads.md"].read_text()
    assert "### Fine-tuned on the target classes" in md and "### Trained from scratch" in md
    assert "| ConvNeXt body | fastai_convnext | 2 | 71.25 ± 0.35 | 94.25 ± 0.35 | 3.00, 3 | 4 |" in md
    svg = written["heads.svg"].read_text()
    for body in BODIES:
        for head in HEADS:
            for what in ("frozen", "final", "epochs", "curve"):
                assert f'id="{what}:{body}:{head}' in svg, (what, body, head)


def test_a_results_csv_of_heads_runs_redraws_the_same_table(heads_sweeps, tmp_path):
    first = analyze([heads_sweeps], tmp_path / "a")
    again = analyze([first["results.csv"]], tmp_path / "b")  # the committed form: results.csv + epochs.csv
    assert again["heads.md"].read_text() == first["heads.md"].read_text()
    assert "roadmap.png" not in again  # heads runs only: no roadmap bars to draw
    assert again["results.md"].read_text().endswith(again["heads.md"].read_text())  # not an empty table


def test_plain_runs_are_not_heads_runs(tmp_path):
    from tests.test_analysis import write_run

    write_run(tmp_path, "gelu")
    runs = collect([tmp_path])
    assert not is_transfer(runs).any()
    assert "heads.md" not in analyze([tmp_path], tmp_path / "out")


def test_runs_of_another_schedule_are_another_task_not_more_seeds(heads_sweeps, tmp_path):
    """A 6-epoch fine-tune beside the 4-epoch ones (same body, head and classes) gets its own row and table; the
    figure draws the task with the most runs."""
    from analysis.heads import _figure_task

    run = write_heads_run(tmp_path / "long", "baseline", "linear", 0, fine=True)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["epochs"] = 6
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = [{"epoch": e, "train_loss": 1.0, "lr": 0.1, "top1": 50.0 + 2 * e, "top5": 99.0, "epoch_s": 1.0,
              "img_per_s": 100.0} for e in range(1, 7)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    summary = json.loads((run / "summary.json").read_text()) | {"top1": 62.0, "epochs": 6}
    (run / "summary.json").write_text(json.dumps(summary))
    runs = collect([heads_sweeps, tmp_path / "long"])
    table = heads_runs(runs, collect_epochs(runs))
    s = heads_summary(table)
    fine = s[(s["phase"] == "finetune") & (s["body"] == "baseline") & (s["head"] == "linear")].sort_values("epochs")
    assert fine["epochs"].tolist() == [4, 6] and fine["n"].tolist() == [2, 1]
    assert fine["top1_mean"].tolist() == pytest.approx([92.5 + 0.25, 62.0])  # not (92.5 + 93.0 + 62.0) / 3
    assert fine["frozen_top1_mean"].tolist() == pytest.approx([90.25, 52.0])
    assert _figure_task(table) == ("finetune", "5,6,7,8,9", 4, 1, "")
    md = analyze([heads_sweeps, tmp_path / "long"], tmp_path / "out")["heads.md"].read_text()
    assert "### Fine-tuned on the target classes (classes 5,6,7,8,9; 4 epochs, 1 frozen)" in md
    assert "### Fine-tuned on the target classes (classes 5,6,7,8,9; 6 epochs, 1 frozen)" in md
    assert "| ResNet body | linear | 1 | 52.00 | 62.00 | 5.00, 5 | 6 |" in md  # 59.0 >= 0.95 x 62 first at epoch 5
    assert "### Trained from scratch (classes 0,1,2,3,4; 4 epochs)" in md


def test_fine_tunes_of_other_settings_are_another_task(heads_sweeps, tmp_path):
    """A fine-tune with finetune.train_norm / layer_decay set is tabled apart from the plain ones of the same body,
    head, classes and schedule; a folder from before a key (the key absent) counts as its default."""
    run = write_heads_run(tmp_path / "norm", "baseline", "linear", 0, fine=True)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["finetune"] |= {"train_norm": True, "layer_decay": 0.7, "lr": None}  # lr at its default: not a setting
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    runs = collect([heads_sweeps, tmp_path / "norm"])
    assert set(runs["finetune"].fillna("")) == {"", "layer_decay=0.7, train_norm=True"}
    s = heads_summary(heads_runs(runs, collect_epochs(runs)))
    fine = s[(s["phase"] == "finetune") & (s["body"] == "baseline") & (s["head"] == "linear")]
    assert fine["n"].tolist() == [2, 1] and fine["finetune"].tolist() == ["", "layer_decay=0.7, train_norm=True"]
    md = analyze([heads_sweeps, tmp_path / "norm"], tmp_path / "out")["heads.md"].read_text()
    assert "(classes 5,6,7,8,9; 4 epochs, 1 frozen; layer_decay=0.7, train_norm=True)" in md
