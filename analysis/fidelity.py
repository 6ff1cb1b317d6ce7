"""How far a roadmap sweep agrees with the paper: headline gain, big-step signs, rank correlation, noise floor.

Pure functions on the summary frame (`analysis.runs.summarize`): `fidelity(summary)` gives one record per regime
(the key the summary and the figures group by), `fidelity_markdown` / `fidelity_caption` / `fidelity_json` print it.
Every measure that cannot be computed is None with a reason; missing steps and seeds are listed, never skipped.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from ablations import STEP_NAMES

# The paper's per-step top-1 at the finest precision it prints (../shared/reference/paper_roadmap.md).
# r50: Table 10, two decimals, each the mean of 3 seeds (Fig. 2 rounds them to one decimal).
# r200: Table 11, one decimal, single runs.
PAPER_TOP1: dict[str, dict[str, float]] = {
    "r50": {
        "baseline_classic": 76.13,
        "baseline": 78.82,
        "stage_ratio": 79.36,
        "patchify_stem": 79.51,
        "depthwise_conv": 78.28,
        "increase_width": 80.50,
        "inverted_bottleneck": 80.64,
        "move_up_dwconv": 79.92,
        "large_kernel": 80.57,
        "large_kernel_k5": 80.35,
        "large_kernel_k9": 80.57,
        "large_kernel_k11": 80.47,
        "gelu": 80.62,
        "fewer_activations": 81.27,
        "fewer_norms": 81.41,
        "bn_to_ln": 81.47,
        "separate_downsampling": 81.97,
    },
    "r200": {
        "baseline_classic": 78.2,
        "baseline": 81.1,
        "stage_ratio": 81.3,
        "patchify_stem": 81.6,
        "depthwise_conv": 80.5,
        "increase_width": 81.9,
        "inverted_bottleneck": 82.6,
        "move_up_dwconv": 82.0,
        "large_kernel": 82.3,
        "large_kernel_k5": 82.3,
        "large_kernel_k9": 82.3,
        "large_kernel_k11": 82.2,
        "gelu": 82.2,
        "fewer_activations": 82.7,
        "fewer_norms": 83.2,
        "bn_to_ln": 83.4,
        "separate_downsampling": 83.6,
    },
}
PAPER_SOURCE = {
    "r50": "Table 10 (two decimals, mean of 3 seeds)",
    "r200": "Table 11 (one decimal, single runs)",
}
BIG_STEP = 0.5  # a step whose paper change is at least this many points is one a proxy can be asked to match in sign
# A change smaller than this prints as +0.00 / −0.00 in every table: it has no sign, so it neither agrees with the
# paper nor goes the other way; it still counts among the compared steps (it did not move the paper's way).
NO_CHANGE = 0.005
START, END = STEP_NAMES[0], STEP_NAMES[-1]  # the headline: ResNet (modern recipe) -> ConvNeXt


def spearman(x, y) -> float:
    """Spearman's rho (scipy: Pearson correlation of average ranks, ties share their mean rank); NaN when undefined."""
    with warnings.catch_warnings():  # a constant side is "no ranking" (NaN, with its reason), not a warning
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(np.asarray(x, dtype=float), np.asarray(y, dtype=float)).statistic)


