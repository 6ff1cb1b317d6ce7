"""The run folder, the thing every figure is built from: one run per folder, a config.yaml saying what runs there,
checkpoints that say what they hold, writes that fail with one clear paragraph, and the repair of what a finished
run can rebuild.

- **One run per folder**: `FolderLock` holds an exclusive `fcntl` lock on `<run>/.lock` for the whole run (rank 0
  under DDP). The OS releases it when the process dies, so a killed run never leaves a stale lock; a second process
  for the same folder stops at once, naming the process that holds it.
- **What runs here**: `prepare()` writes config.yaml (the resolved config, `plain()`), or compares it with the run's:
  any difference stops the run with the differences listed. Keys that say how a run is run, not what it computes
  (`IGNORED`: the device, the logger, how the global batch is split over processes and micro-batches, loader
  workers) are not compared, so a run resumes on another GPU count that keeps the global batch; a key the folder's
  config.yaml does not know yet (written before the key existed) counts as its schema default.
- **Checkpoints**: `check_checkpoint()` refuses a last.pt of another run (its saved config against the run's) and
  explains files that are not checkpoints of this project, never with a traceback.
- **Writes**: `write_atomic()` writes to a temporary file and renames it, so a kill or a full disk never leaves a
  broken file; an OSError (a full disk, a read-only folder) becomes one `RunFolderError` paragraph naming the path
  and the cause, and the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import functools
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Callable

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from ablations.config import PAPER, RunConfig, left_out, toggles
from models import STEPS, ConfigError, ModelConfig

# how a run is run, not what it computes: never compared between a folder's config and the command's
IGNORED = (
    "progress",
    "device",
    "logger",
    "log_every",
    "compile_backend",
    "train.grad_accum",  # the global batch (compared) is what the optimizer sees; its split is the hardware's
    "train.batch_per_device",
    "train.ckpt_every_min",  # when mid-epoch checkpoints are saved: resume is exact either way
    "data.workers",
    "factorial",  # which design a sweep runs, not the model (the run's without= says that)
)
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "history")


class RunFolderError(ConfigError):
    """The run folder cannot be used as it is (held by another process, unwritable, full, or holding another run's
    files); the message says which file and what to do."""


# ------------------------------------------------------------------------------------------- the config
def _drop(d: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.get(p) if isinstance(d.get(p), dict) else {}
    d.pop(last, None)


def plain(cfg) -> dict:
    """The run's config as config.yaml holds it: resolved, without the IGNORED keys, and with default toggles left
    out, so a default run's config.yaml is what it was before toggles existed (and such runs are still reused)."""
    d = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    d.pop("hydra", None)
    for key in IGNORED:
        _drop(d, key)
    d["without"] = left_out(d.get("without"))  # [a,b] and [b,a] are the same run
    if not d["without"]:
        d.pop("without")
    roadmap = d.get("roadmap")
    if isinstance(roadmap, dict) and roadmap.get("name") == PAPER and tuple(roadmap.get("steps") or ()) == STEPS:
        d.pop("roadmap")
    return d


@functools.lru_cache(maxsize=1)
def schema_defaults() -> dict:
    """The schema's default of every key (RunConfig), for keys an older config.yaml does not have. The model node's
    fields are filled by the roadmap resolver; a model field an older folder lacks is one no step set when it was
    written, so its default is ModelConfig's (model.head, model.head_hidden)."""
    d = OmegaConf.to_container(OmegaConf.structured(RunConfig), resolve=False)
    d["model"] = dataclasses.asdict(ModelConfig())
    return d


def diff(old: dict, new: dict, defaults: dict | None = None, prefix: str = "") -> list[str]:
    """The differences old -> new as 'key: old -> new', top-level values (step, bar, seed) first; a key missing in
    `old` whose new value is its schema default is no difference (the folder predates the key)."""
    defaults = schema_defaults() if defaults is None else defaults
    out = []
    for k in sorted(set(old) | set(new), key=lambda k: (isinstance(old.get(k, new.get(k)), dict), k)):
        x, y, dflt = old.get(k), new.get(k), defaults.get(k) if isinstance(defaults, dict) else None
        if isinstance(x, dict) and isinstance(y, dict):
            out += diff(x, y, dflt if isinstance(dflt, dict) else {}, f"{prefix}{k}.")
        elif k not in old and y == dflt:
            continue
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} -> {y!r}")
    return out


def _read_config(path: str) -> dict:
    try:
        old = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:  # unparsable YAML, unreadable file
        raise RunFolderError(
            f"{path} is broken ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}): it "
            "cannot say which run this folder holds. Nothing was changed: delete that config.yaml (the run's other "
            "files stay and are compared again through last.pt) or pick another folder with hydra.run.dir=..."
        ) from None
    if not isinstance(old, dict) or "step" not in old:
        kind = type(old).__name__ if not isinstance(old, dict) else "a mapping without a 'step'"
        raise RunFolderError(
            f"{path} is not a run config (it holds {kind}). Nothing was changed: delete that config.yaml or pick "
            "another folder with hydra.run.dir=..."
        )
    return old


