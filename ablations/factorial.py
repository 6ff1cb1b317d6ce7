"""Two-level factorial designs over the roadmap's steps: which step buys what, averaged over contexts.

A factor is a roadmap step after baseline, on (+1) or off (-1). A model is the set of steps switched on
(models.roadmap.config_of), so a run of the design is `step=separate_downsampling without=[the steps off]`: the run
folders, resume, FLOP counts and the analysis need nothing new. Steps that are not factors stay at one level in
every run (on by default, so the design varies around ConvNeXt; `fixed_off` holds some off).

Designs come from pyDOE (`fracfact` with a generator string, `ff2n`, `fold`); the generators are the
minimum-aberration sets of the literature (CATALOGUE), because pyDOE's own `fracfact_by_res` picks the first set it
finds (for 8 factors at resolution III it returns a resolution III design where a resolution IV one exists, and
for 12 factors in 16 runs 17 three-letter words where the minimum is 16). Alias chains and the defining relation are
computed here from the design matrix itself, up to sign: pyDOE's `fracfact_aliasing` groups columns by equality, so
it would split AB = -CD into two chains. Nothing here imports Hydra.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from string import ascii_lowercase
from typing import List, Optional, Sequence

import numpy as np
import pandas as pd

from models import STEPS, ConfigError

FACTORS = STEPS[1:]  # every step but baseline can be switched off
KINDS = {"res4": 4, "res3": 3, "full": None}  # design kind -> the resolution it guarantees (None: every effect)
ROMAN = {3: "III", 4: "IV", 5: "V", 6: "VI", 7: "VII", 8: "VIII"}

# Minimum-aberration generators, (runs, factors) -> pyDOE fracfact string (base factors a, b, ... then the generated
# columns). Sources: D. C. Montgomery, Design and Analysis of Experiments, 8th ed. (Wiley 2012), Table 8.14 "Selected
# 2^(k-p) fractional factorial designs" for every entry up to 11 factors (it lists 2^(9-5), 2^(10-6), 2^(11-7) as the
# first columns of the saturated 2^(15-11)_III design E=ABC F=BCD G=ACD H=ABD J=ABCD K=AB L=AC M=AD ..., whose first
# 12 columns are the 16-run 12-factor entry); NIST/SEMATECH Dataplot, "Index of minimal-sample-size resolution-4
# 2**(k-p) designs" (DEXRES4), for 2^(12-7)_IV: 6=123 7=124 8=125 9=134 0=135 A=145 B=234. Every entry was checked
# to have the minimum word-length pattern among all regular designs of its size by exhaustive search over generator
# sets; tests/test_factorial.py repeats that check (the 12-factor 32-run one over the projections of the maximal
# even design, which hold every resolution IV design of more than 10 factors in 32 runs: Chen & Cheng, Ann. Statist.
# 34 (2006) 546-558).
CATALOGUE = {
    (4, 3): "a b ab",  # 2^(3-1)_III
    (8, 4): "a b c abc",  # 2^(4-1)_IV
    (8, 5): "a b c ab ac",  # 2^(5-2)_III
    (8, 6): "a b c ab ac bc",  # 2^(6-3)_III
    (8, 7): "a b c ab ac bc abc",  # 2^(7-4)_III, saturated
    (16, 5): "a b c d abcd",  # 2^(5-1)_V
    (16, 6): "a b c d abc bcd",  # 2^(6-2)_IV
    (16, 7): "a b c d abc bcd acd",  # 2^(7-3)_IV
    (16, 8): "a b c d bcd acd abc abd",  # 2^(8-4)_IV
    (16, 9): "a b c d abc bcd acd abd abcd",  # 2^(9-5)_III
    (16, 10): "a b c d abc bcd acd abd abcd ab",  # 2^(10-6)_III
    (16, 11): "a b c d abc bcd acd abd abcd ab ac",  # 2^(11-7)_III
    (16, 12): "a b c d abc bcd acd abd abcd ab ac ad",  # 2^(12-8)_III
    (32, 6): "a b c d e abcde",  # 2^(6-1)_VI
    (32, 7): "a b c d e abcd abde",  # 2^(7-2)_IV
    (32, 8): "a b c d e abc abd bcde",  # 2^(8-3)_IV
    (32, 9): "a b c d e bcde acde abde abce",  # 2^(9-4)_IV
    (32, 10): "a b c d e abcd abce abde acde bcde",  # 2^(10-5)_IV
    (32, 11): "a b c d e abc bcd cde acd ade bde",  # 2^(11-6)_IV
    (32, 12): "a b c d e abc abd abe acd ace ade bcd",  # 2^(12-7)_IV
}


@dataclass
class FactorialConfig:
    """The `factorial` node of a run's config: which design `+sweep=factorial` runs (no effect on the model)."""

    factors: List[str] = field(default_factory=lambda: list(FACTORS))  # roadmap steps varied on/off
    design: str = "res4"  # res4 | res3 | full
    foldover: bool = False  # add the mirror image of every run (resolution III -> IV), doubling the runs
    runs: Optional[int] = None  # runs before a fold-over; null: the fewest that give the design's resolution
    fixed_off: List[str] = field(default_factory=list)  # steps that are not factors, held off (the rest stay on)
    max_runs: int = 256  # refuse larger designs (a full factorial of 12 steps is 4096 runs)


