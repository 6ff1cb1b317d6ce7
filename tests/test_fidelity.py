"""Fidelity measures (analysis.fidelity) on hand-made run tables whose numbers are computed here by hand."""

from __future__ import annotations

import json
import math
from itertools import accumulate
from pathlib import Path

import pandas as pd
import pytest

from analysis.fidelity import (
    fidelity,
    fidelity_caption,
    fidelity_json,
    fidelity_markdown,
    kendall_tau_b,
    spearman,
)
from analysis.runs import RUN_COLUMNS, bar_order, summarize

STEPS = [
    "baseline", "stage_ratio", "patchify_stem", "depthwise_conv", "increase_width", "inverted_bottleneck",
    "move_up_dwconv", "large_kernel", "gelu", "fewer_activations", "fewer_norms", "bn_to_ln", "separate_downsampling",
]  # fmt: skip
# Table 10 to two decimals, typed from ../shared/reference/paper_roadmap.md (not Fig. 2's one decimal).
TABLE10 = [78.82, 79.36, 79.51, 78.28, 80.50, 80.64, 79.92, 80.57, 80.62, 81.27, 81.41, 81.47, 81.97]
TABLE11 = [81.1, 81.3, 81.6, 80.5, 81.9, 82.6, 82.0, 82.3, 82.2, 82.7, 83.2, 83.4, 83.6]
BIG_R50 = [
    "stage_ratio", "depthwise_conv", "increase_width", "move_up_dwconv", "large_kernel", "fewer_activations",
    "separate_downsampling",
]  # fmt: skip


def runs(top1: dict[str, list[float]], regime: str = "r50", status: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """A collect()-like run table: one finished run per value (seeds 0, 1, ...), or the statuses given."""
    rows = []
    for bar, values in top1.items():
        for seed, v in enumerate(values):
            st = (status or {}).get(bar, ["finished"] * len(values))[seed]
            rows.append(
                {
                    "run_dir": f"{bar}/seed{seed}",
                    "bar": bar,
                    "step": bar,
                    "seed": seed,
                    "regime": regime,
                    "profile": "cpu",
                    "data": "fashion_mnist",
                    "recipe": "modern",
                    "status": st,
                    "error": "",
                    "top1": v if st == "finished" else math.nan,
                    "order": bar_order(bar),
                }
            )
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def three_seeds(means: list[float], spread: float = 0.1) -> dict[str, list[float]]:
    """Each step at mean - spread, mean, mean + spread: its mean is exact and its seed std is `spread`."""
    return {s: [m - spread, m, m + spread] for s, m in zip(STEPS, means)}


def record(top1: dict[str, list[float]], regime: str = "r50", **kw) -> dict:
    """The fidelity record of one regime for a run table built from top1."""
    (rec,) = fidelity(summarize(runs(top1, regime, **kw)))
    return rec


def test_rank_correlations_against_hand_values():
    """Spearman and Kendall tau-b on small cases worked out by hand, ties included."""
    # one swap in each half: d^2 = 4 -> rho = 1 - 6*4/(5*24) = 0.8; 2 discordant of 10 pairs -> tau = 0.6
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert kendall_tau_b([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.6)
    # a tie in x: ranks (1, 2.5, 2.5, 4) vs (1, 3, 2, 4): rho = 4.5/sqrt(4.5*5); tau-b = 5/sqrt(5*6)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert kendall_tau_b([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(5 / math.sqrt(30))
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1) and kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))


def test_proxy_identical_to_paper():
    """A proxy whose step means are Table 10's: +3.15, 7/7, Spearman = Kendall = 1, noise floor = the seed std."""
    rec = record(three_seeds(TABLE10, spread=0.1))
    h = rec["headline"]
    assert h["value"] == pytest.approx(3.15) and h["paper"] == pytest.approx(3.15)
    assert h["se"] == pytest.approx(math.sqrt(0.1**2 / 3 + 0.1**2 / 3)) and h["se_reason"] is None
    b = rec["big_step_signs"]
    assert [r["step"] for r in b["steps"]] == BIG_R50
    assert b["text"] == "7/7" and b["disagree"] == [] and b["not_measured"] == []
    assert rec["rank_correlation"]["spearman"] == pytest.approx(1)
    assert rec["rank_correlation"]["kendall"] == pytest.approx(1)  # scipy's tau-b: two square roots, 1 - 2e-16
    assert rec["rank_correlation"]["n_steps"] == 13
    assert rec["noise_floor"]["value"] == pytest.approx(0.1) and rec["noise_floor"]["n_steps"] == 13
    assert rec["missing"] == [] and rec["paper"].startswith("Table 10")
    cap = fidelity_caption(rec)
    assert "headline +3.15 ± 0.08 (paper +3.15)" in cap and "big-step signs 7/7" in cap and "Spearman 1.00" in cap