def prepare(cfg, run_dir: str) -> dict | None:
    """Check the run folder against the run (writing config.yaml the first time); return the summary of a finished
    run (after rebuilding a lost metrics.jsonl from last.pt), None when the run is to be trained or resumed."""
    toggles(cfg)  # a bad step name in without= or the roadmap: one ConfigError paragraph before any file is touched
    path = os.path.join(run_dir, "config.yaml")
    new = plain(cfg)
    if os.path.exists(path):
        changes = diff(_read_config(path), new)
        if changes:
            raise RunFolderError(
                f"run folder {run_dir} already holds a run with a different config ({'; '.join(changes[:5])}"
                f"{'; ...' if len(changes) > 5 else ''}). Nothing was changed: pick another folder with "
                "hydra.run.dir=..., or delete that one."
            )
        return finished_summary(run_dir)
    ckpt = os.path.join(run_dir, "last.pt")
    if os.path.exists(ckpt):  # config.yaml lost: the checkpoint says which run this folder holds
        check_checkpoint(load_checkpoint(ckpt), cfg, ckpt)
    os.makedirs(run_dir, exist_ok=True)
    write_atomic(path, lambda tmp: OmegaConf.save(OmegaConf.create(new), tmp))
    return None


def finished_summary(run_dir: str) -> dict | None:
    """summary.json of a finished run, or None; a lost metrics.jsonl is rewritten from last.pt's history."""
    summary = os.path.join(run_dir, "summary.json")
    if not os.path.exists(summary):
        return None  # a finished last.pt without its summary is rebuilt by train() (it resumes, trains nothing)
    try:
        with open(summary) as f:
            s = json.load(f)
    except (OSError, ValueError):
        return None  # a broken summary is rewritten by the run
    if not isinstance(s, dict) or s.get("status") != "finished":
        return None
    metrics, ckpt = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "last.pt")
    if not os.path.exists(metrics) and os.path.exists(ckpt):
        history = load_checkpoint(ckpt).get("history") or []
        write_lines(metrics, [json.dumps(h) for h in history])
        s["rebuilt"] = f"metrics.jsonl rewritten from last.pt ({len(history)} epochs)"
    return s


# ------------------------------------------------------------------------------------------- the lock
class FolderLock:
    """An exclusive lock on the run folder for as long as the block runs (`with FolderLock(run_dir):`)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, ".lock")
        self._file = None

    def __enter__(self) -> FolderLock:
        os.makedirs(self.run_dir, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                f.close()
                raise RunFolderError(f"cannot lock the run folder {self.run_dir}: {e}") from None
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunFolderError(
                f"run folder {self.run_dir} is in use by {holder}: two runs in one folder would write every epoch "
                "twice and fight over its checkpoint. Nothing was changed: wait for that run to end (it resumes or "
                "finishes the same run), stop it, or pick another folder with hydra.run.dir=..."
            ) from None
        f.seek(0)
        f.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        f.write(f"process {os.getpid()} on {socket.gethostname()} (since {started})\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.truncate(0)
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


# ------------------------------------------------------------------------------------------- writing
def _cause(e: OSError) -> str:
    return f"[Errno {e.errno}] {e.strerror}" if e.errno else str(e)


def write_atomic(path: str, write: Callable[[str], None], what: str = "") -> None:
    """write(tmp) to a temporary file beside `path`, then rename it over `path`: a kill or an error never leaves a
    broken file. An OSError (a full disk, a read-only folder) removes the temporary file and becomes one paragraph."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        hint = {
            errno.ENOSPC: "the disk is full: free some space",
            errno.EDQUOT: "the disk quota is used up: free some space",
            errno.EACCES: "the folder is not writable: fix its permissions or pick another with hydra.run.dir=...",
            errno.EROFS: "the file system is read-only: pick another folder with hydra.run.dir=...",
        }.get(e.errno, "check the folder")
        raise RunFolderError(
            f"cannot write {path}: {_cause(e)}; {hint}. {what}".strip() + " Then run the same command again."
        ) from None
    except RuntimeError as e:  # torch.save reports a failed write as a RuntimeError of its zip writer
        with contextlib.suppress(OSError):
            os.remove(tmp)
        free = shutil.disk_usage(os.path.dirname(path) or ".").free
        cause = "[Errno 28] No space left on device" if free < 1 << 20 else str(e).splitlines()[0]
        message = f"cannot write {path}: {cause}. {what}".strip()
        raise RunFolderError(message + " Then run the same command again.") from None


def write_json(path: str, obj, what: str = "") -> None:
    """Write JSON atomically (write_atomic)."""

    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    write_atomic(path, dump, what)


def write_lines(path: str, lines: list[str], what: str = "") -> None:
    """Write text lines atomically (write_atomic): never a half-written line."""

    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.writelines(line + "\n" for line in lines)

    write_atomic(path, dump, what)