def kendall_tau_b(x, y) -> float:
    """Kendall's tau-b (scipy: ties in either side shrink the denominator); NaN when undefined."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        tau = stats.kendalltau(np.asarray(x, dtype=float), np.asarray(y, dtype=float), variant="b").statistic
    return float(tau)


def _finite(x) -> bool:
    """True for a finite number."""
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def step_table(summary: pd.DataFrame, regime: str) -> pd.DataFrame:
    """The 13 roadmap steps of one regime: seeds, our mean/std and change from the previous step, the paper's."""
    s = summary[summary["regime"] == regime].set_index("bar") if "regime" in summary else summary.set_index("bar")
    paper = PAPER_TOP1.get(regime, {})
    rows = []
    for name in STEP_NAMES:
        r = s.loc[name] if name in s.index else pd.Series(dtype=object)
        count = {k: int(r[k]) if _finite(r.get(k)) else 0 for k in ("n", "n_failed", "n_running", "n_broken")}
        mean = float(r["top1_mean"]) if _finite(r.get("top1_mean")) else math.nan
        rows.append(
            {
                "step": name,
                "n": count["n"] if _finite(mean) else 0,
                "launched": sum(count.values()),
                "n_running": count["n_running"],
                "n_failed": count["n_failed"] + count["n_broken"],
                "top1_mean": mean,
                "top1_std": float(r["top1_std"]) if _finite(r.get("top1_std")) else math.nan,
                "paper_top1": paper.get(name, math.nan),
            }
        )
    t = pd.DataFrame(rows)
    t["change"] = t["top1_mean"].diff()
    t["paper_change"] = t["paper_top1"].diff().round(2)  # 2 decimals: 81.97 - 81.47 must be 0.50, not 0.4999...
    return t


def headline(steps: pd.DataFrame) -> dict:
    """Mean top-1 of the last step minus the first, with the standard error of that difference of two means."""
    a, b = steps.set_index("step").loc[START], steps.set_index("step").loc[END]
    out = {
        "from": START,
        "to": END,
        "value": None,
        "se": None,
        "paper": _round(b["paper_top1"] - a["paper_top1"], 2),
        "n": [int(a["n"]), int(b["n"])],
        "reason": None,
        "se_reason": None,
    }
    absent = [name for name, r in ((START, a), (END, b)) if r["n"] == 0]
    if absent:
        out["reason"] = f"no finished run of {' and '.join(absent)}"
        out["se_reason"] = out["reason"]
        return out
    out["value"] = float(b["top1_mean"] - a["top1_mean"])
    few = [f"{name} has {int(r['n'])} seed" for name, r in ((START, a), (END, b)) if r["n"] < 2]
    if few:
        out["se_reason"] = f"{' and '.join(few)}: a standard error needs >= 2 seeds at both ends"
    else:  # SE of a difference of two independent means, each from its sample std (ddof=1)
        out["se"] = math.sqrt(a["top1_std"] ** 2 / a["n"] + b["top1_std"] ** 2 / b["n"])
    return out


def big_step_signs(steps: pd.DataFrame, threshold: float = BIG_STEP) -> dict:
    """For the steps the paper moves by >= threshold points: does our change from the previous step have its sign?

    A change under NO_CHANGE (shown as ±0.00) is neither: it is listed under no_change, counts among the compared
    steps and not among those that agree (agree False, no_change True in its row).
    """
    big = steps[steps["paper_change"].abs() >= threshold]
    rows, agree, disagree, flat, unmeasured = [], [], [], [], []
    for _, r in big.iterrows():
        prev = STEP_NAMES[STEP_NAMES.index(r["step"]) - 1]
        measured = _finite(r["change"])
        zero = bool(measured and abs(r["change"]) < NO_CHANGE)
        ok = bool(measured and not zero and np.sign(r["change"]) == np.sign(r["paper_change"]))
        rows.append(
            {
                "step": r["step"],
                "previous": prev,
                "paper_change": float(r["paper_change"]),
                "change": float(r["change"]) if measured else None,
                "agree": ok if measured else None,
                "no_change": zero,
            }
        )
        (agree if ok else flat if zero else disagree if measured else unmeasured).append(r["step"])
    compared = len(agree) + len(disagree) + len(flat)
    return {
        "threshold": threshold,
        "agree": len(agree),
        "compared": compared,
        "total": len(big),
        "text": f"{len(agree)}/{compared}" if compared else None,
        "disagree": disagree,
        "no_change": flat,
        "not_measured": unmeasured,
        "steps": rows,
        "reason": None if compared else "no big step has finished runs of it and of its previous step",
    }


