"""Watching runs: TensorBoard events of a run (read back with TensorBoard's own reader), logger=none, a failing
writer, resume without duplicate steps."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def _train(compose_cfg, run_dir: Path, *overrides: str, steps: int = 3):
    from ablations.train import train

    cfg = compose_cfg("step=fewer_norms", "data=synthetic", "profile=smoke", f"max_steps={steps}", *overrides)
    return train(cfg, str(run_dir))


def _events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc


def _steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def test_run_writes_tensorboard_events(tmp_path, compose_cfg):
    """2 epochs x 4 steps, log_every=2: loss and lr after steps 1, 3 and 4 (the last) of each epoch; top-1 and img/s
    per epoch; config and complexity as text; the last epoch's top-1 equals metrics.jsonl's."""
    summary = _train(compose_cfg, tmp_path, "train.epochs=2", "log_every=2", steps=4)
    acc = _events(tmp_path)
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "test/top1", "test/top5", "train/img_per_s", "train/epoch_loss"} <= set(
        tags["scalars"]
    )
    assert _steps(acc, "train/loss") == [1, 3, 4, 5, 7, 8]  # global optimizer steps done
    assert _steps(acc, "train/lr") == [1, 3, 4, 5, 7, 8]
    assert _steps(acc, "test/top1") == _steps(acc, "train/img_per_s") == [4, 8]
    assert acc.Scalars("test/top1")[-1].value == pytest.approx(summary["top1"])
    assert all(e.value > 0 for e in acc.Scalars("train/loss"))
    assert {"config/text_summary", "complexity/text_summary"} <= set(tags["tensors"])
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "step: fewer_norms" in text and "log_every: 2" in text


def test_logger_none_writes_no_events(tmp_path, compose_cfg):
    _train(compose_cfg, tmp_path, "logger=none")
    assert (tmp_path / "summary.json").is_file()
    assert not list(tmp_path.glob("events.out.tfevents*"))


@pytest.mark.parametrize("where", ["create", "write"])
def test_failing_writer_warns_once_and_training_goes_on(tmp_path, compose_cfg, monkeypatch, caplog, where):
    """A SummaryWriter that cannot be created, or that fails on every write: one warning, the run finishes."""
    import torch.utils.tensorboard as tb

    class Broken:
        def __init__(self, *a, **k):
            if where == "create":
                raise OSError("disk full")

        def __getattr__(self, name):
            def fail(*a, **k):
                raise OSError("disk full")

            return fail

    monkeypatch.setattr(tb, "SummaryWriter", Broken)
    with caplog.at_level(logging.WARNING, logger="roadmap"):
        summary = _train(compose_cfg, tmp_path, "train.epochs=2", "log_every=1")
    assert summary["status"] == "finished" and summary["epochs"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "disk full" in warnings[0] and "logging is off" in warnings[0], warnings


def test_wandb_missing_says_so_once(tmp_path, compose_cfg, monkeypatch, caplog):
    """logger=wandb without the package: one clear warning, training goes on, nothing logged."""
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with caplog.at_level(logging.WARNING, logger="roadmap"):
        summary = _train(compose_cfg, tmp_path, "logger=wandb")
    assert summary["status"] == "finished"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "wandb package is not installed" in warnings[0]
    assert not list(tmp_path.glob("events.out.tfevents*"))


def test_resume_shows_each_step_once(tmp_path, compose_cfg, monkeypatch):
    """A sitting that logged past its last checkpoint, then a resume: TensorBoard shows every step once."""
    import ablations.train as T

    class Killed(Exception):
        pass

    save = T.atomic_save
    saves = []

    def save_then_die(obj, path):  # dies after epoch 1's checkpoint, mid-way through epoch 2
        save(obj, path)
        saves.append(path)

    real_scalars = T.Tracker.scalars

    def scalars_then_die(self, values, step):
        real_scalars(self, values, step)
        if step == 4 and saves:  # epoch 2's first point is logged, then the process dies before any checkpoint
            self.close()
            raise Killed

    monkeypatch.setattr(T, "atomic_save", save_then_die)
    monkeypatch.setattr(T.Tracker, "scalars", scalars_then_die)
    with pytest.raises(Killed):
        _train(compose_cfg, tmp_path, "train.epochs=2", "log_every=1")
    monkeypatch.setattr(T.Tracker, "scalars", real_scalars)
    _train(compose_cfg, tmp_path, "train.epochs=2", "log_every=1")
    acc = _events(tmp_path)
    assert _steps(acc, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert _steps(acc, "test/top1") == [3, 6]
