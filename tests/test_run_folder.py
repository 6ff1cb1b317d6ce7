"""Run folders you can trust: one run per folder, checkpoints that know what they hold, Ctrl-C as a preemption, a
full disk or a read-only folder in one paragraph, broken files explained, what can be rebuilt rebuilt."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["data=synthetic", "profile=smoke", "progress=false"]


def run(*args, env=None, timeout=300):
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "run_ablation.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=e, timeout=timeout)  # fmt: skip


def popen(*args):
    return subprocess.Popen([sys.executable, "run_ablation.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def one_paragraph(out, *expect):
    """Exit 2, no traceback, the message on one line of stderr (after the log lines)."""
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    for e in expect:
        assert e in last, out.stderr[-3000:]
    return last


def wait_for(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- one run per folder
@pytest.mark.slow
def test_two_processes_on_one_folder_one_trains_one_refuses(tmp_path):
    """The same command twice at once: the second stops at once naming the first, which trains on alone (stopped
    here by SIGTERM once the second has been refused: each epoch it finished is in metrics.jsonl once)."""
    args = ["step=gelu", *SMOKE, "max_steps=null", "data.synthetic_size=8192", "train.epochs=50",
            f"hydra.run.dir={tmp_path}"]  # fmt: skip
    first = popen(*args)
    lock = tmp_path / ".lock"
    assert wait_for(lambda: lock.exists() and "process" in lock.read_text()), "the first run never took the lock"
    second = run(*args)
    assert first.poll() is None, "the first run ended before the second started"
    last = one_paragraph(second, f"run folder {tmp_path} is in use by process {first.pid}")
    assert "pick another folder with hydra.run.dir" in last
    assert wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and (tmp_path / "metrics.jsonl").read_text())
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 143, err[-3000:]
    epochs = [r["epoch"] for r in lines(tmp_path)]
    assert epochs == list(range(1, len(epochs) + 1)) and epochs  # each epoch once, none twice
    assert lock.read_text() == ""  # released: the next run of the command may take it


def test_the_lock_is_released_by_the_os_when_its_holder_dies(tmp_path):
    """A killed run never leaves a stale lock: the lock is the open file's, not the file's existence."""
    from ablations.run_folder import FolderLock, RunFolderError

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ablations.run_folder import FolderLock;"
                               f"lock = FolderLock({str(tmp_path)!r}).__enter__(); print('held', flush=True); "
                               "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunFolderError, match=f"in use by process {holder.pid} on "):
        FolderLock(str(tmp_path)).__enter__()
    holder.kill()
    holder.wait()
    with FolderLock(str(tmp_path)):  # the dead process's lock is gone although .lock still names it
        assert f"process {os.getpid()} " in (tmp_path / ".lock").read_text()


# --------------------------------------------------------------------------------------------- the checkpoint
class Pickled:
    """Not a tensor: torch.load(weights_only=True) refuses it."""


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished smoke run (its last.pt is the material of the broken-file cases)."""
    from hydra import compose, initialize_config_dir

    from ablations.run_folder import prepare
    from ablations.train import train

    d = tmp_path_factory.mktemp("finished")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["step=gelu", *SMOKE, "max_steps=1"])
    assert prepare(cfg, str(d)) is None  # in-process, as run_ablation.main does: config.yaml, then training
    assert train(cfg, str(d))["status"] == "finished"
    return d


def test_a_checkpoint_of_another_run_is_refused(finished, tmp_path):
    """config.yaml deleted, then another command into the folder: last.pt says which run it is."""
    shutil.copytree(finished, tmp_path / "run")
    (tmp_path / "run/config.yaml").unlink()
    (tmp_path / "run/summary.json").unlink()
    before = (tmp_path / "run/last.pt").read_bytes()
    out = run("step=large_kernel", "seed=5", "train.lr=0.1", *SMOKE, "max_steps=1", f"hydra.run.dir={tmp_path / 'run'}")
    last = one_paragraph(out, "last.pt was written by another run (")
    assert "step: 'gelu' -> 'large_kernel'" in last and "seed: 0 -> 5" in last and "train.lr: " in last
    assert (tmp_path / "run/last.pt").read_bytes() == before and not (tmp_path / "run/summary.json").exists()
    assert not (tmp_path / "run/config.yaml").exists()  # nothing written for the wrong command