def resolution(matrix: np.ndarray) -> float:
    """The design's resolution from its matrix: the length of the shortest word (a product of columns that is
    constant, +1 or -1, over the runs); inf when no product is constant (a full factorial)."""
    words = defining_words(matrix)
    return float(min(len(w) for w, _ in words)) if words else math.inf


def defining_words(matrix: np.ndarray) -> list[tuple[tuple[int, ...], int]]:
    """Every word of the defining relation as (column indices, sign): the column products constant over the runs."""
    # each column as a bit mask of the runs where it is -1: a product of columns is then the XOR of their masks, so
    # all 2^k products cost one integer operation each (a 12-factor design: 4095 products in milliseconds)
    x = np.asarray(matrix)
    masks = [int(sum(1 << int(r) for r in np.flatnonzero(x[:, j] < 0))) for j in range(x.shape[1])]
    every = (1 << x.shape[0]) - 1
    out = []
    for r in range(1, x.shape[1] + 1):
        for cols in itertools.combinations(range(x.shape[1]), r):
            m = 0
            for c in cols:
                m ^= masks[c]
            if m in (0, every):
                out.append((cols, 1 if m == 0 else -1))
    return out


def alias_chains(matrix: np.ndarray, max_order: int = 3) -> list[list[tuple[tuple[int, ...], int]]]:
    """Effects up to max_order grouped by their column in the design up to sign: each chain is a list of
    (column indices, sign relative to the chain's first effect), lowest order first; chains in order of their first
    effect. Effects whose column is constant (words of the defining relation) form no chain."""
    x = np.asarray(matrix, dtype=int)
    chains: dict[bytes, list] = {}
    for r in range(1, max_order + 1):
        for cols in itertools.combinations(range(x.shape[1]), r):
            col = x[:, cols].prod(axis=1)
            if (col == col[0]).all():
                continue
            key = (col * col[0]).tobytes()  # sign-normalised: AB and -AB share a key
            chains.setdefault(key, []).append((cols, col))
    out = []
    for members in chains.values():
        first = members[0][1]
        out.append([(cols, int(np.sign(col @ first))) for cols, col in members])
    return out


def _validate_steps(names: Sequence[str], what: str) -> tuple[str, ...]:
    """Step names in paper order, each once; ConfigError (one paragraph, the valid names) for anything else."""
    names = [str(n) for n in names]
    valid = ", ".join(FACTORS)
    for name in names:
        if name == STEPS[0]:
            raise ConfigError(
                f"{what}: 'baseline' cannot be a factor: it is the ResNet every other step modifies, not a delta that "
                f"can be switched on and off; factors are the steps after it: {valid}"
            )
        if name not in FACTORS:
            raise ConfigError(f"{what}: unknown step {name!r}; factors are roadmap steps after baseline: {valid}")
    twice = sorted({n for n in names if names.count(n) > 1}, key=STEPS.index)
    if twice:
        raise ConfigError(f"{what} lists {', '.join(twice)} more than once; each step is one factor")
    return tuple(sorted(names, key=STEPS.index))


