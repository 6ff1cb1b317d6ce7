"""Factorial analysis: each step's main effect averaged over contexts, the two-step interactions, their errors.

The design is found among the runs, not taken from a sweep's config: a run's model is its set of active steps
(models.roadmap.active_steps of its step, without and roadmap), so runs from separate sittings, or from a merged
results.csv, are one design whenever their sets are. A `design.csv` at the top of an input folder (written by
`+sweep=factorial` before its first job) names the planned runs, so runs not started are reported as missing;
without one the design is recognised from the runs (`recognise`). Effects come from statsmodels' OLS on the coded
factors (+1 on, -1 off): a main effect is twice the coefficient, which in a complete balanced design is exactly
mean(step on) - mean(step off). Its standard error pools the seed replicates (pure error) and whatever contrasts the
fitted model leaves (chains of three-step and higher interactions); with one seed and no such contrast the design is
saturated and no error can be given.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ablations import COLLAPSE_FACTOR, VARIANTS, at_chance
from ablations.factorial import FACTORS, ROMAN, alias_chains, defining_words
from analysis.figure import STYLE, _new_figure, _save
from analysis.leave_one_out import leave_one_out, paper_gain
from analysis.runs import paper_step
from models import STEPS, ConfigError
from models.roadmap import active_steps

# response column -> (label, unit, digits)
RESPONSES = {
    "top1": ("top-1", "points", 2),
    "gflops": ("GFLOPs at 224 px, full width", "GFLOPs", 3),
    "img_per_s": ("training img/s", "img/s", 1),
}
CONTEXT = ["regime", "profile", "data", "recipe"]
KIND_COLOURS = {"factorial": "#1f4e79", "path": "#dd8452", "loo": "#55a868", "paper": "#9e9e9e"}


@dataclass
class FoundDesign:
    """A two-level design found among the runs: its planned points, the runs at them, what is missing."""

    factors: list[str]
    points: pd.DataFrame  # one row per planned point: the factors (+-1), key (frozenset of active steps), without
    runs: pd.DataFrame  # the runs at those points (any status), with the factors (+-1) and key
    context: dict = field(default_factory=dict)  # regime, profile, data, recipe of the runs
    source: str = "recognised"  # "design.csv" when planned by a sweep, "recognised" when found from the runs alone
    fixed_on: list[str] = field(default_factory=list)
    fixed_off: list[str] = field(default_factory=list)

    @property
    def matrix(self) -> np.ndarray:
        """The planned design matrix (points x factors, +-1)."""
        return self.points[self.factors].to_numpy(int)

    def _done(self) -> pd.Series:
        """Finished runs with a top-1 (a mask over runs)."""
        r = self.runs
        return (r["status"] == "finished") & pd.to_numeric(r["top1"], errors="coerce").notna()

    def finished(self) -> pd.DataFrame:
        """Finished runs with a top-1 that trained (not collapsed): the runs the effects are fitted to."""
        return self.runs[self._done() & ~collapsed(self.runs)]

    def collapsed(self) -> pd.DataFrame:
        """Finished runs that collapsed to chance level (COLLAPSE_FACTOR): reported, left out of the fit."""
        return self.runs[self._done() & collapsed(self.runs)]

    def missing(self) -> pd.DataFrame:
        """Planned points without a finished run, with what became of their runs (failed, running, or no folder)."""
        done = set(self.finished()["key"])
        rows = []
        for _, p in self.points.iterrows():
            if p["key"] in done:
                continue
            here = self.runs["key"] == p["key"]
            states = sorted(set(self.runs.loc[here, "status"].astype(str)) - {"finished"})
            states += ["collapsed"] if (here & self._done()).any() else []
            rows.append({"without": p["without"], "status": ", ".join(states) or "no run folder"})
        return pd.DataFrame(rows, columns=["without", "status"])

    @property
    def complete(self) -> bool:
        """Whether every planned point has a finished run."""
        return self.missing().empty


def collapsed(runs: pd.DataFrame) -> pd.Series:
    """Whether each run collapsed: its top-1 at most COLLAPSE_FACTOR x its chance level while the median run's is not
    (False where classes are unknown). Such a run measures its failure to train, not its model: one of them moves
    every main effect by its distance to the others over the runs (~75 points / 32 on Fashion-MNIST), so the fit
    leaves it out and the outputs name it. When the median run is at chance too (data without signal, e.g. the smoke
    profile's synthetic images), nothing learned and nothing is left out."""
    top1 = pd.to_numeric(runs["top1"], errors="coerce")
    classes = pd.to_numeric(runs["num_classes"], errors="coerce") if "num_classes" in runs else [None] * len(runs)
    chance = pd.Series([at_chance(t, c) for t, c in zip(top1, classes)], index=runs.index, dtype=bool)
    learned = top1[~chance].notna().sum() > top1[chance].notna().sum()  # most runs with a top-1 are above chance
    return chance & learned


def _key(step, without, roadmap_steps) -> frozenset | None:
    """A run's set of active steps (None when its toggles are not valid today)."""
    order = roadmap_steps.split(",") if isinstance(roadmap_steps, str) and roadmap_steps else None
    order = None if order is not None and tuple(order) == STEPS else order
    left = [w for w in without.split("+") if w] if isinstance(without, str) else []
    try:
        return frozenset(active_steps(str(step), left, order))
    except ConfigError:
        return None


def _design_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The runs that may belong to a design: a step's own model (no bar variant such as kernel 5), with their key."""
    runs = df[df["step"].notna() & ~df["base_bar"].isin(list(VARIANTS))].copy()
    runs["key"] = [_key(*a) for a in zip(runs["step"], runs["without"], runs["roadmap_steps"])]
    runs = runs[runs["key"].notna()]
    for col in CONTEXT:
        runs[col] = runs[col].fillna("unknown").astype(str)
    return runs


def _without_of(key: frozenset) -> str:
    """The left-out steps of ConvNeXt giving this set of active steps ("+"-joined, paper order)."""
    return "+".join(s for s in STEPS[1:] if s not in key)


def _points(keys: list[frozenset], factors: list[str]) -> pd.DataFrame:
    """Planned points as a frame: the factors (+-1), key, without."""
    rows = [{**{f: 1 if f in k else -1 for f in factors}, "key": k, "without": _without_of(k)} for k in keys]
    return pd.DataFrame(rows, columns=[*factors, "key", "without"])


def _found(keys: list[frozenset], runs: pd.DataFrame, source: str) -> FoundDesign:
    """A FoundDesign over the planned keys: factors are the steps that vary, the rest fixed on or off."""
    factors = [s for s in FACTORS if 0 < sum(s in k for k in keys) < len(keys)]
    fixed_on = [s for s in FACTORS if s not in factors and all(s in k for k in keys)]
    fixed_off = [s for s in FACTORS if s not in factors and s not in fixed_on]
    mine = runs[runs["key"].isin(set(keys))].copy()
    for f in factors:
        mine[f] = [1 if f in k else -1 for k in mine["key"]]
    context = {c: ",".join(sorted(set(mine[c]))) for c in CONTEXT} if len(mine) else {}
    return FoundDesign(factors, _points(keys, factors), mine, context, source, fixed_on, fixed_off)


def read_planned(paths) -> list[list[frozenset]]:
    """The planned points of every design.csv at the top of the input folders (or beside an input results.csv),
    duplicates (the same design run in several sittings) once."""
    seen, out = set(), []
    for p in map(Path, paths):
        folder = p.parent if p.is_file() else p
        csv = folder / "design.csv"
        if not csv.is_file():
            continue
        try:
            d = pd.read_csv(csv, keep_default_na=False)
            keys = [frozenset(STEPS) - set(str(w).split("+")) - {""} for w in d["without"]]
        except (OSError, KeyError, ValueError, pd.errors.ParserError) as e:
            raise ValueError(f"{csv}: not a design table ({e})") from e
        sig = frozenset(keys)
        if sig not in seen:
            seen.add(sig)
            out.append(keys)
    return out


def _affine_span(keys: list[frozenset], factors: list[str]) -> list[frozenset] | None:
    """The smallest regular two-level design (an affine subspace of GF(2)^factors) holding keys, as keys; None when
    it is bigger than 4096 points. Steps that are not factors keep the level they have in keys[0]."""
    bits = [sum(1 << i for i, f in enumerate(factors) if f in k) for k in keys]
    origin, basis = bits[0], []
    for b in bits[1:]:  # Gaussian elimination over GF(2): reduce each difference by the basis so far
        v = b ^ origin
        for e in basis:
            v = min(v, v ^ e)
        if v:
            basis.append(v)
    if len(basis) > 12:
        return None
    span = {origin}
    for e in basis:
        span |= {s ^ e for s in span}
    fixed = keys[0] - set(factors)
    return [frozenset({f for i, f in enumerate(factors) if s >> i & 1} | fixed) for s in sorted(span)]


def recognise(runs: pd.DataFrame) -> list[FoundDesign]:
    """Two-level designs among runs with no design.csv, one per context at most.

    Candidates: the distinct points, and the points without those of a roadmap walk (prefixes of the paper's
    order) and / or of a leave-one-out sweep (ConvNeXt minus one step), with and without ConvNeXt itself. Each
    candidate's design is the smallest regular fraction holding it (its affine span); it is accepted when no two
    factors are aliased and the points present cover it completely, or, for 8 points or more, at least 3/4 of it
    (then the rest is reported missing). The design covering most present points wins.
    """
    out = []
    for _, g in runs.groupby(CONTEXT, sort=False):
        present = list(dict.fromkeys(g["key"]))
        best = None
        for cand in _candidates(present):
            factors = [s for s in FACTORS if 0 < sum(s in k for k in cand) < len(cand)]
            if len(cand) < 4 or len(factors) < 2:
                continue
            span = _affine_span(cand, factors)
            if span is None or _aliased(span, factors):
                continue
            covered = len(set(span) & set(present))
            if covered < len(span) and (len(span) < 8 or covered < 0.75 * len(span)):
                continue
            score = (covered, -len(span) + covered, len(span))
            if best is None or score > best[0]:
                best = (score, span)
        if best is not None:
            out.append(_found(best[1], g, "recognised"))
    return out


def _candidates(present: list[frozenset]) -> list[list[frozenset]]:
    """present, minus the roadmap-walk points and / or the leave-one-out points, with and without ConvNeXt."""
    full = frozenset(STEPS)
    path = {frozenset(STEPS[: i + 1]) for i in range(len(STEPS) - 1)}
    loo = {full - {s} for s in FACTORS}
    out = []
    for drop in (set(), path, loo, path | loo):
        for drop_full in (False, True):
            cand = [k for k in present if k not in drop and not (drop_full and k == full)]
            if cand and cand not in out:
                out.append(cand)
    return out


def _aliased(span: list[frozenset], factors: list[str]) -> bool:
    """Whether two factors are confounded (identical or opposite columns) in the design."""
    x = _points(span, factors)[factors].to_numpy()
    c = np.abs(x.T @ x) == len(x)
    return bool((c.sum(axis=0) > 1).any())


def find_designs(df: pd.DataFrame, paths=()) -> list[FoundDesign]:
    """Every design among the runs: those of design.csv files in paths (per context of their runs), else recognised."""
    runs = _design_runs(df)
    planned = read_planned(paths)
    if not planned:
        return recognise(runs)
    out = []
    for keys in planned:
        mine = runs[runs["key"].isin(set(keys))]
        groups = [g for _, g in mine.groupby(CONTEXT, sort=False)] or [mine]
        out += [_found(keys, g, "design.csv") for g in groups]
    return out


# ------------------------------------------------------------------------------------------------------- estimation
def _terms(design: FoundDesign) -> tuple[list[tuple[int, ...]], dict, dict]:
    """The model's terms (main effects, then one per two-step chain clear of main effects), each main effect's
    aliased two-step interactions, and every two-step interaction's chain (signed, up to three steps)."""
    chains = alias_chains(design.matrix, max_order=3)
    f = design.factors
    name = lambda cols, s=1: ("-" if s < 0 else "") + ":".join(f[c] for c in cols)  # noqa: E731
    terms = [(i,) for i in range(len(f))]
    main_aliases, chain_of = {}, {}
    for chain in chains:
        lead = chain[0][0]
        if len(lead) == 1:
            main_aliases[f[lead[0]]] = [name(c, s) for c, s in chain[1:] if len(c) == 2]
        elif len(lead) == 2:
            terms.append(lead)
        for cols, _ in chain:
            if len(cols) == 2:
                chain_of[name(cols)] = [name(c, s * dict(chain)[cols]) for c, s in chain if c != cols]
    return terms, main_aliases, chain_of


def estimate(design: FoundDesign, response: str) -> dict | None:
    """Main effects and estimable two-step interactions of one response (OLS on the coded factors); None when the
    runs present cannot separate the main effects."""
    import statsmodels.api as sm

    runs = design.finished()
    y = pd.to_numeric(runs[response], errors="coerce") if response in runs.columns else pd.Series(dtype=float)
    ok = y.notna().to_numpy()
    runs, y = runs[ok], y[ok].to_numpy(float)
    if len(runs) == 0:
        return None
    terms, main_aliases, chain_of = _terms(design)
    x = runs[design.factors].to_numpy(float)
    cols = lambda ts: np.column_stack([np.ones(len(x))] + [x[:, list(t)].prod(axis=1) for t in ts])  # noqa: E731
    if np.linalg.matrix_rank(cols(terms)) < len(terms) + 1:  # runs missing: keep the main effects only
        terms = [t for t in terms if len(t) == 1]
        if np.linalg.matrix_rank(cols(terms)) < len(terms) + 1:
            return None
    with np.errstate(divide="ignore", invalid="ignore"):  # a saturated fit (no residual df) has no SE: None below
        fit = sm.OLS(y, cols(terms)).fit()
        fit.bse, fit.pvalues  # noqa: B018  (computed here, inside the errstate)
    has_error = fit.df_resid > 0 and np.isfinite(fit.bse).all()
    ci = 2 * np.asarray(fit.conf_int(0.05)) if has_error else np.full((len(terms) + 1, 2), np.nan)
    distinct = len(set(runs["key"]))
    out = {
        "n_runs": int(len(runs)),
        "n_points": distinct,
        "df_resid": int(fit.df_resid),
        "df_pure_error": int(len(runs) - distinct),
        "df_pooled_contrasts": int(fit.df_resid - (len(runs) - distinct)),
        "sigma": float(np.sqrt(fit.scale)) if has_error else None,
        "mean": float(y.mean()),
        "main_effects": {},
        "interactions": [],
    }
    for i, t in enumerate(terms, start=1):
        on = x[:, list(t)].prod(axis=1) > 0
        rec = {
            "effect": float(2 * fit.params[i]),
            "se": float(2 * fit.bse[i]) if has_error else None,
            "ci_low": float(ci[i, 0]) if has_error else None,
            "ci_high": float(ci[i, 1]) if has_error else None,
            "p": float(fit.pvalues[i]) if has_error else None,
            "mean_on": float(y[on].mean()) if on.any() else None,
            "mean_off": float(y[~on].mean()) if (~on).any() else None,
        }
        names = [design.factors[c] for c in t]
        if len(t) == 1:
            rec["aliases"] = main_aliases.get(names[0], [])
            out["main_effects"][names[0]] = rec
        else:
            term = ":".join(names)
            out["interactions"].append({"term": term, "aliases": chain_of.get(term, []), **rec})
    return out


# ------------------------------------------------------------------------------------------------------ comparisons
def _path_gains(summary: pd.DataFrame, regime: str) -> dict[str, tuple[float, float]]:
    """step -> (gain on this data's paper roadmap: the step's mean top-1 minus the previous step's, its SE)."""
    s = summary[(summary["regime"] == regime) & summary["without"].eq("") & summary["roadmap"].eq("paper")]
    s = s.set_index("bar")
    out = {}
    for prev, step in zip(STEPS, STEPS[1:]):
        if step in s.index and prev in s.index and s.loc[step, "n"] > 0 and s.loc[prev, "n"] > 0:
            a, b = s.loc[step], s.loc[prev]
            se = math.sqrt(a["top1_std"] ** 2 / a["n"] + b["top1_std"] ** 2 / b["n"]) if min(a["n"], b["n"]) > 1 else 0
            out[step] = (float(a["top1_mean"] - b["top1_mean"]), se if math.isfinite(se) and se > 0 else math.nan)
    return out


def _loo(summary: pd.DataFrame, regime: str) -> dict[str, tuple[float, float]]:
    """step -> (its leave-one-out contribution to ConvNeXt on this data, SE), from single-step removals."""
    loo = leave_one_out(summary)
    loo = loo[(loo["regime"] == regime) & (loo["full"] == STEPS[-1]) & (loo["roadmap"] == "paper")]
    loo = loo[~loo["without"].str.contains("+", regex=False) & (loo["n"] > 0) & (loo["full_n"] > 0)]
    return {r["without"]: (float(r["top1_contribution"]), float(r["top1_contribution_se"])) for _, r in loo.iterrows()}


def analyse(design: FoundDesign, summary: pd.DataFrame) -> dict:
    """One design's record for factorial.json: the design, what is missing, each response's effects, comparisons."""
    x = design.matrix
    words = defining_words(x)
    res = min((len(w) for w, _ in words), default=math.inf)
    letters = dict(zip(design.factors, "abcdefghijklmnopqrstuvwxyz"))
    missing = design.missing()
    regime = design.context.get("regime", "r50")
    responses = {r: estimate(design, r) for r in RESPONSES}
    path, loo = _path_gains(summary, regime), _loo(summary, regime)
    comparison = {}
    for step in design.factors:
        p_top1, p_gflops = paper_gain(step, regime)
        comparison[step] = {
            "paper_top1_gain": None if math.isnan(p_top1) else p_top1,
            "paper_gflops_gain": None if math.isnan(p_gflops) else p_gflops,
            "path_gain": path.get(step, (None, None))[0],
            "path_gain_se": _none(path.get(step, (None, None))[1]),
            "loo_contribution": loo.get(step, (None, None))[0],
            "loo_contribution_se": _none(loo.get(step, (None, None))[1]),
        }
    names = list(letters.values())
    return {
        "context": design.context,
        "source": design.source,
        "factors": design.factors,
        "letters": letters,
        "fixed_on": design.fixed_on,
        "fixed_off": design.fixed_off,
        "points": int(len(design.points)),
        "resolution": None if math.isinf(res) else int(res),
        "words": [("+" if s > 0 else "-") + "".join(names[c] for c in w) for w, s in words],
        "complete": bool(missing.empty),
        "points_finished": int(len(design.points) - len(missing)),
        "missing": missing.to_dict("records"),
        "collapsed": [
            {"without": r["without"], "seed": _none(r["seed"]), "top1": _none(r["top1"])}
            for _, r in design.collapsed().iterrows()
        ],
        "seeds": sorted({int(s) for s in design.finished()["seed"].dropna()}),
        "estimated_from": "the complete design"
        if missing.empty
        else f"the runs present only ({len(design.points) - len(missing)} of {len(design.points)} points)",
        "responses": responses,
        "aliases": _terms(design)[2],  # every two-step interaction -> what it is aliased with (signed, up to 3 steps)
        "comparison": comparison,
    }


def _none(x):
    """x, or None when it is missing or NaN (JSON has no NaN)."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def factorial_json(records: list[dict]) -> str:
    """factorial.json: {"designs": [one record per design found]}."""
    return json.dumps({"designs": records}, indent=1, default=str) + "\n"


# ---------------------------------------------------------------------------------------------------------- tables
def _title(step: str) -> str:
    """The paper's short title of a step."""
    ref = paper_step(step)
    return ref.title if ref else step


def _pm(rec: dict | None, key: str = "effect", digits: int = 2) -> str:
    """'+0.42 ± 0.11' (effect ± SE), the SE left out when unknown, an en dash when there is no estimate."""
    if not rec or rec.get(key) is None:
        return "–"
    se = rec.get("se")
    return f"{rec[key]:+.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def _ci(rec: dict | None, digits: int = 2) -> str:
    """'[lo, hi]' or an en dash."""
    if not rec or rec.get("ci_low") is None:
        return "–"
    return f"[{rec['ci_low']:+.{digits}f}, {rec['ci_high']:+.{digits}f}]"


def _signed(x, digits: int = 2) -> str:
    """A signed number, an en dash when missing."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}f}"


def _headline(rec: dict) -> str:
    """One line naming the design: points, resolution, seeds, context, completeness."""
    res = rec["resolution"]
    kind = "full factorial" if res is None else f"resolution {ROMAN.get(res, res)}"
    ctx = ", ".join(v for v in rec["context"].values() if v)
    design = f"{rec['points']}-run two-level design of {len(rec['factors'])} steps ({kind})"
    return f"{design}, {_seeds(rec)}, {ctx or 'no finished runs'}"


def _seeds(rec: dict) -> str:
    """ "2 seeds", plus the runs fitted when they are not points x seeds (runs missing or collapsed, or replicates
    from other sweeps at the design's points, e.g. a roadmap's ConvNeXt)."""
    seeds, n = len(rec["seeds"]), (rec["responses"].get("top1") or {}).get("n_runs")
    label = f"{seeds} seed{'s' * (seeds != 1)}"
    return label if n is None or n == rec["points"] * seeds else f"{label}, {n} runs fitted"


def factorial_markdown(records: list[dict]) -> str:
    """factorial.md: per design, the missing runs, the main effects of each response beside the path, leave-one-out
    and the paper, the estimable interactions and the aliases."""
    out = []
    for rec in records:
        out += [f"### Factorial: {_headline(rec)}", ""]
        held = ", ".join(rec["fixed_on"]) or "none"
        out += [
            f"Steps varied: {', '.join(rec['factors'])}. Held on: {held}. Held off: "
            f"{', '.join(rec['fixed_off']) or 'none'}. Design from {rec['source']}. Word-length pattern (words of "
            f"length 3, 4, ...): {_wlp(rec)}.",
            "",
        ]
        if not rec["complete"]:
            out += [
                f"**Incomplete: {len(rec['missing'])} of {rec['points']} points have no finished run; every effect "
                f"below is estimated from {rec['estimated_from']}.** Missing:",
                "",
                *[f"- without={m['without'] or '[]'} ({m['status']})" for m in rec["missing"]],
                "",
            ]
        if collapsed := rec.get("collapsed"):
            out += [
                f"**Collapsed: {len(collapsed)} finished run(s) ended at chance level (top-1 at most "
                f"{COLLAPSE_FACTOR:g}x chance) and are left out of every effect below; their points are estimated "
                "from their other seeds:**",
                "",
                *[f"- without={c['without'] or '[]'}, seed {c['seed']}: top-1 {c['top1']:.2f}" for c in collapsed],
                "",
            ]
        top1 = rec["responses"].get("top1")
        out += [
            "Main effect = mean with the step on minus mean with it off, over every run of the design (OLS on the "
            "coded factors); ± = standard error, 95 % interval from the t distribution with the residual degrees of "
            "freedom (seed replicates and pooled higher-order contrasts). Path = the step's gain on this data's "
            "roadmap; leave-one-out = ConvNeXt minus ConvNeXt without the step (both ± SE, when those runs were "
            "given); "
            "paper = Table 10.",
            "",
        ]
        if top1 is not None:
            out += [
                f"Top-1: {top1['n_runs']} runs at {top1['n_points']} points, residual df {top1['df_resid']} "
                f"({top1['df_pure_error']} from seed replicates, {top1['df_pooled_contrasts']} from pooled "
                f"contrasts), residual SD {_num(top1['sigma'], 3)} points.",
                "",
            ]
        out += [
            "| step | top-1 effect | 95 % CI | path gain | leave-one-out | paper gain | GFLOPs effect | paper GFLOPs "
            "| img/s effect | aliased 2-step interactions |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for step in rec["factors"]:
            c = rec["comparison"][step]
            main = lambda resp, rec=rec, step=step: _main(rec, resp, step)  # noqa: E731
            path = {"effect": c["path_gain"], "se": c["path_gain_se"]}
            loo = {"effect": c["loo_contribution"], "se": c["loo_contribution_se"]}
            aliases = ", ".join((main("top1") or {}).get("aliases", [])) or "none"
            out.append(
                f"| {_title(step)} | {_pm(main('top1'))} | {_ci(main('top1'))} | {_pm(path)} | {_pm(loo)} "
                f"| {_signed(c['paper_top1_gain'])} | {_pm(main('gflops'), digits=3)} "
                f"| {_signed(c['paper_gflops_gain'])} | {_pm(main('img_per_s'), digits=1)} | {aliases} |"
            )
        out.append("")
        out += _interaction_table(top1)
    return "\n".join(out)


def _interaction_table(top1: dict | None) -> list[str]:
    """Markdown lines: the two-step interaction chains the design estimates (top-1), largest first."""
    if top1 is None or not top1["interactions"]:
        return []
    out = [
        "Two-step interactions the design estimates (top-1; each is the sum of its alias chain):",
        "",
        "| interaction | effect | 95 % CI | aliased with |",
        "|---|---:|---:|---|",
    ]
    for it in sorted(top1["interactions"], key=lambda i: -abs(i["effect"])):
        aliases = ", ".join(a for a in it["aliases"] if a.count(":") == 1) or "none (clear)"
        out.append(f"| {it['term']} | {_pm(it)} | {_ci(it)} | {aliases} |")
    return out + [""]


def _main(rec: dict, response: str, step: str) -> dict | None:
    """A record's main effect of one step on one response (None when not estimated)."""
    return (rec["responses"].get(response) or {}).get("main_effects", {}).get(step)


def _wlp(rec: dict) -> str:
    """The word-length pattern (A3, A4, ...) of a record's defining relation, or 'none' for a full factorial."""
    lengths = [len(w) - 1 for w in rec["words"]]
    if not lengths:
        return "none (full factorial)"
    return "(" + ", ".join(str(lengths.count(n)) for n in range(3, max(lengths) + 1)) + ")"


def _num(x, digits: int) -> str:
    """A number, or an en dash for None."""
    return "–" if x is None else f"{x:.{digits}f}"


# --------------------------------------------------------------------------------------------------------- figures
def factorial_figure(rec: dict, out_stem: Path) -> Figure:
    """One row per step: top-1 main effect ± 95 % CI beside this data's path gain and leave-one-out contribution (when
    given) and the paper's Table 10 gain; GFLOPs and img/s main effects beside. Writes out_stem.png/.svg."""
    with mpl.rc_context(STYLE):
        return _figure(rec, out_stem)


def _bar_specs(rec: dict, step: str) -> list[tuple[str, float | None, float | None]]:
    """(kind, value, half-width of its 95 % interval) of the top-1 bars of one step."""
    main = (rec["responses"].get("top1") or {}).get("main_effects", {}).get(step) or {}
    c = rec["comparison"][step]
    half = None
    if main.get("ci_low") is not None:
        half = (main["ci_high"] - main["ci_low"]) / 2
    z = 1.96  # path and leave-one-out: normal approximation, as their SEs are of unpaired means over few seeds
    specs = [("factorial", main.get("effect"), half)]
    specs.append(("path", c["path_gain"], z * c["path_gain_se"] if c["path_gain_se"] is not None else None))
    specs.append(("loo", c["loo_contribution"], z * c["loo_contribution_se"] if c["loo_contribution_se"] else None))
    specs.append(("paper", c["paper_top1_gain"], None))
    return specs


def _figure(rec: dict, out_stem: Path) -> Figure:
    """factorial_figure's body, inside the style context: the top-1 panel, the two side panels, header, legend."""
    steps = rec["factors"]
    kinds = ["factorial"] + [k for k in ("path", "loo") if any(rec["comparison"][s][_K[k]] is not None for s in steps)]
    kinds.append("paper")
    n = len(steps)
    fig = _new_figure((15, 2.6 + 0.22 * len(kinds) * n + 0.2 * n))
    ax, axg, axs = fig.subplots(1, 3, sharey=True, gridspec_kw={"width_ratios": [2.2, 1, 1]})
    for i in range(0, n, 2):
        for a in (ax, axg, axs):
            a.axhspan(i - 0.5, i + 0.5, color="#f2f2f2", zorder=0, lw=0)
    _top1_panel(ax, rec, kinds)
    _side_panel(axg, rec, "gflops", "paper_gflops_gain", "GFLOPs change (224 px, full width)", "GFLOPs: main effect")
    _side_panel(axs, rec, "img_per_s", None, "training img/s change", "training speed: main effect")
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_yticks(range(n), [_title(s) for s in steps])
    for a in (ax, axg, axs):
        a.axvline(0, color="black", linewidth=0.8, zorder=3)
        a.grid(axis="x", zorder=1)
        a.tick_params(axis="y", length=0)
    _header(fig, ax, rec)
    _legend(fig, kinds)
    _save(fig, out_stem)
    return fig


def _top1_panel(ax, rec: dict, kinds: list[str]) -> None:
    """One group of bars per step: the main effect (labelled with its value and 95 % half-width), then this data's
    path gain and leave-one-out contribution where given, then the paper's gain; each bar has gid '<kind>:<step>'."""
    h = 0.8 / len(kinds)
    offsets = {k: (i - (len(kinds) - 1) / 2) * h for i, k in enumerate(kinds)}
    ends = [0.0]
    for i, step in enumerate(rec["factors"]):
        for kind, value, half in _bar_specs(rec, step):
            if kind not in kinds or value is None:
                continue
            ends += [value - (half or 0), value + (half or 0)]
            paper = kind == "paper"
            ax.barh(i + offsets[kind], value, height=h * 0.92, color=KIND_COLOURS[kind], alpha=0.55 if paper else 0.9,
                    hatch="///" if paper else None, edgecolor="white", linewidth=0.4, xerr=half,
                    error_kw={"ecolor": "black", "capsize": 2, "elinewidth": 0.9}, zorder=2,
                    gid=f"{kind}:{step}")  # fmt: skip
            if kind == "factorial":
                label = f"{value:+.2f}" + (f" ± {half:.2f}" if half is not None else "")
                x_end = value + math.copysign(half or 0, value)  # beyond the error bar
                ax.text(x_end, i + offsets[kind], f"  {label}  ", va="center", ha="left" if x_end >= 0 else "right",
                        fontsize=7.5, zorder=4)  # fmt: skip
    lo, hi = min(ends), max(ends)
    span = max(hi - lo, 0.1)
    ax.set_xlim(lo - 0.25 * span, hi + 0.25 * span)
    ax.set_xlabel("top-1 change (points) when the step is switched on")
    ax.set_title("top-1: main effect (average over all contexts) vs one context", loc="left", fontweight="bold")


def _header(fig: Figure, ax, rec: dict) -> None:
    """The title (design, runs, seeds), what the other steps are held at, and a red line when runs are missing."""
    k, res = len(rec["factors"]), rec["resolution"]
    kind = (
        "full factorial"
        if res is None
        else f"2^({k}-{k - int(math.log2(rec['points']))}) resolution " + str(ROMAN.get(res, res))
    )
    fig.suptitle(
        f"Which step buys what, averaged over contexts: {kind}, {rec['points']} runs x {_seeds(rec)}",
        fontsize=12,
        fontweight="bold",
    )
    held = "ConvNeXt" if not rec["fixed_off"] else f"ConvNeXt without {', '.join(rec['fixed_off'])}"
    note = f"steps not varied held as in {held} · {', '.join(v for v in rec['context'].values() if v)}"
    ax.text(0, 1.05, note, transform=ax.transAxes, fontsize=8.5, color="dimgrey")
    warnings = []
    if not rec["complete"]:
        warnings.append(
            f"INCOMPLETE: {len(rec['missing'])} of {rec['points']} points missing; effects estimated from "
            f"{rec['estimated_from']}"
        )
    if rec.get("collapsed"):
        warnings.append(f"{len(rec['collapsed'])} run(s) collapsed to chance level, left out (see factorial.md)")
    if warnings:
        ax.text(0, 1.1, " · ".join(warnings), transform=ax.transAxes, fontsize=9, color="#d62728", fontweight="bold")


def _legend(fig: Figure, kinds: list[str]) -> None:
    """What each kind of bar is, below the panels."""
    labels = {
        "factorial": "main effect: mean(on) − mean(off) over the design (± 95 % CI, t)",
        "path": "this data's roadmap: gain over the previous step (± 1.96 SE)",
        "loo": "this data's leave-one-out: ConvNeXt − ConvNeXt without it (± 1.96 SE)",
        "paper": "paper: the step's gain on its roadmap (Table 10, ImageNet)",
    }
    handles = [
        Patch(facecolor=KIND_COLOURS[k], alpha=0.55 if k == "paper" else 0.9, hatch="///" if k == "paper" else None,
              edgecolor="white", label=labels[k])
        for k in kinds
    ]  # fmt: skip
    fig.legend(handles=handles, loc="outside lower center", ncol=2, frameon=False)


_K = {"path": "path_gain", "loo": "loo_contribution"}


def _side_panel(a, rec: dict, response: str, paper_key: str | None, xlabel: str, title: str) -> None:
    """A narrow panel: one response's main effects (± 95 % CI), the paper's gain beside when there is one."""
    effects = (rec["responses"].get(response) or {}).get("main_effects", {})
    digits = RESPONSES[response][2]
    ends = [0.0]
    for i, step in enumerate(rec["factors"]):
        m = effects.get(step)
        paper = rec["comparison"][step].get(paper_key) if paper_key else None
        h = 0.38 if paper is not None else 0.6
        if m is not None:
            half = (m["ci_high"] - m["ci_low"]) / 2 if m.get("ci_low") is not None else None
            y = i - h / 2 if paper is not None else i
            a.barh(y, m["effect"], height=h, color=KIND_COLOURS["factorial"], alpha=0.9, xerr=half,
                   error_kw={"ecolor": "black", "capsize": 2, "elinewidth": 0.9}, zorder=2)  # fmt: skip
            ends += [m["effect"] - (half or 0), m["effect"] + (half or 0)]
            x_end = m["effect"] + math.copysign(half or 0, m["effect"])  # beyond the error bar
            value = round(m["effect"], digits) + 0.0  # + 0.0: a rounded -0.0 reads +0.000, not -0.000
            a.text(x_end, y, f"  {value:+.{digits}f}  ", va="center", ha="left" if x_end >= 0 else "right",
                   fontsize=7, zorder=4)  # fmt: skip
        if paper is not None:
            a.barh(i + h / 2, paper, height=h, color=KIND_COLOURS["paper"], alpha=0.55, hatch="///",
                   edgecolor="white", linewidth=0.4, zorder=2)  # fmt: skip
            ends.append(paper)
    lo, hi = min(ends), max(ends)
    span = max(hi - lo, 1e-6)
    a.set_xlim(lo - 0.3 * span, hi + 0.3 * span)
    a.set_xlabel(xlabel)
    a.set_title(title, loc="left", fontweight="bold")


def halfnormal_figure(rec: dict, out_stem: Path) -> Figure:
    """Half-normal plots of every estimated effect (main effects and two-step chains), one panel per response:
    effects that are noise lie on the line of slope SE through the origin, real ones above it."""
    with mpl.rc_context(STYLE):
        from scipy.stats import halfnorm

        present = [r for r in RESPONSES if rec["responses"].get(r)]
        fig = _new_figure((5.2 * max(len(present), 1), 5.0))
        axes = np.atleast_1d(fig.subplots(1, max(len(present), 1)))
        for a, resp in zip(axes, present):
            est = rec["responses"][resp]
            terms = [(s, m) for s, m in est["main_effects"].items()] + [(i["term"], i) for i in est["interactions"]]
            terms.sort(key=lambda t: abs(t[1]["effect"]))
            m = len(terms)
            q = halfnorm.ppf((np.arange(1, m + 1) - 0.5) / m)  # Daniel (1959): the i-th of m |effects| vs its quantile
            vals = np.array([abs(t[1]["effect"]) for t in terms])
            mains = np.array([":" not in t[0] for t in terms])
            a.scatter(q[mains], vals[mains], color=KIND_COLOURS["factorial"], zorder=3, label="main effect", s=22)
            a.scatter(q[~mains], vals[~mains], facecolor="white", edgecolor="#c44e52", zorder=3, s=22,
                      label="two-step interaction (alias chain)")  # fmt: skip
            se = terms[0][1].get("se") if terms else None
            if se:
                a.plot([0, q.max() * 1.05], [0, se * q.max() * 1.05], color="dimgrey", ls="--", lw=1,
                       label="noise: slope = SE of an effect")  # fmt: skip
            # name the effects that stand out (|t| > 3), at most 6, else the 3 largest; labels kept apart vertically
            big = [i for i in range(m) if se and vals[i] > 3 * se][-6:] or list(range(max(0, m - 3), m))
            top, last = (vals.max() if m else 1) * 1.12, None
            for i in reversed(big):
                y = vals[i] if last is None else min(vals[i], last - 0.045 * top)
                label = " × ".join(_title(s) for s in terms[i][0].split(":"))
                a.annotate(
                    label,
                    (q[i], vals[i]),
                    xytext=(q[i] - 0.06, y),
                    textcoords="data",
                    ha="right",
                    va="center",
                    fontsize=7.5,
                    arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5},
                )
                last = y
            a.set_xlabel("half-normal quantile")
            a.set_ylabel(f"|effect| ({RESPONSES[resp][1]})")
            a.set_title(RESPONSES[resp][0], loc="left", fontweight="bold")
            a.set_xlim(0, q.max() * 1.1 if m else 1)
            a.set_ylim(0, vals.max() * 1.12 if m and vals.max() > 0 else 1)
            a.grid(True)
            a.legend(loc="upper left", fontsize=7.5, frameon=False)
        fig.suptitle(f"Half-normal plots: {_headline(rec)}", fontsize=11, fontweight="bold")
        _save(fig, out_stem)
        return fig