def test_checkpoint_identity_is_checked_on_resume(compose_cfg, tmp_path):
    """The same folder, config.yaml in place but a foreign last.pt copied in (another step's): refused by the
    checkpoint's own config; an old checkpoint without one is compared by its model config."""
    from ablations.run_folder import RunFolderError
    from ablations.train import train

    base = ("data=synthetic", "profile=smoke", "max_steps=1")
    train(compose_cfg("step=gelu", *base), str(tmp_path / "gelu"))
    train(compose_cfg("step=bn_to_ln", *base), str(tmp_path / "ln"))
    os.replace(tmp_path / "ln/last.pt", tmp_path / "gelu/last.pt")
    (tmp_path / "gelu/summary.json").unlink()
    with pytest.raises(RunFolderError, match=r"was written by another run \(bar: .*step: 'bn_to_ln' -> 'gelu'"):
        train(compose_cfg("step=gelu", *base), str(tmp_path / "gelu"))
    ck = torch.load(tmp_path / "gelu/last.pt", weights_only=True)
    ck["config"] = None  # a checkpoint from before checkpoints carried their config
    torch.save(ck, tmp_path / "gelu/last.pt")
    with pytest.raises(RunFolderError, match=r"another run \(model\..*model\.norm_layer: 'layernorm' -> 'batchnorm'"):
        train(compose_cfg("step=gelu", *base), str(tmp_path / "gelu"))
    ck["model_config"] = None  # nothing to compare: the weights themselves do not fit
    torch.save(ck, tmp_path / "gelu/last.pt")
    with pytest.raises(RunFolderError, match="holds the weights of another model"):
        train(compose_cfg("step=gelu", *base), str(tmp_path / "gelu"))


def _break(ck: Path, content: str) -> None:
    if content == "garbage":
        ck.write_bytes(b"junk" + os.urandom(4096))
    elif content == "truncated":
        ck.write_bytes(ck.read_bytes()[:5000])
    elif content == "weights":
        torch.save({"state_dict": {"w": torch.zeros(3)}}, ck)
    else:
        torch.save({"model": Pickled()}, ck)


BROKEN = [
    ("garbage", "is not a torch file (written by something else, or damaged)"),
    ("truncated", "is a truncated or damaged torch file"),
    ("weights", "is a torch file but not a checkpoint of this project: it lacks model, optimizer"),
    ("pickle", "holding Python objects beyond tensors and containers: not a checkpoint of this project"),
]


@pytest.mark.parametrize("content,expect", BROKEN)
def test_broken_checkpoints_are_explained(finished, tmp_path, compose_cfg, content, expect):
    """The resume refuses each with one paragraph saying what the file is, never torch's weights_only advice."""
    from ablations.run_folder import RunFolderError
    from ablations.train import train

    shutil.copytree(finished, tmp_path / "run")
    (tmp_path / "run/summary.json").unlink()
    _break(tmp_path / "run/last.pt", content)
    with pytest.raises(RunFolderError, match=re.escape(expect)) as e:
        train(compose_cfg("step=gelu", *SMOKE, "max_steps=1"), str(tmp_path / "run"))
    msg = str(e.value)
    assert "weights_only=False" not in msg and "file an issue" not in msg and "delete it" in msg and "\n" not in msg