def _base_matrix(k: int, kind: str, runs: int | None) -> tuple[np.ndarray, str]:
    """The design matrix (runs x k, +-1) of a kind and its pyDOE generator string ('' for a full factorial)."""
    from pydoe import ff2n, fracfact

    res = KINDS[kind]
    if res is None:
        if runs is not None and runs != 2**k:
            raise ConfigError(
                f"factorial.design=full with {k} factors is 2^{k} = {2**k} runs, not factorial.runs={runs}; "
                "leave factorial.runs unset, or pick res3 / res4 for fewer runs"
            )
        return ff2n(k), ""
    fewest = _fewest_runs(k, res)
    if runs is None:
        runs = fewest
    if runs < 2 or runs & (runs - 1):
        raise ConfigError(f"factorial.runs={runs} is not a power of two (a regular two-level design has 2^m runs)")
    if runs < fewest:
        holds = runs - 1 if res == 3 else runs // 2
        raise ConfigError(
            f"factorial.design={kind} cannot hold {k} factors in {runs} runs: {runs} runs hold at most {holds} factors "
            f"at resolution {ROMAN[res]}; {kind} needs at least {fewest} runs for {k} factors (leave factorial.runs "
            "unset for the fewest), or vary fewer factors"
        )
    if runs >= 2**k:
        if runs > 2**k:
            raise ConfigError(
                f"factorial.runs={runs} is more than the full factorial of {k} factors ({2**k} runs); for more data "
                "run more seeds"
            )
        return ff2n(k), ""
    gen = CATALOGUE.get((runs, k))
    if gen is None:
        sizes = sorted(r for r, n in CATALOGUE if n == k and r >= fewest) + [2**k]
        raise ConfigError(
            f"no {runs}-run design of {k} factors in the catalogue of minimum-aberration designs; for {k} factors "
            f"{kind} can run {', '.join(map(str, sizes))} runs (factorial.runs=...)"
        )
    return fracfact(gen), gen


def _fewest_runs(k: int, res: int) -> int:
    """The fewest runs of a regular design of k factors at resolution >= res (III: 2^m - 1 >= k, IV: 2^(m-1) >= k)."""
    runs = 4 if k >= 2 else 2
    while (runs - 1 if res == 3 else runs // 2) < k:
        runs *= 2
    return min(runs, 2**k)


@dataclass
class Design:
    """A two-level design over roadmap steps: the +-1 matrix (runs x factors) and what each run switches off."""

    factors: tuple[str, ...]
    matrix: np.ndarray
    kind: str = "res4"
    foldover: bool = False
    generators: str = ""  # pyDOE generator string of the design before its fold-over ('' for a full factorial)
    fixed_off: tuple[str, ...] = ()

    @property
    def runs(self) -> int:
        """Number of runs (design points) per seed."""
        return int(self.matrix.shape[0])

    @property
    def letters(self) -> dict[str, str]:
        """step -> the letter naming it in generators and words (a, b, ... in paper order)."""
        return dict(zip(self.factors, ascii_lowercase))

    @property
    def resolution(self) -> float:
        """Resolution computed from the matrix (inf for a full factorial)."""
        return resolution(self.matrix)

    def without(self, i: int) -> list[str]:
        """Run i as the steps it switches off (factors at -1, then the fixed-off steps), in paper order."""
        off = [f for f, v in zip(self.factors, self.matrix[i]) if v < 0] + list(self.fixed_off)
        return sorted(off, key=STEPS.index)

    def withouts(self) -> list[list[str]]:
        """Every run's left-out steps."""
        return [self.without(i) for i in range(self.runs)]

    def sweep_value(self) -> str:
        """The runs as a Hydra sweep over `without`: "[],[gelu],[gelu,bn_to_ln],..."."""
        return ",".join("[" + ",".join(w) + "]" for w in self.withouts())

    def frame(self) -> pd.DataFrame:
        """design.csv: one row per run, the factors as +-1 columns, and the run's `without` ("+"-joined)."""
        df = pd.DataFrame(self.matrix.astype(int), columns=list(self.factors))
        df.insert(0, "run", range(len(df)))
        df["without"] = ["+".join(w) for w in self.withouts()]
        return df

    def words(self) -> list[str]:
        """The defining relation's words, as signed products of step letters ("+abcf", "-bcdg")."""
        names = list(self.letters.values())
        return [("+" if s > 0 else "-") + "".join(names[c] for c in cols) for cols, s in defining_words(self.matrix)]

    def aliases(self, max_order: int = 3) -> list[list[str]]:
        """Alias chains of main effects and two-step interactions (with effects up to max_order in them), as step
        names joined by ':' and signed relative to the chain's first effect ("-gelu:bn_to_ln")."""
        out = []
        for chain in alias_chains(self.matrix, max_order):
            if len(chain[0][0]) > 2:
                continue  # chains led by three-step interactions: nothing estimable of interest in them
            out.append([("-" if s < 0 else "") + ":".join(self.factors[c] for c in cols) for cols, s in chain])
        return out

    def info(self) -> dict:
        """design.json: the kind, runs, factors and letters, fixed steps, generators, words and alias chains."""
        res = self.resolution
        return {
            "kind": self.kind,
            "foldover": self.foldover,
            "runs": self.runs,
            "resolution": None if math.isinf(res) else int(res),
            "factors": list(self.factors),
            "letters": self.letters,
            "fixed_on": [s for s in FACTORS if s not in self.factors and s not in self.fixed_off],
            "fixed_off": list(self.fixed_off),
            "generators": self.generators,
            "words": self.words(),
            "aliases": self.aliases(),
        }

    def markdown(self) -> str:
        """design.md: what the design is, its letters, generators and the alias chains of main effects and 2fis."""
        info, res = self.info(), self.resolution
        title = "full factorial" if math.isinf(res) else f"resolution {ROMAN.get(int(res), int(res))} fraction"
        fold = " with its fold-over" if self.foldover else ""
        lines = [
            f"# Factorial design: {self.kind}{fold}, {self.runs} runs, {len(self.factors)} factors ({title})",
            "",
            "Each run is `step=separate_downsampling without=[steps at -1, fixed-off steps]`; design.csv lists them.",
            f"Steps held on in every run: {', '.join(info['fixed_on']) or 'none'}; held off: "
            f"{', '.join(self.fixed_off) or 'none'}.",
            "",
            "| letter | step |",
            "|---|---|",
            *[f"| {letter} | {step} |" for step, letter in self.letters.items()],
            "",
            f"Generators (pyDOE `fracfact`, before any fold-over): `{self.generators or 'none (full factorial)'}`",
            "",
            f"Defining relation (words, from the design matrix): {', '.join(info['words']) or 'none'}",
            "",
            "Alias chains (main effects and two-step interactions, with aliased effects up to three steps; '-' = "
            "aliased with the opposite sign):",
            "",
            *[f"- {' = '.join(chain)}" for chain in info["aliases"]],
            "",
        ]
        return "\n".join(lines)

    def write(self, folder) -> list:
        """Write design.csv, design.json and design.md into folder; returns the paths."""
        from pathlib import Path

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / "design.csv", folder / "design.json", folder / "design.md"]
        self.frame().to_csv(paths[0], index=False)
        paths[1].write_text(json.dumps(self.info(), indent=1) + "\n")
        paths[2].write_text(self.markdown())
        return paths