def write_factorial(df: pd.DataFrame, summary: pd.DataFrame, out: Path, paths=()) -> tuple[dict[str, Path], set]:
    """Find the designs among the runs and write factorial.json/.md, factorial.png/.svg, factorial_halfnormal.png/.svg
    (with several designs, the figures per design as factorial_<i>...), and design.csv for a single one when out has
    none; returns ({file name: path}, the `without` of every design point), both empty when no design is found."""
    designs = find_designs(df, paths)
    written: dict[str, Path] = {}
    if not designs:
        return written, set()
    records = [analyse(d, summary) for d in designs]
    (out / "factorial.json").write_text(factorial_json(records))
    (out / "factorial.md").write_text(factorial_markdown(records))
    written.update({"factorial.json": out / "factorial.json", "factorial.md": out / "factorial.md"})
    for i, rec in enumerate(records):
        suffix = "" if len(records) == 1 else f"_{i}"
        factorial_figure(rec, out / f"factorial{suffix}")
        halfnormal_figure(rec, out / f"factorial_halfnormal{suffix}")
        for stem in (f"factorial{suffix}", f"factorial_halfnormal{suffix}"):
            for ext in ("png", "svg"):
                written[f"{stem}.{ext}"] = out / f"{stem}.{ext}"
    if len(designs) == 1 and not (out / "design.csv").exists():
        # so that out/results.csv, merged again later, finds the same planned points (missing ones included)
        d = designs[0]
        frame = d.points[d.factors].astype(int).assign(without=d.points["without"])
        frame.insert(0, "run", range(len(frame)))
        frame.to_csv(out / "design.csv", index=False)
        written["design.csv"] = out / "design.csv"
    print(factorial_markdown(records))
    return written, {w for d in designs for w in d.points["without"]}


__all__ = [
    "FoundDesign", "RESPONSES", "analyse", "estimate", "factorial_figure", "factorial_json", "factorial_markdown",
    "find_designs", "halfnormal_figure", "read_planned", "recognise", "write_factorial",
]  # fmt: skip