def test_a_broken_checkpoint_on_the_command_line_is_one_paragraph(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    (tmp_path / "run/summary.json").unlink()
    _break(tmp_path / "run/last.pt", "pickle")
    one_paragraph(run("step=gelu", *SMOKE, "max_steps=1", f"hydra.run.dir={tmp_path / 'run'}"), BROKEN[3][1])


@pytest.mark.parametrize("text,expect", [("- a\n- b\n", "is not a run config (it holds list)"),
                                         ("step: [unclosed\n", "is broken (")])  # fmt: skip
def test_a_broken_config_yaml_is_one_paragraph(tmp_path, text, expect):
    (tmp_path / "config.yaml").write_text(text)
    last = one_paragraph(run("step=gelu", *SMOKE, f"hydra.run.dir={tmp_path}"), expect)
    assert last.count("step") <= 3  # not a list of every key


# -------------------------------------------------------------------------------------------------- Ctrl-C
def _train(compose_cfg, run_dir, *overrides):
    from ablations.train import train

    return train(compose_cfg("step=fewer_norms", *SMOKE[:2], "max_steps=6", "train.epochs=2", *overrides), str(run_dir))


def test_ctrl_c_mid_epoch_saves_the_exact_step_and_resumes_exactly(tmp_path, compose_cfg, ctrl_c_at):
    from ablations.dist import Preempted

    _train(compose_cfg, tmp_path / "straight")
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under `nohup ... &`
    undo = ctrl_c_at(1 + 6 + 2)  # Ctrl-C during epoch 2, step 2
    with pytest.raises(Preempted, match="run the same command again") as stopped:
        _train(compose_cfg, tmp_path / "run")
    assert stopped.value.exit_code == 130
    undo()
    ck = torch.load(tmp_path / "run/last.pt", weights_only=True)
    assert (ck["epoch"], ck["step"]) == (1, 2)
    assert signal.getsignal(signal.SIGINT) is before  # the caller's Ctrl-C handler is back
    _train(compose_cfg, tmp_path / "run")
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("straight", "run"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    timing = {"epoch_s", "img_per_s"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(lines(tmp_path / "run")) == strip(lines(tmp_path / "straight"))


def test_a_second_ctrl_c_quits_at_once():
    from ablations.dist import PreemptionGuard

    with PreemptionGuard() as guard:
        guard._handle(signal.SIGINT, None)  # the first: a flag, the step finishes and saves
        assert guard.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            guard._handle(signal.SIGINT, None)


@pytest.mark.slow
def test_ctrl_c_from_the_terminal_exits_130_and_says_how_to_resume(tmp_path):
    args = ["step=gelu", *SMOKE, "max_steps=null", "data.synthetic_size=8192", f"hydra.run.dir={tmp_path}"]
    proc = popen(*args)
    log = tmp_path / "run_ablation.log"
    assert wait_for(lambda: log.exists() and "training epochs" in log.read_text())
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "run the same command again" in err.strip().splitlines()[-1]
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["epoch"] == 0 and ck["step"] > 0


# ----------------------------------------------------------------------------------------- disk and permissions
def test_a_full_disk_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """ENOSPC in the middle of writing the checkpoint (simulated): one paragraph naming the file and the cause, no
    temporary file left, the previous last.pt byte for byte."""
    import ablations.run_folder as F
    import ablations.train as T
    from ablations.run_folder import RunFolderError

    path = tmp_path / "last.pt"
    torch.save({"epoch": 1}, path)
    good = path.read_bytes()

    def save_half_then_enospc(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_enospc)
    with pytest.raises(RunFolderError) as e:
        T.atomic_save({"epoch": 2, "w": torch.zeros(10)}, str(path))
    msg = str(e.value)
    assert f"cannot write {path}: [Errno 28] No space left on device" in msg and "is intact" in msg
    assert path.read_bytes() == good and list(tmp_path.iterdir()) == [path]
    monkeypatch.undo()
    monkeypatch.setattr(F.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())  # nearly full
    with pytest.raises(RunFolderError, match=r"needs about 0\.0 MiB, 0\.0 MiB are free"):
        T.atomic_save({"w": torch.zeros(10)}, str(path))  # refused before writing anything
    for write in (lambda p: F.write_json(p, {"a": 1}), lambda p: F.write_lines(p, ["x"])):
        monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
        with pytest.raises(RunFolderError, match=r"\[Errno 28\] No space; the disk is full"):
            write(str(tmp_path / "metrics.jsonl"))
        monkeypatch.undo()
    assert path.read_bytes() == good


@contextlib.contextmanager
def tmpfs(where: Path, options: str):
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()[:80]}); the simulated tests cover it")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.slow
def test_a_full_tmpfs_mid_run_is_one_paragraph(tmp_path):
    """A real 4 MB tmpfs: epoch 1's checkpoint fits, epoch 2's does not (the old one and the new must fit at once):
    one paragraph, no temporary file, epoch 1's checkpoint loadable."""
    with tmpfs(tmp_path / "disk", "size=4m") as disk:
        run_dir = disk / "run"
        out = run("step=depthwise_conv", *SMOKE, "max_steps=1", "train.epochs=3", "logger=none",
                  f"hydra.run.dir={run_dir}")  # fmt: skip
        last = one_paragraph(out, f"cannot write {run_dir}/last.pt: [Errno 28] No space left on device")
        assert "The last good checkpoint" in last
        assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]
        assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1
        assert [r["epoch"] for r in lines(run_dir)] == [1]


