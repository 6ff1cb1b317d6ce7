"""Gather run folders (one per trained bar x seed) into tables: one row per run, one row per (regime, bar)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path

import pandas as pd
import yaml

from ablations import ROADMAP, VARIANTS, Step, paper
from ablations.config import PAPER, FinetuneConfig, left_out, toggle_label
from models import STEPS
from models.heads import head_name
from models.roadmap import ConfigError

# Figure order, top to bottom: the recipe bar, then the roadmap, with the non-adopted kernels next to the adopted one.
FIGURE_ORDER: list[str] = ["baseline_classic"]
for _step in ROADMAP:
    FIGURE_ORDER.append(_step.name)
    if _step.name == "large_kernel":
        FIGURE_ORDER += [v for v in VARIANTS if v.startswith("large_kernel_")]
FIGURE_ORDER += [v for v in VARIANTS if v not in FIGURE_ORDER]  # future variants: still before unknown bars
ORDER = {name: i for i, name in enumerate(FIGURE_ORDER)}

RUN_COLUMNS = [
    "run_dir", "bar", "step", "seed", "regime", "profile", "data", "recipe", "status", "error", "top1", "top5",
    "params", "paper_params", "gflops", "gflops_total", "train_gflops", "epochs", "epochs_planned", "wall_s",
    "device", "order", "roadmap", "roadmap_steps", "without", "base_bar", "code", "img_per_s", "best_top1",
    "best_epoch", "top1_ema", "best_top1_ema", "head", "head_set", "classes", "pretrained", "freeze_epochs",
    "finetune", "num_classes",
]  # fmt: skip
# best_top1 / best_epoch: the best evaluated epoch (the figure plots top1, the last epoch's); *_ema: the EMA's
# toggles (issue 12): roadmap = name of the order step= walked (paper for the paper's), roadmap_steps = that order
# comma-joined, without = the left-out steps "+"-joined ("" for none), base_bar = the bar before its toggles
# code = the git commit the run finished with (summary.json; "+dirty": uncommitted changes), empty when unknown
# img_per_s = training images/s, the median over the run's epochs (metrics.jsonl), a response of the factorial analysis
# heads and fine-tuning (issue 26): head = the head the model got (model.head, else the step's own), head_set =
# whether model.head was given; classes = data.classes comma-joined ("" for all); pretrained = the run's pretrained=
# ("" for none); freeze_epochs = finetune.freeze_epochs; finetune = the other finetune.* keys that differ from their
# defaults, "k=v" comma-joined in key order ("" for none). Runs with model.head given, data.classes or pretrained=
# are heads runs (analysis.heads), not the roadmap's bars. num_classes = the classes the run is scored on
# (len(data.classes), else data.num_classes): its chance level, 100 / num_classes, tells a collapsed run
# (analysis.factorial.collapsed).
COMPLEXITY_KEYS = ("params", "paper_params", "gflops", "gflops_total", "train_gflops")
# epochs.csv, written beside results.csv: one row per finished epoch of every run (its metrics.jsonl line), so a
# results.csv kept without its run folders (docs/) still draws the learning curves
EPOCHS_CSV = "epochs.csv"
EPOCH_COLUMNS = ["run_dir", "epoch", "train_loss", "lr", "top1", "top5", "epoch_s", "img_per_s"]
NAN = float("nan")


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Every run folder (a directory holding config.yaml, not Hydra's .hydra copy) under any of paths."""
    found: dict[Path, None] = {}  # dict as an ordered set: overlapping paths must not count a run twice
    for root in map(Path, paths):
        if root.is_dir():
            for cfg in [root / "config.yaml", *sorted(root.rglob("config.yaml"))]:
                if cfg.is_file() and ".hydra" not in cfg.parent.parts:
                    found.setdefault(cfg.parent.resolve(), None)
    return list(found)


def bar_order(bar) -> int:
    """Position of a bar in the figure, unknown bars last."""
    return ORDER.get(bar, len(FIGURE_ORDER))


def _steps_of(roadmap_steps) -> list[str]:
    """A roadmap_steps cell as a list of step names (the paper's order when empty or missing)."""
    if isinstance(roadmap_steps, str) and roadmap_steps:
        return roadmap_steps.split(",")
    return list(STEPS)


def _without_of(without) -> list[str]:
    """A without cell as a list of step names ("" or NaN: none)."""
    return [w for w in without.split("+") if w] if isinstance(without, str) else []