def rank_correlation(steps: pd.DataFrame) -> dict:
    """Spearman and Kendall tau-b between our step means and the paper's, over the steps with a finished run."""
    have = steps[steps["top1_mean"].map(_finite) & steps["paper_top1"].map(_finite)]
    out = {"n_steps": len(have), "of": len(steps), "spearman": None, "kendall": None, "reason": None}
    if len(have) < 3:
        out["reason"] = f"needs >= 3 steps with a finished run, has {len(have)}"
        return out
    rho, tau = spearman(have["top1_mean"], have["paper_top1"]), kendall_tau_b(have["top1_mean"], have["paper_top1"])
    out["spearman"], out["kendall"] = _num(rho), _num(tau)
    if not math.isfinite(rho):
        out["reason"] = "our step means are all equal: no ranking"
    return out


def noise_floor(steps: pd.DataFrame) -> dict:
    """Median over the steps with >= 2 seeds of the seed std: step changes smaller than this are not resolved."""
    stds = steps.loc[(steps["n"] >= 2) & steps["top1_std"].map(_finite), "top1_std"]
    if not len(stds):
        return {"value": None, "n_steps": 0, "reason": "no step has >= 2 finished seeds"}
    return {"value": float(stds.median()), "n_steps": len(stds), "reason": None}


def missing(steps: pd.DataFrame, expected: int) -> list[str]:
    """What the sweep lacks for a full comparison: steps without a finished seed, steps with fewer than expected."""
    out = []
    for _, r in steps.iterrows():
        pending = ", ".join(f"{int(r[k])} {k[2:]}" for k in ("n_running", "n_failed") if r[k] > 0)
        pending = f"; {pending}" if pending else ""
        if r["n"] == 0:
            out.append(f"{r['step']} (0 seeds{pending})")
        elif r["n"] < expected:
            out.append(f"{r['step']} has {int(r['n'])} of {expected} seeds{pending}")
    return out


def _joined(values) -> str:
    """Distinct comma-separated labels of a summary column, sorted and joined."""
    return ",".join(sorted({v for cell in values if isinstance(cell, str) for v in cell.split(",") if v}))


def fidelity(summary: pd.DataFrame) -> list[dict]:
    """One fidelity record per regime of the summary (see the module docstring); JSON-ready, None for unknowns."""
    records = []
    regimes = list(dict.fromkeys(summary["regime"])) if len(summary) else []
    for regime in regimes:
        s = summary[summary["regime"] == regime]
        steps = step_table(summary, regime)
        on_path = s[s["bar"].isin(STEP_NAMES)]
        rec = {
            "regime": regime,
            "profile": _joined(on_path.get("profile", [])),
            "data": _joined(on_path.get("data", [])),
            "paper": PAPER_SOURCE.get(regime),
            "steps": [_jsonable(r) for r in steps.to_dict("records")],
            "notes": [],
        }
        launched = s[[k for k in ("n", "n_failed", "n_running", "n_broken") if k in s]].sum(axis=1)
        expected = int(launched.max()) if len(launched) else 0
        rec["seeds_expected"] = expected
        rec["missing"] = missing(steps, expected)
        for col in ("profile", "data"):
            if "," in rec[col]:
                rec["notes"].append(f"several {col}s ({rec[col]}) are pooled in each mean: analyse them separately")
        if regime not in PAPER_TOP1:
            reason = f"the paper has no per-step numbers for regime {regime!r} (known: {', '.join(PAPER_TOP1)})"
            rec.update(
                headline={"value": None, "se": None, "paper": None, "reason": reason, "se_reason": reason},
                big_step_signs={"text": None, "reason": reason},
                rank_correlation={"spearman": None, "kendall": None, "reason": reason},
                noise_floor=noise_floor(steps),
            )
        else:
            rec.update(
                headline=headline(steps),
                big_step_signs=big_step_signs(steps),
                rank_correlation=rank_correlation(steps),
                noise_floor=noise_floor(steps),
            )
        records.append(_jsonable(rec))
    return records


def _num(x) -> float | None:
    """A finite float, else None (JSON null)."""
    return float(x) if _finite(x) else None