@pytest.mark.slow
def test_a_read_only_folder_is_one_paragraph_and_nothing_is_made(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        out = run("step=gelu", *SMOKE, f"hydra.run.dir={ro / 'run'}")
        one_paragraph(out, f"{ro}, where the run folder {ro / 'run'} would go,", "read-only")
        assert list(ro.iterdir()) == []


# ------------------------------------------------------------------------------------------------ repairs
def test_a_finished_run_rebuilds_its_lost_metrics_and_summary(tmp_path, compose_cfg, caplog):
    """In-process, as run_ablation.main calls them: prepare() (the folder check) rewrites a lost metrics.jsonl of a
    finished run from last.pt; a lost summary.json is rewritten by train(), which resumes and trains nothing."""
    from ablations.run_folder import prepare
    from ablations.train import train

    cfg, d = compose_cfg("step=gelu", *SMOKE[:2], "max_steps=2", "train.epochs=2"), str(tmp_path)
    assert prepare(cfg, d) is None
    summary = train(cfg, d)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "metrics.jsonl").unlink()
    done = prepare(cfg, d)
    assert done["rebuilt"] == "metrics.jsonl rewritten from last.pt (2 epochs)" and done["top1"] == summary["top1"]
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
    (tmp_path / "summary.json").unlink()
    assert prepare(cfg, d) is None
    with caplog.at_level(logging.INFO, logger="roadmap"):
        train(cfg, d)
    assert "metrics.jsonl and summary.json rewritten from it" in caplog.text
    again = json.loads((tmp_path / "summary.json").read_text())
    assert again["status"] == "finished" and again["top1"] == summary["top1"] and again["epochs"] == 2
    assert (tmp_path / "metrics.jsonl").read_text() == metrics


def test_analysis_says_when_a_finished_run_lost_its_metrics(tmp_path):
    from analysis.runs import load_run

    assert run("step=gelu", *SMOKE, "max_steps=1", f"hydra.run.dir={tmp_path}").returncode == 0
    assert load_run(tmp_path)["error"] == ""
    (tmp_path / "metrics.jsonl").unlink()
    row = load_run(tmp_path)
    assert row["status"] == "finished" and "metrics.jsonl missing" in row["error"]


# ---------------------------------------------------------------------------------------- small bad inputs
def test_a_negative_seed_is_one_paragraph_and_makes_no_folder(tmp_path):
    one_paragraph(run("step=gelu", *SMOKE, "seed=-1", f"hydra.run.dir={tmp_path / 'run'}"),
                  "error: seed must be a whole number >= 0")  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_a_typo_in_a_key_names_the_closest_and_the_valid_keys(tmp_path):
    last = one_paragraph(run("step=gelu", *SMOKE, "model.kernal_size=5", f"hydra.run.dir={tmp_path / 'run'}"),
                         "unknown config key 'model.kernal_size'", "did you mean model.kernel_size?")  # fmt: skip
    assert "+model.kernal_size" not in last and "stem_stride" in last  # the valid keys, no append hint
    assert not (tmp_path / "run").exists()


def test_a_run_at_chance_level_ends_with_a_warning(tmp_path, fmnist_dir):
    """A run of learnable data that learns nothing (Fashion-MNIST files, one step at a vanishing lr) sits at chance
    and says so; synthetic data's random labels sit there by construction, which is said without a warning."""
    out = run("step=gelu", "profile=smoke", "progress=false", "max_steps=1", "train.lr=1e-12",
              f"data.root={fmnist_dir}", f"hydra.run.dir={tmp_path / 'real'}")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    top1 = json.loads((tmp_path / "real/summary.json").read_text())["top1"]
    assert top1 <= 15.0, top1  # 10 classes: the warning's threshold is 1.5x chance
    assert f"top-1 {top1:.2f}% is chance level for 10 classes: the run learned nothing" in out.stdout + out.stderr
    out = run("step=gelu", *SMOKE, "max_steps=1", f"hydra.run.dir={tmp_path / 'synthetic'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "synthetic/summary.json").read_text())["top1"] <= 15.0
    assert "as expected: synthetic data's labels are random" in out.stdout + out.stderr
    assert "learned nothing" not in out.stdout + out.stderr