def _fill_toggles(df: pd.DataFrame) -> None:
    """In place: toggle columns of frames from before toggles (or built by hand) as the paper's roadmap, nothing left
    out, the bar its own base bar."""
    for col, default in (("roadmap", PAPER), ("roadmap_steps", ",".join(STEPS)), ("without", "")):
        values = df[col] if col in df.columns else [None] * len(df)
        df[col] = [v if isinstance(v, str) and (v or col == "without") else default for v in values]
    bases = df["base_bar"] if "base_bar" in df.columns else [None] * len(df)
    df["base_bar"] = [b if isinstance(b, str) and b else bar for b, bar in zip(bases, df["bar"])]


def row_order(bar, roadmap=PAPER, roadmap_steps=None, without=None, base_bar=None) -> float:
    """Figure position of a run's bar: the paper's figure order, a custom roadmap's own order, and a leave-one-out
    bar right after its full model, ordered by where its left-out step sits on the roadmap."""
    steps = _steps_of(roadmap_steps)
    left_out = _without_of(without)
    base = base_bar if isinstance(base_bar, str) and base_bar else bar
    if isinstance(roadmap, str) and roadmap != PAPER and base in steps:
        pos = 1 + steps.index(base)  # 0 stays the recipe bar's
    else:
        pos = bar_order(base)
    if left_out:
        first = min(steps.index(w) if w in steps else len(steps) for w in left_out)
        pos += (1 + first) / (2 + len(steps))  # after the full model, before the next bar
    return pos


def paper_step(bar) -> Step | None:
    """The paper's Step for a bar name, None for bars the paper does not have."""
    try:
        return paper(bar)
    except (KeyError, TypeError):
        return None


def _read_json(path: Path):
    """Parsed JSON of path, None when missing; raises ValueError when present but unreadable."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path.name}: {e}") from e


def _read_metrics(path: Path) -> list[dict]:
    """Epoch records of metrics.jsonl; a torn last line (trainer mid-write) or junk lines are skipped."""
    if not path.exists():
        return []
    records = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _num(value) -> float:
    """value as float, NaN for None/strings/garbage."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return NAN
    return out


def _get(cfg: dict, *keys, default=None):
    """Nested dict lookup that tolerates missing keys and non-dict nodes."""
    node = cfg
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def _name(node):
    """A config group's name: groups are dicts with a name key, but accept a bare string too."""
    return node.get("name") if isinstance(node, dict) else node


def _finetune_settings(cfg: dict) -> str:
    """The run's finetune.* keys other than freeze_epochs that differ from their defaults (FinetuneConfig), as
    "k=v, ..." in key order: "" for a run from scratch and for one from before those keys."""
    node = cfg.get("finetune") if isinstance(cfg.get("finetune"), dict) else {}
    defaults = {f.name: f.default for f in fields(FinetuneConfig)}
    return ", ".join(f"{k}={v}" for k, v in sorted(node.items()) if k != "freeze_epochs" and v != defaults.get(k))


def _transfer_fields(cfg: dict) -> dict:
    """The heads / fine-tuning columns of a run's config (empty for runs from before those keys)."""
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    head = model.get("head")
    try:
        resolved = head_name(head, bool(model.get("head_norm")))
    except ConfigError:
        resolved = str(head)  # a head this code no longer knows: keep its name
    classes = _get(cfg, "data", "classes")
    pretrained = cfg.get("pretrained")
    return {
        "head": resolved if model else NAN,
        "head_set": head is not None,
        "classes": ",".join(map(str, classes)) if isinstance(classes, list) else "",
        "pretrained": str(pretrained) if pretrained else "",
        "freeze_epochs": _num(_get(cfg, "finetune", "freeze_epochs", default=0)),
        "finetune": _finetune_settings(cfg),
        "num_classes": len(classes) if isinstance(classes, list) else _num(_get(cfg, "data", "num_classes")),
    }


def is_transfer(df: pd.DataFrame) -> pd.Series:
    """Rows that are heads / fine-tuning runs (model.head given, data.classes, or pretrained=), not roadmap bars: a
    head changes the step's model and a class subset or a fine-tune its task, so pooling them with the step's runs
    would mix different models and tasks as if they were seeds."""

    def flag(col: str) -> pd.Series:
        if col not in df.columns:
            return pd.Series(False, df.index)
        v = df[col].astype(object).fillna("").astype(str)  # a results.csv: "True"/"False" (or nothing) for head_set
        return v.str.lower().isin(("true", "1", "1.0")) if col == "head_set" else v.str.len().gt(0)

    return flag("head_set") | flag("classes") | flag("pretrained")


