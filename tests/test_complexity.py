"""fvcore complexity: golden numbers from the script, and those golden numbers against the paper."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ablations import ROADMAP, TABLE10_MISPRINTS, VARIANTS, paper
from ablations.complexity import complexity, roadmap_rows
from models import build_model

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests/golden/complexity_r50_224.json").read_text())


@pytest.fixture(scope="module")
def rows():
    return {r["name"]: r for r in roadmap_rows("r50", 224, 1000)}


def test_matches_golden(rows):
    """Regenerate with: python -m ablations.complexity --regime r50 --golden tests/golden/complexity_r50_224.json"""
    assert set(rows) == {g["name"] for g in GOLDEN["rows"]}
    for g in GOLDEN["rows"]:
        r = rows[g["name"]]
        assert r["params"] == g["params"], g["name"]
        assert r["gflops"] == pytest.approx(g["gflops"], rel=1e-9), g["name"]
        assert r["gflops_total"] == pytest.approx(g["gflops_total"], rel=1e-9), g["name"]


def test_golden_matches_paper_figure2():
    # Fig. 2 prints one decimal; the paper rounds from two decimals (2.35 -> 2.4, 4.15 -> 4.2), so 0.06 is rounding.
    for g in GOLDEN["rows"]:
        assert abs(g["gflops"] - paper(g["name"]).gflops["r50"]) <= 0.06, g["name"]
    by = {g["name"]: g for g in GOLDEN["rows"]}
    assert [round(by[s.name]["gflops"], 2) for s in ROADMAP[-2:]] == [4.15, 4.46]  # the Table 10 misprints
    assert set(TABLE10_MISPRINTS) == {"bn_to_ln", "separate_downsampling"}
    # fvcore's full total (norms and pooling too) reads as the reference says: 4.11 and 4.47
    assert (
        round(by["baseline"]["gflops_total"], 2) == 4.11
        and round(by["separate_downsampling"]["gflops_total"], 2) == 4.47
    )
    assert len(GOLDEN["rows"]) == len(ROADMAP) + sum("train" not in v[1] for v in VARIANTS.values())


def test_other_resolution_and_classes():
    # 448 px keeps every stage exactly twice as wide as at 224 (448/32 = 14), so conv FLOPs scale by exactly 4
    c224 = complexity(build_model("separate_downsampling"), 224)
    c448 = complexity(build_model("separate_downsampling", num_classes=10), 448)
    head224, head10 = 768 * 1000 / 1e9, 768 * 10 / 1e9
    assert c448["gflops"] == pytest.approx((c224["gflops"] - head224) * 4 + head10, rel=1e-9)
    assert c224["params"] - c448["params"] == 769 * 990  # the 1000-class head has 990 more outputs
    assert c448["activations_m"] > c224["activations_m"] > 0


def test_cli_prints_table():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ablations.complexity",
            "--regime",
            "r50",
            "--img-size",
            "64",
            "--num-classes",
            "10",
            "--no-variants",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.split() and ln.split()[0] in {s.name for s in ROADMAP}]
    assert len(lines) == len(ROADMAP) and "paper" in out.stdout
