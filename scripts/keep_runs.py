"""Keep a sweep's finished runs in git, so that a later sitting resumes the sweep instead of training them again.

runs/ is not committed, and a sitting's machine does not outlive it, so a sweep longer than a sitting (the factorial's
32 runs x 2 seeds: several CPU-hours each) keeps what it finished by copying each finished run folder's small text
files (config.yaml, summary.json, metrics.jsonl, complexity.json: no checkpoint, no TensorBoard events) and the
sweep's own files (design.*, multirun.yaml) into a committed folder:

    .venv/bin/python scripts/keep_runs.py runs/sweeps/cpu_factorial_seed0 docs/factorial_2026-12-03/seed0

A later sitting copies them back and runs the same sweep command: a run folder whose config.yaml matches and whose
summary.json says finished is not trained again (ablations.run_folder.prepare), so only the missing runs train:

    mkdir -p runs/sweeps/cpu_factorial_seed0 && cp -r docs/factorial_2026-12-03/seed0/. runs/sweeps/cpu_factorial_seed0/

`python -m analysis` reads the kept folder as it reads the sweep folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

RUN_FILES = ("config.yaml", "summary.json", "metrics.jsonl", "complexity.json")
SWEEP_FILES = ("design.csv", "design.json", "design.md", "multirun.yaml")


def keep(sweep: Path, dest: Path) -> list[Path]:
    """Copy the finished runs' RUN_FILES (and the sweep's SWEEP_FILES) from sweep to dest; the run folders kept."""
    kept = []
    for summary in sorted(sweep.rglob("summary.json")):
        run = summary.parent
        try:
            finished = json.loads(summary.read_text()).get("status") == "finished"
        except (OSError, ValueError):
            finished = False
        if not finished or not (run / "config.yaml").is_file():
            continue
        out = dest / run.relative_to(sweep)
        out.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            if (run / name).is_file():
                shutil.copy2(run / name, out / name)
        kept.append(out)
    for name in SWEEP_FILES:
        if (sweep / name).is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(sweep / name, dest / name)
    return kept


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path, help="the sweep folder (hydra.sweep.dir)")
    p.add_argument("dest", type=Path, help="the folder to commit")
    a = p.parse_args(argv)
    if not a.sweep.is_dir():
        raise SystemExit(f"error: {a.sweep} is not a folder (give the sweep's hydra.sweep.dir)")
    kept = keep(a.sweep, a.dest)
    print(f"kept {len(kept)} finished runs of {a.sweep} in {a.dest}")


if __name__ == "__main__":
    main()