def _config_fields(cfg: dict) -> dict:
    """The row's fields that config.yaml says: what the run is (step, bar, toggles, seed, regime, data, recipe)."""
    step = cfg.get("step")
    roadmap = cfg.get("roadmap") if isinstance(cfg.get("roadmap"), dict) else {}
    without = left_out(cfg.get("without")) if isinstance(cfg.get("without") or [], (list, str)) else []
    return dict(
        step=step,
        bar=cfg.get("bar") or step,  # old runs have no bar key: then the bar is the step
        roadmap=roadmap.get("name") or PAPER,  # runs without toggles (and from before them) walked the paper's
        roadmap_steps=",".join(map(str, roadmap.get("steps") or STEPS)),
        without="+".join(without),
        seed=cfg.get("seed"),
        regime=_name(cfg.get("regime")),
        profile=cfg.get("profile"),
        data=_name(cfg.get("data")),
        recipe=_name(cfg.get("train")),
        epochs_planned=_num(_get(cfg, "train", "epochs")),
        **_transfer_fields(cfg),
    )


def _apply_summary(row: dict, summary: dict, has_metrics: bool) -> None:
    """Fill row from summary.json: status, final numbers, device, code; fields config.yaml could not give."""
    row["status"] = summary.get("status") or "finished"
    row["error"] = str(summary.get("error") or "")
    for key in ("top1", "top5", "wall_s", "best_top1", "best_epoch", "top1_ema", "best_top1_ema", "num_classes"):
        if key in summary:
            row[key] = _num(summary[key])
    if row["status"] == "finished" and not has_metrics:
        row["error"] = "metrics.jsonl missing: run its command again to rebuild it from last.pt"
    row["device"] = summary.get("device", NAN)
    row["code"] = summary.get("code") or NAN
    for key in ("step", "bar", "regime", "profile", "seed"):
        if row.get(key) is None and summary.get(key) is not None:  # e.g. config.yaml unreadable
            row[key] = summary[key]
    if row["epochs"] == 0 and summary.get("epochs") is not None:
        row["epochs"] = int(_num(summary["epochs"])) if not math.isnan(_num(summary["epochs"])) else 0


def load_run(run_dir: str | Path) -> dict:
    """One row for one run folder; never raises, a folder it cannot read gets status 'broken'."""
    run_dir = Path(run_dir)
    row = {c: NAN for c in RUN_COLUMNS}
    row.update(run_dir=str(run_dir), status="running", error="")
    errors = []

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a mapping")
    except Exception as e:  # any YAML/OS error: the row must still exist
        errors.append(f"config.yaml: {e}")
        cfg = {}
    row.update(_config_fields(cfg))

    try:
        summary = _read_json(run_dir / "summary.json")
        if summary is not None and not isinstance(summary, dict):
            raise ValueError("summary.json: not an object")
    except ValueError as e:
        errors.append(str(e))
        summary = None
    try:
        complexity = _read_json(run_dir / "complexity.json")
        complexity = complexity if isinstance(complexity, dict) else {}
    except ValueError:
        complexity = {}  # the summary repeats these numbers; a bad complexity.json alone is no reason for 'broken'
    metrics = _read_metrics(run_dir / "metrics.jsonl")

    epochs = [int(e) for e in (_num(m.get("epoch")) for m in metrics) if not math.isnan(e)]
    row["epochs"] = max(epochs) if epochs else (len(metrics) if metrics else 0)
    last = metrics[-1] if metrics else {}
    row["top1"], row["top5"] = _num(last.get("top1")), _num(last.get("top5"))
    speeds = pd.to_numeric(pd.Series([m.get("img_per_s") for m in metrics], dtype=object), errors="coerce").dropna()
    row["img_per_s"] = float(speeds.median()) if len(speeds) else NAN

    if summary is not None:
        _apply_summary(row, summary, has_metrics=bool(metrics))
    for key in COMPLEXITY_KEYS:
        value = _num((summary or {}).get(key))
        row[key] = value if not math.isnan(value) else _num(complexity.get(key))

    if errors:
        row.update(status="broken", error="; ".join(errors), top1=NAN, top5=NAN)
    if row["bar"] is None and row["step"] is not None:
        row["bar"] = row["step"]
    row["base_bar"] = row["bar"]
    if row["without"] and row["bar"] is not None:  # a leave-one-out run is its own bar: the folder's name
        row["bar"] = toggle_label(row["bar"], _without_of(row["without"]))
    row["order"] = row_order(row["bar"], row["roadmap"], row["roadmap_steps"], row["without"], row["base_bar"])
    return row