def _round(x, digits: int) -> float | None:
    """round(x, digits) for a finite number, else None."""
    return round(float(x), digits) if _finite(x) else None


def _jsonable(obj):
    """obj with NaN/inf as None and numpy scalars as Python numbers, recursively."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _num(obj)
    return obj


def fidelity_json(records: list[dict]) -> str:
    """fidelity.json's text: the records under 'groups', with what the measures mean."""
    doc = {
        "about": (
            "Agreement of our roadmap with the paper's, per regime. headline: mean top-1 of "
            f"{END} minus {START}, se = sqrt(s1^2/n1 + s2^2/n2) over seeds. big_step_signs: steps whose paper "
            f"change from the previous step is >= {BIG_STEP} points, and whether our change has the same sign (a "
            f"change under {NO_CHANGE} points, shown as 0.00, is no_change: compared, neither agreeing nor opposite). "
            "rank_correlation: Spearman and Kendall tau-b of the 13 step means against the paper's. noise_floor: "
            "median over steps (>= 2 seeds) of the seed std. null = not computable, with a reason."
        ),
        "groups": records,
    }
    return json.dumps(_jsonable(doc), indent=2, allow_nan=False) + "\n"


def _signed(x, digits: int = 2) -> str:
    """+1.23 / −1.23 (a real minus sign), an en dash when unknown."""
    if not _finite(x):
        return "–"
    return f"{float(x):+.{digits}f}".replace("-", "−")


def _plain(x, digits: int = 2) -> str:
    """A number, an en dash when unknown."""
    return f"{float(x):.{digits}f}".replace("-", "−") if _finite(x) else "–"


def headline_text(h: dict) -> str:
    """'−1.55 ± 0.19' (± one standard error), or the value alone when the SE is undefined."""
    if h.get("value") is None:
        return "–"
    return _signed(h["value"]) + (f" ± {_plain(h['se'])}" if h.get("se") is not None else "")


CAPTION_WIDTH = 150  # characters per line of the roadmap figure's fidelity box (about 180 fit at 9.5 pt in its 14 in)


def fidelity_caption(rec: dict) -> str:
    """The compact text box of the roadmap figure: the four measures, wrapped to the figure's width."""
    if rec["paper"] is None:
        return f"vs paper: {rec['headline']['reason']}"
    h, b, rc, nf = rec["headline"], rec["big_step_signs"], rec["rank_correlation"], rec["noise_floor"]
    head = headline_text(h)
    if h["value"] is not None and h["se"] is None:
        head += " (SE n/a)"
    parts = [f"headline {head} (paper {_signed(h['paper'])})"]
    if b["text"]:
        signs = f"big-step signs {b['text']}" + (f" of {b['total']}" if b["compared"] < b["total"] else "")
        marks = [f"✗ {', '.join(b['disagree'])}"] if b["disagree"] else []
        marks += [f"no change: {', '.join(b['no_change'])}"] if b.get("no_change") else []
        parts.append(signs + (f" ({'; '.join(marks)})" if marks else ""))
    else:
        parts.append("big-step signs –")
    parts.append(f"Spearman {_plain(rc['spearman'])} · Kendall {_plain(rc['kendall'])}")
    parts.append(f"noise floor {_plain(nf['value'])}")
    line2 = []
    if rc.get("n_steps") is not None and rc["n_steps"] < rc["of"]:
        line2.append(f"correlations over {rc['n_steps']} of {rc['of']} steps")
    if rec["missing"]:
        line2.append(f"missing: {len(rec['missing'])} step{'s' * (len(rec['missing']) > 1)} short of seeds")
    lines = [f"vs paper ({rec['paper'].split(' (')[0]}): " + parts[0]]
    for part in parts[1:]:  # wrapped to the figure's width: a new line rather than text cut off at its edge
        if len(lines[-1]) + 3 + len(part) > CAPTION_WIDTH:
            lines.append(part)
        else:
            lines[-1] += " · " + part
    return "\n".join(lines + ([" · ".join(line2)] if line2 else []))


