"""scripts/keep_runs.py: a sweep's finished runs kept as small text files, and a later sitting that restores them
skips those runs (prepare returns their summary) and trains the rest."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ("step=gelu", "data=synthetic", "profile=smoke", "progress=false")


def test_kept_runs_are_not_trained_again(tmp_path, compose_cfg):
    from ablations.run_folder import prepare
    from ablations.train import train

    keep = runpy.run_path(str(ROOT / "scripts" / "keep_runs.py"))["keep"]
    sweep = tmp_path / "sweep"
    first = compose_cfg(*SMOKE, "seed=0")
    assert prepare(first, str(sweep / "gelu" / "seed0")) is None  # as run_ablation.py: config.yaml, then training
    train(first, str(sweep / "gelu" / "seed0"))
    running = sweep / "gelu" / "seed1"  # a run the sitting did not finish: not kept
    running.mkdir(parents=True)
    (running / "config.yaml").write_text("step: gelu\n")
    (sweep / "design.csv").write_text("run,gelu\n0,1\n")
    kept = keep(sweep, tmp_path / "kept")
    assert [p.relative_to(tmp_path / "kept") for p in kept] == [Path("gelu/seed0")]
    files = sorted(p.name for p in (tmp_path / "kept" / "gelu" / "seed0").iterdir())
    assert files == ["complexity.json", "config.yaml", "metrics.jsonl", "summary.json"]  # no last.pt, no events
    assert (tmp_path / "kept" / "design.csv").is_file()

    later = tmp_path / "later"  # the next sitting: copied back, the same run is recognised as finished
    shutil.copytree(tmp_path / "kept", later)
    done = prepare(compose_cfg(*SMOKE, "seed=0"), str(later / "gelu" / "seed0"))
    assert done is not None and done["status"] == "finished"
    assert done["top1"] == json.loads((sweep / "gelu" / "seed0" / "summary.json").read_text())["top1"]
    assert prepare(compose_cfg(*SMOKE, "seed=1"), str(later / "gelu" / "seed1")) is None  # trains