def results_csv(path: str | Path) -> Path | None:
    """The results.csv to read for path: path itself if it is a .csv file, DIR/results.csv if DIR holds no run
    folder (e.g. docs/, or a sweep copied without its runs), else None: run folders are always read first-hand."""
    path = Path(path)
    if path.is_file() and path.suffix == ".csv":
        return path
    if path.is_dir() and (path / "results.csv").is_file() and not find_run_dirs([path]):
        return path / "results.csv"
    return None


def read_results_csv(path: str | Path) -> pd.DataFrame:
    """The run rows of a results.csv written by analyze; relative run_dirs are resolved against the CSV's folder."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"code": str})  # a commit of decimal digits only stays a string
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ValueError(f"{path}: not a results table ({e})") from e
    if not {"run_dir", "bar", "status", "top1"} <= set(df.columns):
        raise ValueError(f"{path}: not a results table (needs run_dir, bar, status, top1; has {', '.join(df.columns)})")
    for col in RUN_COLUMNS:
        if col not in df.columns:
            df[col] = NAN
    base = path.resolve().parent
    df["run_dir"] = [os.path.normpath(base / str(d)) for d in df["run_dir"]]  # an absolute run_dir stays as it is
    df["error"] = [e if isinstance(e, str) else "" for e in df["error"]]
    df["seed"] = [None if math.isnan(_num(x)) else int(_num(x)) for x in df["seed"]]
    _fill_toggles(df)
    df["order"] = [  # the figure order of today's code, not of the writer's
        row_order(*a) for a in zip(df["bar"], df["roadmap"], df["roadmap_steps"], df["without"], df["base_bar"])
    ]
    return df[RUN_COLUMNS]


def read_epochs_csv(path: str | Path) -> pd.DataFrame:
    """The per-epoch rows of an epochs.csv written by analyze (EPOCH_COLUMNS; run_dir resolved against its folder);
    an empty frame when the file does not exist (a results.csv from before epochs.csv)."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=EPOCH_COLUMNS)
    try:
        df = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ValueError(f"{path}: not a per-epoch table ({e})") from e
    if not {"run_dir", "epoch"} <= set(df.columns):
        raise ValueError(f"{path}: not a per-epoch table (needs run_dir, epoch; has {', '.join(df.columns)})")
    for col in EPOCH_COLUMNS:
        if col not in df.columns:
            df[col] = NAN
    base = path.resolve().parent
    df["run_dir"] = [os.path.normpath(base / str(d)) for d in df["run_dir"]]
    return df[EPOCH_COLUMNS]


def collect_epochs(runs: pd.DataFrame, paths: Iterable[str | Path] = ()) -> pd.DataFrame:
    """One row per finished epoch of every run in runs (EPOCH_COLUMNS): from the run folder's metrics.jsonl where
    the folder exists, else from the epochs.csv beside any results.csv among paths (the input collect read)."""
    kept = [read_epochs_csv(c.with_name(EPOCHS_CSV)) for c in map(results_csv, paths) if c is not None]
    kept = pd.concat([k for k in kept if len(k)], ignore_index=True) if any(len(k) for k in kept) else None
    frames = []
    for run_dir in dict.fromkeys(runs["run_dir"]):
        folder = Path(str(run_dir))
        if folder.is_dir():
            records = _read_metrics(folder / "metrics.jsonl")
            rows = [{"run_dir": str(run_dir), **{c: r.get(c) for c in EPOCH_COLUMNS[1:]}} for r in records]
            frame = pd.DataFrame(rows, columns=EPOCH_COLUMNS)
        elif kept is not None:
            frame = kept[kept["run_dir"] == str(run_dir)]
        else:
            continue
        frames.append(frame)
    frames = [f for f in frames if len(f)]
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=EPOCH_COLUMNS)
    numbers = EPOCH_COLUMNS[1:]
    out[numbers] = out[numbers].apply(pd.to_numeric, errors="coerce")  # None (an epoch not evaluated) -> NaN
    return out.dropna(subset=["epoch"]).reset_index(drop=True)[EPOCH_COLUMNS]