def _same_sign_cell(row: dict) -> str:
    """The 'same sign' cell of a big step: yes, **no**, no change (±0.00: neither), or – when not measured."""
    if row["agree"] is None:
        return "–"
    if row["agree"]:
        return "yes"
    return "no change" if row.get("no_change") else "**no**"


def fidelity_markdown(records: list[dict]) -> str:
    """results.md's Fidelity section: the four measures beside the paper's, big steps one by one, what is missing."""
    out = ["## Fidelity: how far our roadmap agrees with the paper", ""]
    for rec in records:
        what = ", ".join(v for v in (rec["profile"], rec["data"]) if v)
        out += [f"### {rec['regime']}" + (f" ({what})" if what else ""), ""]
        if rec["paper"] is None:
            out += [f"Not computed: {rec['headline']['reason']}.", ""]
            continue
        h, b, rc, nf = rec["headline"], rec["big_step_signs"], rec["rank_correlation"], rec["noise_floor"]
        out += [
            f"Against the paper's {rec['paper']}.",
            "",
            "| measure | ours | paper |",
            "|---|---:|---:|",
        ]
        n = h.get("n") or [0, 0]
        why = h["reason"] or h["se_reason"]
        seeds = f"{n[0]} + {n[1]} seeds"
        out.append(
            f"| headline: {END} − {START} (± SE) | {headline_text(h)} ({seeds}{'; ' + why if why else ''}) "
            f"| {_signed(h['paper'])} |"
        )
        signs = b["text"] or f"– ({b['reason']})"
        if b["text"] and b["compared"] < b["total"]:
            signs += f" ({b['total'] - b['compared']} of {b['total']} not measured: {', '.join(b['not_measured'])})"
        if b.get("disagree"):
            signs += f"; opposite sign: {', '.join(b['disagree'])}"
        if b.get("no_change"):
            signs += f"; no change (±0.00, counted as not agreeing): {', '.join(b['no_change'])}"
        out.append(
            f"| big steps (paper change ≥ {BIG_STEP}) with the paper's sign | {signs} | {b['total']}/{b['total']} |"
        )
        over = f"{rc['n_steps']} of {rc['of']} steps" + (f"; {rc['reason']}" if rc["reason"] else "")
        out.append(f"| Spearman rank correlation ({over}) | {_plain(rc['spearman'])} | 1 |")
        out.append(f"| Kendall tau-b ({over}) | {_plain(rc['kendall'])} | 1 |")
        floor = f"{nf['n_steps']} steps" if nf["value"] is not None else nf["reason"]
        out.append(f"| noise floor: median seed std ({floor}) | {_plain(nf['value'])} | 0.02–0.18 (std per step) |")
        out.append("")
        if b.get("steps"):
            out += [
                "| big step | paper change | our change | same sign | beyond noise floor |",
                "|---|---:|---:|---|---|",
            ]
            for r in b["steps"]:
                same = _same_sign_cell(r)
                beyond = (
                    "–"
                    if r["change"] is None or nf["value"] is None
                    else "yes"
                    if abs(r["change"]) > nf["value"]
                    else "no"
                )
                out.append(
                    f"| {r['step']} | {_signed(r['paper_change'])} | {_signed(r['change'])} | {same} | {beyond} |"
                )
            out.append("")
        out.append("Missing: " + ("; ".join(rec["missing"]) if rec["missing"] else "none (every step has every seed)."))
        out += [f"Note: {note}" for note in rec["notes"]]
        out.append("")
    return "\n".join(out)


__all__ = [
    "BIG_STEP", "NO_CHANGE", "PAPER_SOURCE", "PAPER_TOP1", "big_step_signs", "fidelity", "fidelity_caption",
    "fidelity_json", "fidelity_markdown", "headline", "kendall_tau_b", "missing", "noise_floor", "rank_correlation",
    "spearman", "step_table",
]  # fmt: skip