def make_design(
    factors: Sequence[str] | None = None,
    kind: str = "res4",
    *,
    foldover: bool = False,
    runs: int | None = None,
    fixed_off: Sequence[str] = (),
    max_runs: int = 256,
) -> Design:
    """A two-level design over roadmap steps (default: the 12 steps after baseline, resolution IV, 32 runs).

    kind res4: a minimum-aberration regular fraction of resolution IV (main effects clear of every two-step
    interaction) in the fewest runs, or in `runs`; res3: resolution III (a screen, main effects aliased with two-step
    interactions); full: every combination. foldover adds the mirror image of every run. Raises ConfigError (one
    paragraph, with the valid choices) for unknown or repeated steps, baseline, a kind that cannot hold the factors.
    """
    from pydoe import fold

    if kind not in KINDS:
        raise ConfigError(f"unknown factorial.design {kind!r}; valid: {', '.join(KINDS)}")
    chosen = _validate_steps(FACTORS if factors is None else factors, "factorial.factors")
    if len(chosen) < 2:
        raise ConfigError(
            f"factorial.factors={list(chosen)}: a factorial design needs at least 2 factors (for one step alone, "
            "compare the model with and without it: without=[...])"
        )
    held = _validate_steps(fixed_off, "factorial.fixed_off")
    both = [s for s in held if s in chosen]
    if both:
        raise ConfigError(
            f"factorial.fixed_off lists {', '.join(both)}, which factorial.factors varies; a step is either a factor "
            "or held at one level"
        )
    matrix, gen = _base_matrix(len(chosen), kind, runs)
    if foldover:
        if not gen:
            raise ConfigError(
                "factorial.foldover=true on a full factorial would only repeat its runs; run more seeds instead"
            )
        matrix = fold(matrix)
    if len(matrix) > max_runs:
        raise ConfigError(
            f"factorial.design={kind} with {len(chosen)} factors is {len(matrix)} runs per seed, more than "
            f"factorial.max_runs={max_runs}; pick res4 or res3, vary fewer factors, or raise factorial.max_runs"
        )
    return Design(chosen, matrix.astype(int), kind, bool(foldover), gen, held)


def design_of(cfg: FactorialConfig | dict) -> Design:
    """make_design from a `factorial` config node (a FactorialConfig or its dict)."""
    c = cfg if isinstance(cfg, dict) else cfg.__dict__
    return make_design(
        c.get("factors"),
        c.get("design", "res4"),
        foldover=bool(c.get("foldover", False)),
        runs=c.get("runs"),
        fixed_off=c.get("fixed_off") or (),
        max_runs=int(c.get("max_runs", 256)),
    )


__all__ = [
    "CATALOGUE", "FACTORS", "KINDS", "Design", "FactorialConfig", "alias_chains", "defining_words", "design_of",
    "make_design", "resolution",
]  # fmt: skip