def collect(paths: Iterable[str | Path] | str | Path) -> pd.DataFrame:
    """One row per run folder found (recursively) under any of paths: status, top-1, complexity, epochs.

    A path may also be a results.csv, or a folder holding one and no run folder: its rows are merged in (a run
    that is also present as a folder is read from the folder).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = list(paths)
    csvs = [c for c in map(results_csv, paths) if c is not None]
    rows = [load_run(d) for d in find_run_dirs(p for p in paths if results_csv(p) is None)]
    frames = [pd.DataFrame(rows, columns=RUN_COLUMNS)]
    seen = {r["run_dir"] for r in rows}
    for c in csvs:
        table = read_results_csv(c)
        table = table[~table["run_dir"].isin(seen)]
        seen |= set(table["run_dir"])
        frames.append(table)
    frames = [f for f in frames if len(f)]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RUN_COLUMNS)
    df = df.sort_values(["regime", "order", "bar", "seed", "run_dir"], na_position="last", key=_sort_key)
    return df.reset_index(drop=True)


def portable(df: pd.DataFrame, base: str | Path) -> pd.DataFrame:
    """df with run_dir relative to base (POSIX separators), so a results table stays valid when moved or merged."""
    base = os.path.abspath(base)

    def rel(d) -> str:
        """d relative to base; unchanged when it has no relative form (another drive)."""
        try:
            return Path(os.path.relpath(os.path.abspath(str(d)), base)).as_posix()
        except ValueError:
            return str(d)

    return df.assign(run_dir=[rel(d) for d in df["run_dir"]])


def _sort_key(col: pd.Series) -> pd.Series:
    """Sort key that tolerates mixed types (seed may be None in a broken run)."""
    if col.name in ("order",):
        return col
    if col.name == "seed":
        return pd.to_numeric(col, errors="coerce")
    return col.astype(str)


def is_roadmap(runs: pd.DataFrame) -> bool:
    """Whether the runs of one (regime, roadmap) walk a roadmap (draw its figure, fill in its missing steps), rather
    than being a leave-one-out sweep, whose only untoggled runs are the full models the removals are compared to."""
    toggled = runs["without"].fillna("").astype(bool) if "without" in runs.columns else pd.Series(False, runs.index)
    plain = set(runs.loc[~toggled, "bar"].dropna())
    return not toggled.any() or bool(plain - set(runs.loc[toggled, "base_bar"].dropna()))


def groups(df: pd.DataFrame) -> list[tuple[str, str]]:
    """The (regime, roadmap) pairs present: r50 first, the paper's roadmap first within a regime."""
    if not len(df):
        return []
    roadmaps = df["roadmap"].fillna(PAPER) if "roadmap" in df.columns else pd.Series(PAPER, df.index)
    pairs = set(zip(df["regime"].fillna("unknown"), roadmaps))
    return sorted(pairs, key=lambda p: (p[0] != "r50", str(p[0]), p[1] != PAPER, str(p[1])))


def summarize(df: pd.DataFrame, fill_missing: bool = True) -> pd.DataFrame:
    """One row per (regime, roadmap, bar) in figure order: our top-1 mean/std over finished seeds beside the paper's.

    With fill_missing, every step of a roadmap appears for each (regime, roadmap) present, as status 'missing' when no
    run of it exists, so the figure shows what is still to do (not for a leave-one-out sweep: see is_roadmap);
    variant bars (recipe, kernel sizes) and toggled bars (leave-one-out) appear when they have runs.
    """
    df = df[df["bar"].notna()].copy()
    df["regime"] = df["regime"].fillna("unknown")
    _fill_toggles(df)
    rows = []
    for regime, roadmap in groups(df):
        sub = df[(df["regime"] == regime) & (df["roadmap"] == roadmap)]
        order = sub["roadmap_steps"].iloc[0]
        bars = list(dict.fromkeys(sub.sort_values("order", kind="stable")["bar"]))
        if fill_missing and is_roadmap(sub):
            steps = [s.name for s in ROADMAP] if roadmap == PAPER else _steps_of(order)
            known = dict(zip(sub["bar"], sub["order"]))
            bars = sorted(set(bars) | set(steps), key=lambda b: (known.get(b, row_order(b, roadmap, order)), str(b)))
        for bar in bars:
            rows.append(_summary_row(regime, bar, sub[sub["bar"] == bar], roadmap, order))
    columns = [
        "regime", "bar", "step", "title", "status", "gflops", "gflops_total", "params", "paper_params", "top1_mean",
        "top1_std", "n",
        "n_failed", "n_running", "n_broken", "running_top1", "epochs_done", "epochs_planned", "profile", "data",
        "recipe", "paper_top1", "paper_gflops", "adopted", "order", "roadmap", "roadmap_steps", "without", "base_bar",
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=columns).reset_index(drop=True)