def check_free_space(path: str, need: int, what: str = "") -> None:
    """Refuse, before writing, a file of `need` bytes where the disk has less free (statvfs: cheap)."""
    folder = os.path.dirname(path) or "."
    free = shutil.disk_usage(folder).free
    if free < need + (1 << 20):
        raise RunFolderError(
            f"cannot write {path}: [Errno 28] No space left on device (it needs about {need / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB are free); free some space. {what}".strip()
            + " Then run the same command again."
        )


# ------------------------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str) -> dict:
    """A checkpoint of this project (plain tensors and containers), or one paragraph saying what the file is."""
    import torch

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own message would suggest weights_only=False, which is wrong here
        text = str(e)
        if magic[:2] != b"PK" and magic[:1] != b"\x80":  # neither torch's zip format nor its legacy pickle
            what = "not a torch file (written by something else, or damaged)"
        elif magic[:2] == b"PK" and ("zip" in text.lower() or isinstance(e, (EOFError, OSError))):
            what = "a truncated or damaged torch file (an interrupted copy?)"
        elif "Weights only load failed" in text or "Unsupported global" in text:
            what = "a torch file holding Python objects beyond tensors and containers: not a checkpoint of this project"
        else:
            what = f"not loadable ({type(e).__name__})"
        raise RunFolderError(
            f"{path} is {what}. Nothing was changed: delete it (or move it away) to start the run over; a file of "
            "pretrained weights goes in pretrained=... instead."
        ) from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        has = ", ".join(map(str, list(ck)[:6])) if isinstance(ck, dict) else type(ck).__name__
        raise RunFolderError(
            f"{path} is a torch file but not a checkpoint of this project: it lacks {', '.join(missing)} (it holds "
            f"{has}). Nothing was changed: delete it (or move it away) to start the run over; pretrained weights go "
            "in pretrained=... instead."
        )
    return ck


def check_checkpoint(ck: dict, cfg, path: str) -> None:
    """Refuse a checkpoint written by another run: its saved config (or, from older checkpoints, its model config)
    against this run's, every difference listed."""
    if ck.get("config") is not None:
        changes = diff(ck["config"], plain(cfg))
    else:
        mine = OmegaConf.to_container(cfg.model, resolve=True)
        old = ck.get("model_config") or {}
        changes = [f"model.{c}" for c in diff(old, mine, schema_defaults()["model"])] if old else []
    if changes:
        raise RunFolderError(
            f"{path} was written by another run ({'; '.join(changes[:5])}{'; ...' if len(changes) > 5 else ''}): "
            "resuming it would put that run's weights and metrics under this run's name. Nothing was changed: "
            "delete it to start this run over, or run its own command (pick the folder with hydra.run.dir=...)."
        )


# ------------------------------------------------------------------------------------------- before Hydra writes
class RunLog(logging.FileHandler):
    """Hydra's run log (`<run>/run_ablation.log`) that survives its folder: a full disk or a read-only folder gives
    one warning on the console, then the log goes to the console only (logging's default prints a traceback for
    every line that fails)."""

    def __init__(self, filename, mode="a", encoding=None, delay=False, errors=None):
        self.failed: str | None = None
        try:
            super().__init__(filename, mode, encoding, delay, errors)
        except OSError as e:
            super().__init__(filename, mode, encoding, delay=True, errors=errors)
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        self.failed = _cause(e) if isinstance(e, OSError) else str(e)
        print(f"warning: cannot write the run log {self.baseFilename}: {self.failed}; logging to the console only",
              file=sys.stderr)  # fmt: skip

    def emit(self, record) -> None:
        """Write the record, unless the file failed before."""
        if self.failed is None:
            super().emit(record)

    def handleError(self, record) -> None:
        """The first failed write: say it once and stop writing."""
        if self.failed is None:
            self._fail(sys.exc_info()[1] or OSError("write failed"))


def _writable_folder(path: str) -> None:
    """The run folder, or the nearest existing folder above it, must be writable (Hydra writes there first)."""
    target = os.path.abspath(path)
    probe = target
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK):
        what = f"the run folder {path}" if probe == target else f"{probe}, where the run folder {path} would go,"
        raise RunFolderError(
            f"cannot write in {what}: it is read-only (no write permission, or a read-only file system). Nothing "
            "was changed: fix its permissions or pick another folder with hydra.run.dir=..."
        )


class PreflightCallback(Callback):
    """Before a single run's folder is made (Hydra's on_run_start): the config's values and the folder's permissions,
    so a bad value (seed=-1, a bad step in without=) or a read-only folder prints one paragraph and creates nothing."""

    def on_run_start(self, config, **kwargs) -> None:
        """Check, or print the paragraph and exit 2."""
        from hydra.core.hydra_config import HydraConfig

        from ablations.train import check_numbers

        try:
            HydraConfig.instance().set_config(config)  # resolves ${hydra:...} in the folder's name
            check_numbers(config, str(OmegaConf.select(config, "hydra.run.dir")))
            toggles(config)
            _writable_folder(str(OmegaConf.select(config, "hydra.run.dir")))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
