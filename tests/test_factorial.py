"""Factorial designs over the roadmap's steps: design properties, the sweep, the analysis of planted effects."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from ablations.config import _suffix
from ablations.factorial import CATALOGUE, FACTORS, alias_chains, make_design
from models import STEPS, ConfigError

ROOT = Path(__file__).resolve().parents[1]
FULL = "separate_downsampling"
MICRO = ["gelu", "fewer_activations", "fewer_norms", "bn_to_ln"]


# ------------------------------------------------------------------------------------------- design properties
def words_by_length(x: np.ndarray) -> list[int]:
    """A[i] = number of column products of length i+1 that are constant (+1 or -1): the word-length pattern,
    computed by brute force from the matrix (independent of ablations.factorial's own bookkeeping)."""
    x = np.asarray(x)
    out = [0] * x.shape[1]
    for r in range(1, x.shape[1] + 1):
        for cols in itertools.combinations(range(x.shape[1]), r):
            p = x[:, cols].prod(axis=1)
            out[r - 1] += int(np.all(p == p[0]))
    return out


def resolution_of(x: np.ndarray) -> float:
    """Length of the shortest word, inf for a full factorial."""
    a = words_by_length(x)
    return next((i + 1 for i, n in enumerate(a) if n), float("inf"))


def check_balanced_orthogonal(x: np.ndarray) -> None:
    """Every column half +1 and half -1; every two columns orthogonal."""
    x = np.asarray(x, dtype=int)
    assert set(np.unique(x)) == {-1, 1}
    assert (x.sum(axis=0) == 0).all()
    assert np.array_equal(x.T @ x, len(x) * np.eye(x.shape[1], dtype=int))


@pytest.mark.parametrize(
    "kwargs,runs,res",
    [
        ({}, 32, 4),  # the default: all 12 steps, resolution IV
        ({"kind": "res3"}, 16, 3),
        ({"kind": "res3", "foldover": True}, 32, 4),  # the fold-over of a resolution III design is resolution IV
        ({"factors": MICRO, "kind": "full"}, 16, float("inf")),
        ({"factors": MICRO}, 8, 4),  # 2^(4-1), D = ABC
        ({"factors": ["gelu", "bn_to_ln", "fewer_norms"], "kind": "res3"}, 4, 3),
        ({"factors": FACTORS[:8]}, 16, 4),
        ({"factors": FACTORS[:9], "kind": "res4"}, 32, 4),
    ],
)
def test_designs_are_balanced_orthogonal_and_of_their_resolution(kwargs, runs, res):
    d = make_design(**kwargs)
    check_balanced_orthogonal(d.matrix)
    assert d.runs == runs and len({tuple(r) for r in d.matrix}) == runs  # no run twice
    assert resolution_of(d.matrix) == res == d.resolution


@pytest.mark.parametrize("runs,k", sorted(CATALOGUE))
def test_every_catalogue_entry_is_balanced_orthogonal_and_at_least_resolution_3(runs, k):
    from pydoe import fracfact

    x = fracfact(CATALOGUE[(runs, k)])
    assert x.shape == (runs, k)
    check_balanced_orthogonal(x)
    expected = 3 if k > runs // 2 else 4  # resolution IV holds at most runs/2 factors
    assert resolution_of(x) >= expected


def _wlp_of_generators(gens: list[int], m: int) -> tuple[int, ...]:
    """Word-length pattern of a 2^(k-p) design from its generator columns (bit masks over m base factors)."""
    words = [g | (1 << (m + j)) for j, g in enumerate(gens)]
    counts = [0] * (m + len(gens) + 1)
    for r in range(1, len(words) + 1):
        for combo in itertools.combinations(words, r):
            w = 0
            for c in combo:
                w ^= c
            counts[bin(w).count("1")] += 1
    return tuple(counts[1:])


def _generators(gen: str, m: int) -> list[int]:
    """The generated columns of a pyDOE generator string as bit masks over the base factors."""
    return [sum(1 << (ord(ch) - 97) for ch in w) for w in gen.split()[m:]]


@pytest.mark.parametrize("runs,k", [rk for rk in sorted(CATALOGUE) if rk[0] <= 16 or rk[1] <= 9])
def test_catalogue_entries_have_minimum_aberration(runs, k):
    """Exhaustive: no other choice of generator columns gives a smaller word-length pattern."""
    m = runs.bit_length() - 1
    interactions = [c for c in range(1, 1 << m) if bin(c).count("1") >= 2]
    best = min(_wlp_of_generators(list(g), m) for g in itertools.combinations(interactions, k - m))
    assert _wlp_of_generators(_generators(CATALOGUE[(runs, k)], m), m) == best


@pytest.mark.parametrize("k", [11, 12])
def test_32_run_resolution_iv_entries_have_minimum_aberration_among_all_such_designs(k):
    """Every resolution IV design of more than 10 factors in 32 runs is a projection of the maximal even design (the
    16 odd-weight columns of GF(2)^5; Chen & Cheng 2006), so minimum aberration is checked over those projections."""
    odd = [c for c in range(1, 32) if bin(c).count("1") % 2]
    subsets = np.array(list(itertools.product([0, 1], repeat=k))[1:], dtype=bool)  # every non-empty product
    sizes = subsets.sum(axis=1)

    def wlp(cols) -> tuple[int, ...]:
        xor = np.bitwise_xor.reduce(np.where(subsets, np.array(cols), 0), axis=1)
        return tuple(np.bincount(sizes[xor == 0], minlength=k + 1)[3:])

    best = min(wlp(c) for c in itertools.combinations(odd, k))
    gen = CATALOGUE[(32, k)]
    cols = [1, 2, 4, 8, 16] + _generators(gen, 5)
    assert wlp(cols) == best


def test_foldover_is_the_design_and_its_mirror_image():
    half, folded = make_design(kind="res3"), make_design(kind="res3", foldover=True)
    assert np.array_equal(folded.matrix[:16], half.matrix) and np.array_equal(folded.matrix[16:], -half.matrix)
    assert resolution_of(half.matrix) == 3 and resolution_of(folded.matrix) == 4


def test_alias_chains_of_a_known_design():
    d = make_design(MICRO)  # 2^(4-1)_IV: a b c and d = abc, so I = ABCD
    chains = {tuple(c) for c in d.aliases(max_order=2)}
    assert chains == {
        ("gelu",), ("fewer_activations",), ("fewer_norms",), ("bn_to_ln",),
        ("gelu:fewer_activations", "fewer_norms:bn_to_ln"),
        ("gelu:fewer_norms", "fewer_activations:bn_to_ln"),
        ("gelu:bn_to_ln", "fewer_activations:fewer_norms"),
    }  # fmt: skip
    assert d.words() == ["+abcd"]
    # the other half (d = -abc): the same chains with the opposite sign, which grouping by equality would lose
    other = d.matrix * np.array([1, 1, 1, -1])
    signed = alias_chains(other, max_order=2)
    assert [((0, 1), 1), ((2, 3), -1)] in signed
    assert all(len(c) == 1 for c in signed if len(c[0][0]) == 1)  # main effects clear of two-step interactions
    # resolution III: each main effect aliased with the interaction of the other two
    screen = make_design(["gelu", "fewer_norms", "bn_to_ln"], "res3")
    assert ["gelu", "fewer_norms:bn_to_ln"] in screen.aliases(max_order=2)


def test_runs_are_convnext_without_the_steps_off_and_named_canonically(tmp_path):
    d = make_design(["bn_to_ln", "gelu"], "full", fixed_off=["fewer_norms"])
    assert d.factors == ("gelu", "bn_to_ln")  # paper order, whatever order they were given in
    assert sorted(map(tuple, d.withouts())) == sorted(
        [("fewer_norms",), ("gelu", "fewer_norms"), ("fewer_norms", "bn_to_ln"), ("gelu", "fewer_norms", "bn_to_ln")]
    )
    assert d.sweep_value().count("[") == 4
    paths = d.write(tmp_path)
    assert [p.name for p in paths] == ["design.csv", "design.json", "design.md"]
    csv = pd.read_csv(tmp_path / "design.csv", keep_default_na=False)
    assert list(csv.columns) == ["run", "gelu", "bn_to_ln", "without"] and set(csv["gelu"]) == {-1, 1}
    info = json.loads((tmp_path / "design.json").read_text())
    assert info["fixed_off"] == ["fewer_norms"] and "gelu" not in info["fixed_on"] and info["resolution"] is None


@pytest.mark.parametrize(
    "kwargs,expect",
    [
        ({"factors": ["gelux"]}, "unknown step 'gelux'; factors are roadmap steps after baseline: stage_ratio,"),
        ({"factors": ["baseline", "gelu"]}, "'baseline' cannot be a factor"),
        ({"factors": ["gelu", "gelu"]}, "lists gelu more than once"),
        ({"factors": ["gelu"]}, "needs at least 2 factors"),
        ({"kind": "res4", "runs": 16}, "cannot hold 12 factors in 16 runs: 16 runs hold at most 8 factors"),
        ({"kind": "full"}, "4096 runs per seed, more than factorial.max_runs=256"),
        ({"kind": "res5"}, "unknown factorial.design 'res5'; valid: res4, res3, full"),
        ({"runs": 24}, "not a power of two"),
        ({"factors": MICRO, "fixed_off": ["gelu"]}, "which factorial.factors varies"),
        ({"factors": MICRO, "kind": "full", "foldover": True}, "would only repeat its runs"),
    ],
)
def test_bad_designs_are_one_paragraph_config_errors(kwargs, expect):
    with pytest.raises(ConfigError) as err:
        make_design(**kwargs)
    assert expect in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------- the sweep
def test_sweep_file_turns_the_design_into_the_without_sweep(compose_cfg):
    cfg = compose_cfg("+sweep=factorial", return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params.step == FULL and params.seed == "0,1"
    assert params.without == make_design().sweep_value() and params.without.count("[") == 32
    small = compose_cfg("+sweep=factorial", "factorial.factors=[bn_to_ln,gelu]", "factorial.design=full",
                        return_hydra_config=True)  # fmt: skip
    assert small.hydra.sweeper.params.without == "[gelu,bn_to_ln],[gelu],[bn_to_ln],[]"  # pyDOE ff2n order


def test_the_factorial_node_changes_no_run_folder_or_stored_config(compose_cfg):
    sys.path.insert(0, str(ROOT))
    from ablations.run_folder import plain as _plain

    a = compose_cfg(f"step={FULL}", "without=[gelu]", "profile=smoke")
    b = compose_cfg(f"step={FULL}", "without=[gelu]", "profile=smoke", "factorial.design=res3")
    assert _plain(a) == _plain(b) and "factorial" not in _plain(a)
    excluded = OmegaConf.load(ROOT / "conf/config.yaml").hydra.job.config.override_dirname.exclude_keys
    assert {f"factorial.{k}" for k in ("factors", "design", "foldover", "runs", "fixed_off", "max_runs")} <= set(
        excluded
    )


def _run(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "run_ablation.py", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.mark.parametrize(
    "arg,expect",
    [
        ("factorial.factors=[gelux]", "error: factorial.factors: unknown step 'gelux'; factors are roadmap steps"),
        # each call starts Python, torch and Hydra (about 15 s on the 2-core machine): the other two are slow
        pytest.param(
            "factorial.factors=[baseline,gelu]",
            "error: factorial.factors: 'baseline' cannot be a factor",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "factorial.runs=16",
            "error: factorial.design=res4 cannot hold 12 factors in 16 runs",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_cli_bad_design_is_one_paragraph_and_runs_nothing(tmp_path, arg, expect):
    out = _run("+sweep=factorial", arg, "profile=smoke", "data=synthetic", f"hydra.sweep.dir={tmp_path / 's'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(expect), out.stderr[-2000:]
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_smoke_factorial_sweep_ends_with_factorial_json_and_the_figure(tmp_path):
    out = _run("+sweep=factorial", "factorial.factors=[gelu,fewer_norms,bn_to_ln]", "factorial.design=res3",
               "seed=0", "profile=smoke", "data=synthetic", "logger=none", f"hydra.sweep.dir={tmp_path}")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("design.csv", "design.json", "design.md", "factorial.json", "factorial.md", "factorial.png",
                 "factorial.svg", "factorial_halfnormal.png", "results.csv"):  # fmt: skip
        assert (tmp_path / name).stat().st_size > 0, name
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith(FULL))
    assert folders == sorted(FULL + _suffix("", w, "paper") for w in make_design(["gelu", "fewer_norms", "bn_to_ln"],
                                                                                   "res3").withouts())  # fmt: skip
    rec = json.loads((tmp_path / "factorial.json").read_text())["designs"][0]
    assert rec["complete"] and rec["points"] == 4 and rec["source"] == "design.csv"
    assert set(rec["responses"]["top1"]["main_effects"]) == {"gelu", "fewer_norms", "bn_to_ln"}
    assert not (tmp_path / "leave_one_out.png").exists()  # the design's two-step removals are not leave-one-out bars


# ---------------------------------------------------------------------------------------------- the analysis
PLANTED = {"separate_downsampling": 1.5, "patchify_stem": -1.2, "fewer_norms": 0.6, "depthwise_conv": -0.4}
PLANTED_PAIR = ("depthwise_conv", "large_kernel", 0.5)  # an interaction effect of +0.5 points
SIGMA = 0.25


def fake_run(root: Path, without, seed: int, top1: float, gflops: float = 4.46, img_per_s: float = 300.0, step=FULL):
    """A finished run folder as run_ablation writes it (config.yaml, summary.json, metrics.jsonl)."""
    run = root / (step + _suffix("", list(without), "paper")) / f"seed{seed}"
    run.mkdir(parents=True)
    cfg = {"step": step, "bar": step, "seed": seed, "regime": {"name": "r50"}, "profile": "cpu",
           "data": {"name": "fashion_mnist", "num_classes": 10}, "train": {"name": "modern", "epochs": 2}}  # fmt: skip
    if without:
        cfg["without"] = list(without)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    summary = {"status": "finished", "top1": top1, "gflops": gflops, "params": 1, "paper_params": 2, "epochs": 2}
    (run / "summary.json").write_text(json.dumps(summary))
    lines = [{"epoch": e, "top1": top1, "img_per_s": img_per_s} for e in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return run


def planted_sweep(root: Path, seeds=(0, 1), write_design=True, noise=SIGMA) -> dict:
    """The default 32-run design x seeds with planted effects; returns {(run, seed): top-1}."""
    rng = np.random.default_rng(7)
    d = make_design()
    if write_design:
        d.write(root)
    a, b, ab = PLANTED_PAIR
    out = {}
    for seed in seeds:
        for i in range(d.runs):
            x = dict(zip(d.factors, d.matrix[i]))
            y = 87.0 + sum(e * x[s] / 2 for s, e in PLANTED.items()) + ab * x[a] * x[b] / 2 + rng.normal(0, noise)
            gflops = 4.46 + (25.4 if x["depthwise_conv"] < 0 else 0) * (x["inverted_bottleneck"] > 0)
            fake_run(root, d.without(i), seed, y, gflops, 300.0 + 40 * x["depthwise_conv"] + rng.normal(0, 3))
            out[(i, seed)] = y
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The planted sweep analysed: (folder, factorial.json's record, the top-1 values)."""
    from analysis import analyze

    root = tmp_path_factory.mktemp("factorial")
    values = planted_sweep(root)
    written = analyze(root)
    assert {"factorial.json", "factorial.md", "factorial.png", "factorial.svg", "factorial_halfnormal.png"} <= set(
        written
    )
    return root, json.loads((root / "factorial.json").read_text())["designs"][0], values


def test_planted_main_effects_and_interaction_are_recovered_within_a_few_se(planted):
    _, rec, values = planted
    top1 = rec["responses"]["top1"]
    assert rec["complete"] and rec["points"] == 32 and top1["n_runs"] == 64 and rec["resolution"] == 4
    assert top1["df_pure_error"] == 32 and top1["df_resid"] >= 32
    for step in FACTORS:
        m = top1["main_effects"][step]
        assert abs(m["effect"] - PLANTED.get(step, 0.0)) < 3 * m["se"], (step, m)
        assert m["se"] == pytest.approx(2 * SIGMA / 8, rel=0.35)  # SE of a difference of two means of 32 runs each
        assert m["ci_low"] < m["effect"] < m["ci_high"]
        assert m["effect"] == pytest.approx(m["mean_on"] - m["mean_off"])  # complete, balanced: OLS = the difference
    # the planted interaction sits in the chain of one estimated two-step term
    a, b, ab = PLANTED_PAIR
    chain = [i for i in top1["interactions"] if f"{a}:{b}" in [i["term"], *[x.lstrip("-") for x in i["aliases"]]]]
    assert len(chain) == 1 and abs(chain[0]["effect"] - ab) < 3 * chain[0]["se"]
    others = [i for i in top1["interactions"] if i is not chain[0]]
    assert max(abs(i["effect"]) / i["se"] for i in others) < 4  # nothing else stands out
    # GFLOPs: removing depthwise conv while the inverted bottleneck is on costs 25.4 in half of those runs
    g = rec["responses"]["gflops"]["main_effects"]
    assert g["depthwise_conv"]["effect"] == pytest.approx(-25.4 / 2) and g["gelu"]["effect"] == pytest.approx(0)
    assert rec["responses"]["img_per_s"]["main_effects"]["depthwise_conv"]["effect"] == pytest.approx(80, abs=5)


def test_factorial_outputs_name_aliases_and_missing_nothing(planted):
    root, rec, _ = planted
    assert rec["missing"] == [] and rec["estimated_from"] == "the complete design"
    assert rec["aliases"]["depthwise_conv:large_kernel"]  # res IV with 12 factors: every pair is in a chain
    assert all(not m["aliases"] for m in rec["responses"]["top1"]["main_effects"].values())  # clear of 2fis
    md = (root / "factorial.md").read_text()
    assert "| sep. d.s. layers | +1." in md and "Incomplete" not in md
    svg = (root / "factorial.svg").read_text()
    assert all(f'id="factorial:{s}"' in svg and f'id="paper:{s}"' in svg for s in FACTORS)
    assert 'id="loo:' not in svg and not (root / "leave_one_out.csv").exists()


def test_missing_runs_are_reported_and_effects_labelled_as_estimated(tmp_path):
    from analysis import analyze

    planted_sweep(tmp_path, seeds=(0,))
    d = make_design()
    gone = [d.without(3), d.without(17)]
    for w in gone:
        shutil.rmtree(tmp_path / (FULL + _suffix("", w, "paper")))
    failed = tmp_path / (FULL + _suffix("", d.without(5), "paper")) / "seed0" / "summary.json"
    failed.write_text(json.dumps({"status": "failed", "error": "boom"}))
    analyze(tmp_path)
    rec = json.loads((tmp_path / "factorial.json").read_text())["designs"][0]
    assert not rec["complete"] and rec["points_finished"] == 29
    missing = {m["without"]: m["status"] for m in rec["missing"]}
    assert missing == {"+".join(gone[0]): "no run folder", "+".join(gone[1]): "no run folder",
                       "+".join(d.without(5)): "failed"}  # fmt: skip
    assert rec["estimated_from"] == "the runs present only (29 of 32 points)"
    assert (
        rec["responses"]["top1"]["n_runs"] == 29 and "separate_downsampling" in rec["responses"]["top1"]["main_effects"]
    )
    md = (tmp_path / "factorial.md").read_text()
    assert "**Incomplete: 3 of 32 points have no finished run" in md and "(failed)" in md
    assert "INCOMPLETE: 3 of 32 points missing" in (tmp_path / "factorial.svg").read_text()


def test_at_chance_is_top1_within_1_5x_of_chance():
    from ablations import at_chance

    assert at_chance(10.0, 10) and at_chance(15.0, 10) and not at_chance(15.01, 10) and not at_chance(83.67, 10)
    assert at_chance(0.1, 1000) and not at_chance(1.0, 1000)
    assert not at_chance(None, 10) and not at_chance(10.0, None) and not at_chance(float("nan"), 10)


def test_a_run_at_chance_collapsed_only_when_most_runs_learned():
    from analysis.factorial import collapsed

    runs = pd.DataFrame({"top1": [88.0, 10.0, 87.0, None], "num_classes": [10, 10, 10, 10]})
    assert collapsed(runs).tolist() == [False, True, False, False]
    noise = pd.DataFrame({"top1": [9.0, 11.5, 12.0, 31.0], "num_classes": 10})  # data without signal: all kept
    assert not collapsed(noise).any()


def test_runs_collapsed_to_chance_are_named_and_left_out_of_the_fit(tmp_path):
    """A run stuck at chance (top-1 10 % on 10 classes, as two seed-1 runs of the real sweep were) would move every
    main effect by ~77 / 32 points; it is left out, named, and a point whose every seed collapsed is missing."""
    from analysis import analyze

    planted_sweep(tmp_path)
    d = make_design()
    dead = [(d.without(4), 1), (d.without(9), 0), (d.without(9), 1)]
    for without, seed in dead:
        shutil.rmtree(tmp_path / (FULL + _suffix("", without, "paper")) / f"seed{seed}")
        fake_run(tmp_path, without, seed, 10.0)
    analyze(tmp_path)
    rec = json.loads((tmp_path / "factorial.json").read_text())["designs"][0]
    assert sorted((c["without"], c["seed"], c["top1"]) for c in rec["collapsed"]) == sorted(
        ("+".join(w), s, 10.0) for w, s in dead
    )
    assert rec["missing"] == [{"without": "+".join(d.without(9)), "status": "collapsed"}]
    top1 = rec["responses"]["top1"]
    assert top1["n_runs"] == 61 and top1["sigma"] < 2 * SIGMA
    for step in FACTORS:
        m = top1["main_effects"][step]
        assert abs(m["effect"] - PLANTED.get(step, 0.0)) < 3 * m["se"], (step, m)
    md = (tmp_path / "factorial.md").read_text()
    assert "**Collapsed: 3 finished run(s) ended at chance level" in md and "seed 1: top-1 10.00" in md
    assert "(resolution IV), 2 seeds, 61 runs fitted, r50" in md  # not "2 seeds" alone: 3 of the 64 are out
    assert "3 run(s) collapsed to chance level, left out" in (tmp_path / "factorial.svg").read_text()


@pytest.mark.slow  # three analyses with every figure: about 17 s
def test_the_design_is_recognised_from_a_merged_results_csv_beside_roadmap_and_leave_one_out_runs(tmp_path):
    """No design.csv: two sittings' results.csv merged, plus a roadmap walk and a leave-one-out sweep."""
    from analysis import analyze

    planted_sweep(tmp_path / "seed0", seeds=(0,), write_design=False)
    planted_sweep(tmp_path / "seed1", seeds=(1,), write_design=False)
    rng = np.random.default_rng(3)
    for seed in (0, 1):
        for i, step in enumerate(STEPS):
            fake_run(tmp_path / "roadmap", [], seed, 86.0 + 0.2 * i + rng.normal(0, 0.1), step=step)
        for s in FACTORS:
            fake_run(tmp_path / "loo", [s], seed, 87.0 - (0.8 if s == "gelu" else 0) + rng.normal(0, 0.1))
    for sitting in ("seed0", "seed1"):
        analyze(tmp_path / sitting, out_dir=tmp_path / f"{sitting}_out")
        (tmp_path / f"{sitting}_out" / "design.csv").unlink()  # recognise from the runs alone
    out = tmp_path / "merged"
    written = analyze([tmp_path / "seed0_out/results.csv", tmp_path / "seed1_out/results.csv", tmp_path / "roadmap",
                       tmp_path / "loo"], out_dir=out)  # fmt: skip
    assert "factorial.json" in written and "roadmap.png" in written and "leave_one_out.png" in written
    rec = json.loads((out / "factorial.json").read_text())["designs"][0]
    assert rec["source"] == "recognised" and rec["points"] == 32 and rec["complete"] and rec["seeds"] == [0, 1]
    assert rec["factors"] == list(FACTORS) and rec["resolution"] == 4
    c = rec["comparison"]["gelu"]
    assert c["loo_contribution"] == pytest.approx(87.5 - 87.0 + 0.8, abs=0.5) and c["loo_contribution_se"] > 0
    assert c["path_gain"] == pytest.approx(0.2, abs=0.3) and c["paper_top1_gain"] == pytest.approx(0.05)
    loo = pd.read_csv(out / "leave_one_out.csv", keep_default_na=False)
    assert sorted(loo["without"]) == sorted(FACTORS)  # the design's multi-step removals are not in it
    svg = (out / "factorial.svg").read_text()
    assert 'id="path:gelu"' in svg and 'id="loo:gelu"' in svg


def test_a_small_leave_one_out_sweep_is_not_taken_for_a_design(tmp_path):
    from analysis import analyze

    for seed in (0, 1):
        for w in ([], ["gelu"], ["stage_ratio"]):
            fake_run(tmp_path, w, seed, 87.0 + seed)
    written = analyze(tmp_path)
    assert "factorial.json" not in written and "leave_one_out.png" in written


def test_one_seed_of_a_saturated_design_gives_effects_without_errors(tmp_path):
    from analysis import analyze

    for i, w in enumerate(make_design(MICRO).withouts()):  # 8 runs: 4 mains + 3 chains = saturated
        fake_run(tmp_path, w, 0, 87.0 + 0.1 * i)
    analyze(tmp_path)
    top1 = json.loads((tmp_path / "factorial.json").read_text())["designs"][0]["responses"]["top1"]
    assert top1["df_resid"] == 0 and all(m["se"] is None for m in top1["main_effects"].values())
    assert len(top1["interactions"]) == 3