def test_reversed_trajectory():
    """The paper's trajectory upside down: Spearman = Kendall = -1, no big step agrees, headline -3.15."""
    rec = record(three_seeds([160 - v for v in TABLE10]))
    assert rec["rank_correlation"]["spearman"] == pytest.approx(-1)
    assert rec["rank_correlation"]["kendall"] == pytest.approx(-1)
    assert rec["big_step_signs"]["text"] == "0/7"
    assert rec["headline"]["value"] == pytest.approx(-3.15)
    cap = fidelity_caption(rec)  # seven steps named: wrapped over three lines, every measure kept
    assert cap.splitlines()[1].startswith("big-step signs 0/7 (✗ stage_ratio,") and cap.count("\n") == 2
    assert cap.splitlines()[2] == "Spearman −1.00 · Kendall −1.00 · noise floor 0.10"


def test_one_big_step_with_the_wrong_sign_is_named():
    """Same changes as the paper's except depthwise conv goes up by 1.23: 6/7, and depthwise_conv is named."""
    changes = [b - a for a, b in zip(TABLE10, TABLE10[1:])]
    changes[STEPS.index("depthwise_conv") - 1] = +1.23
    rec = record(three_seeds(list(accumulate(changes, initial=TABLE10[0]))))
    b = rec["big_step_signs"]
    assert b["text"] == "6/7" and b["disagree"] == ["depthwise_conv"]
    assert [r["agree"] for r in b["steps"]] == [r != "depthwise_conv" for r in BIG_R50]
    md = fidelity_markdown([rec])
    assert "6/7; opposite sign: depthwise_conv" in md and "| depthwise_conv | −1.23 | +1.23 | **no** |" in md
    assert "✗ depthwise_conv" in fidelity_caption(rec)
    # the sweep of 2026-11-22 (three steps named) was cut off at the figure's edge in one line: now two that fit
    changes[STEPS.index("large_kernel") - 1] = changes[STEPS.index("fewer_activations") - 1] = -0.5
    cap = fidelity_caption(record(three_seeds(list(accumulate(changes, initial=TABLE10[0])))))
    assert "✗ depthwise_conv, large_kernel, fewer_activations" in cap and "noise floor 0.10" in cap
    assert cap.count("\n") == 1 and max(map(len, cap.splitlines())) <= 150


def test_a_change_of_zero_is_neither_agreeing_nor_opposite():
    """large_kernel exactly level with move_up_dwconv (+0.00) and fewer_activations 0.003 below gelu (−0.00): both
    are 'no change', compared but not agreeing, and never named as the opposite sign."""
    changes = [b - a for a, b in zip(TABLE10, TABLE10[1:])]
    changes[STEPS.index("large_kernel") - 1] = 0.0
    changes[STEPS.index("fewer_activations") - 1] = -0.003
    rec = record(three_seeds(list(accumulate(changes, initial=TABLE10[0]))))
    b = rec["big_step_signs"]
    assert (b["text"], b["agree"], b["compared"]) == ("5/7", 5, 7)
    assert b["disagree"] == [] and b["no_change"] == ["large_kernel", "fewer_activations"]
    flat = {r["step"]: r for r in b["steps"] if r["no_change"]}
    assert set(flat) == {"large_kernel", "fewer_activations"} and not any(r["agree"] for r in flat.values())
    md = fidelity_markdown([rec])
    assert "opposite sign" not in md and "**no**" not in md
    assert "5/7; no change (±0.00, counted as not agreeing): large_kernel, fewer_activations" in md
    assert (
        "| large_kernel | +0.65 | +0.00 | no change |" in md
        and "| fewer_activations | +0.65 | −0.00 | no change |" in md
    )
    cap = fidelity_caption(rec)
    assert "big-step signs 5/7 (no change: large_kernel, fewer_activations)" in cap and "✗" not in cap


def test_docs_fidelity_json_is_what_the_code_computes_from_docs_results_csv():
    """The committed docs/fidelity.json equals fidelity() of the committed docs/results.csv (the rank correlations
    now come from scipy: the same values to 1e-12; keys added since, e.g. no_change, are not in the old file)."""
    from analysis import collect

    docs = Path(__file__).resolve().parents[1] / "docs"
    (new,) = fidelity(summarize(collect([docs / "results.csv"])))
    (old,) = json.loads((docs / "fidelity.json").read_text())["groups"]

    def same(a, b, where="") -> None:
        """a (committed) equals b (recomputed): numbers to 1e-12, every key of a present in b."""
        if isinstance(a, dict):
            for k in a:
                same(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, list):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{where}[{i}]")
        elif isinstance(a, float):
            assert b == pytest.approx(a, rel=1e-12, abs=1e-12), where
        else:
            assert a == b, where

    same(old, new)
    assert new["rank_correlation"]["spearman"] == pytest.approx(-0.66, abs=0.005)
    # tau = (concordant - discordant) / pairs = -38 / 78: discordant pairs outnumber concordant ones by 38
    assert new["rank_correlation"]["kendall"] == pytest.approx(-19 / 39, rel=1e-12)