def _first(values: pd.Series) -> float:
    """Median of the non-NaN values (runs of one bar share their architecture), NaN if none."""
    values = pd.to_numeric(values, errors="coerce").dropna()
    return float(values.median()) if len(values) else NAN


def _title(ref: Step | None, bar, regime: str) -> str:
    """Display title of a bar; the paper's titles name ResNet-50, which is ResNet-200 in the r200 regime."""
    if ref is None:
        return str(bar)
    return ref.title.replace("ResNet-50", "ResNet-200") if regime == "r200" else ref.title


def _summary_row(regime: str, bar: str, runs: pd.DataFrame, roadmap: str = PAPER, order: str = "") -> dict:
    """The summary row of one (regime, roadmap, bar) from its runs (possibly none)."""
    without = runs["without"].iloc[0] if len(runs) and "without" in runs.columns else ""
    base = runs["base_bar"].iloc[0] if len(runs) and "base_bar" in runs.columns else bar
    ref = paper_step(base)
    title = _title(ref, base, regime)
    paper_top1 = ref.top1.get(regime, NAN) if ref else NAN
    paper_gflops = ref.gflops.get(regime, NAN) if ref else NAN
    if without:  # ConvNeXt without a step: no paper bar; the leave-one-out table compares it with the paper's gain
        title = f"{title} without " + ", ".join(_title(paper_step(w), w, regime) for w in _without_of(without))
        paper_top1 = paper_gflops = NAN
    elif roadmap != PAPER and base in STEPS:
        # on another order a step's model is the paper's only where the same set of steps is switched on
        steps = _steps_of(order)
        on = set(steps[: steps.index(base) + 1]) if base in steps else None
        same = next((s for i, s in enumerate(STEPS) if set(STEPS[: i + 1]) == on), None)
        paper_top1 = paper(same).top1.get(regime, NAN) if same else NAN
        paper_gflops = paper(same).gflops.get(regime, NAN) if same else NAN
    finished = runs[runs["status"] == "finished"]
    running = runs[runs["status"] == "running"]
    top1 = pd.to_numeric(finished["top1"], errors="coerce").dropna()
    n = len(finished)
    if n:
        status = "finished"
    elif len(running):
        status = "running"
    elif (runs["status"] == "failed").any():
        status = "failed"
    elif len(runs):
        status = "broken"
    else:
        status = "missing"
    default_step = VARIANTS[base][0] if base in VARIANTS else base
    step = runs["step"].dropna().iloc[0] if runs["step"].notna().any() else default_step
    complexity_src = finished if n else runs  # a running run's complexity.json is as good as a finished one's
    return {
        "regime": regime,
        "bar": bar,
        "step": step,
        "title": title,
        "status": status,
        "gflops": _first(complexity_src["gflops"]),
        "gflops_total": _first(complexity_src["gflops_total"]),
        "params": _first(complexity_src["params"]),
        "paper_params": _first(complexity_src["paper_params"]),
        "top1_mean": float(top1.mean()) if len(top1) else NAN,
        "top1_std": float(top1.std(ddof=1)) if len(top1) >= 2 else NAN,
        "n": n,
        "n_failed": int((runs["status"] == "failed").sum()),
        "n_running": len(running),
        "n_broken": int((runs["status"] == "broken").sum()),
        "running_top1": _first(running["top1"]) if len(running) else NAN,
        "epochs_done": float(pd.to_numeric(running["epochs"], errors="coerce").max()) if len(running) else NAN,
        "epochs_planned": _first(runs["epochs_planned"]),
        "profile": ",".join(sorted(map(str, runs["profile"].dropna().unique()))),
        "data": ",".join(sorted(map(str, runs["data"].dropna().unique()))),
        "recipe": ",".join(sorted(map(str, runs["recipe"].dropna().unique()))),
        "paper_top1": paper_top1,
        "paper_gflops": paper_gflops,
        "adopted": ref.adopted if ref else True,
        "order": row_order(bar, roadmap, order, without, base),
        "roadmap": roadmap,
        "roadmap_steps": order,
        "without": without,
        "base_bar": base,
    }


__all__ = [
    "EPOCHS_CSV", "EPOCH_COLUMNS", "FIGURE_ORDER", "bar_order", "collect", "collect_epochs", "find_run_dirs",
    "groups", "is_roadmap", "is_transfer", "load_run", "paper_step", "portable", "read_epochs_csv", "read_results_csv",
    "results_csv", "row_order", "summarize",
]  # fmt: skip