def test_headline_standard_error_with_three_seeds():
    """SE of the headline = sqrt(s1^2/n1 + s2^2/n2) with sample variances, worked out by hand."""
    top1 = three_seeds(TABLE10)
    top1["baseline"] = [80.0, 80.3, 80.9]  # mean 80.4, s^2 = (0.16 + 0.01 + 0.25) / 2 = 0.21
    top1["separate_downsampling"] = [82.0, 82.2, 82.7]  # mean 82.3, s^2 = (0.09 + 0.01 + 0.16) / 2 = 0.13
    h = record(top1)["headline"]
    assert h["value"] == pytest.approx(1.9)
    assert h["se"] == pytest.approx(math.sqrt(0.21 / 3 + 0.13 / 3))
    assert h["n"] == [3, 3]


def test_one_seed_leaves_the_se_and_noise_floor_null_with_a_reason():
    """With one seed per step the headline exists but its SE and the noise floor are null (JSON null), not 0."""
    rec = record({s: [v] for s, v in zip(STEPS, TABLE10)})
    h, nf = rec["headline"], rec["noise_floor"]
    assert h["value"] == pytest.approx(3.15) and h["se"] is None
    assert "baseline has 1 seed" in h["se_reason"] and ">= 2 seeds" in h["se_reason"]
    assert nf["value"] is None and "no step has >= 2" in nf["reason"]
    doc = json.loads(fidelity_json([rec]))  # strict JSON: NaN would not parse back as null
    assert doc["groups"][0]["headline"]["se"] is None and doc["groups"][0]["noise_floor"]["value"] is None
    assert "SE n/a" in fidelity_caption(rec)


def test_missing_step_and_seeds_are_reported():
    """gelu without a finished run, bn_to_ln with 2 of 3 seeds: listed; fewer_activations' sign is not measured."""
    top1 = three_seeds(TABLE10)
    top1["gelu"] = [0.0]  # one run, still going
    top1["bn_to_ln"] = top1["bn_to_ln"][:2]
    rec = record(top1, status={"gelu": ["running"]})
    assert rec["missing"] == ["gelu (0 seeds; 1 running)", "bn_to_ln has 2 of 3 seeds"]
    b = rec["big_step_signs"]
    assert b["not_measured"] == ["fewer_activations"]  # its previous step is gelu
    assert (b["agree"], b["compared"], b["total"]) == (6, 6, 7)
    assert rec["rank_correlation"]["n_steps"] == 12 and rec["rank_correlation"]["spearman"] == pytest.approx(1)
    md = fidelity_markdown([rec])
    assert "Missing: gelu (0 seeds; 1 running); bn_to_ln has 2 of 3 seeds" in md
    assert "(1 of 7 not measured: fewer_activations)" in md
    assert "correlations over 12 of 13 steps" in fidelity_caption(rec)


def test_too_little_to_compare_gives_null_with_reasons():
    """Without the baseline the headline is null; with fewer than 3 steps so is the rank correlation."""
    rec = record({"stage_ratio": [79.0, 79.2], "separate_downsampling": [80.0, 80.1]})
    assert rec["headline"]["value"] is None and "no finished run of baseline" in rec["headline"]["reason"]
    assert rec["rank_correlation"]["spearman"] is None and "needs >= 3 steps" in rec["rank_correlation"]["reason"]
    assert rec["big_step_signs"]["text"] is None and rec["big_step_signs"]["compared"] == 0
    assert len(rec["missing"]) == 11
    json.loads(fidelity_json([rec]))


def test_r200_uses_table_11_and_its_own_big_steps():
    """The r200 regime is compared with Table 11: headline +2.5, its own steps of half a point or more."""
    rec = record(three_seeds(TABLE11), regime="r200")
    assert rec["paper"].startswith("Table 11")
    assert rec["headline"]["value"] == pytest.approx(2.5) and rec["headline"]["paper"] == pytest.approx(2.5)
    big = [r["step"] for r in rec["big_step_signs"]["steps"]]
    big_r200 = ["depthwise_conv", "increase_width", "inverted_bottleneck", "move_up_dwconv", "fewer_activations"]
    assert big == [*big_r200, "fewer_norms"]
    assert rec["big_step_signs"]["text"] == "6/6" and rec["rank_correlation"]["kendall"] == pytest.approx(1)


def test_one_record_per_regime_and_unknown_regime():
    """Fidelity is computed per regime; a regime the paper lacks gets null measures with the reason."""
    df = pd.concat([runs(three_seeds(TABLE10)), runs(three_seeds(TABLE10), regime="r101")], ignore_index=True)
    recs = {r["regime"]: r for r in fidelity(summarize(df))}
    assert set(recs) == {"r50", "r101"}
    assert recs["r50"]["big_step_signs"]["text"] == "7/7"
    assert recs["r101"]["headline"]["value"] is None and "no per-step numbers" in recs["r101"]["headline"]["reason"]
    assert "Not computed" in fidelity_markdown(list(recs.values()))
