"""What the multi-process tests share: the reference DDP run, launching run_ablation.py, comparing two trainings."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# LayerNorm model (per-sample statistics: the split of a batch over processes does not change the maths), plain
# SGD (no Adam normalisation amplifying rounding), no random augmentation; 3 steps of a large lr so that weights
# trained without gradient all-reduce end far from the single-process ones.
DDP_RUN = [
    "step=separate_downsampling",
    "data=synthetic",
    "profile=smoke",
    "device=cpu",
    "progress=false",
    "max_steps=3",
    "train.epochs=2",
    "train.batch_size=16",
    "train.optimizer=momentum",  # timm: plain SGD (its "sgd" is Nesterov)
    "train.momentum=0",
    "train.lr=0.5",
    "train.lr_scaling=none",
    "train.warmup_epochs=0",
    "train.hflip=0",
    "train.translate=0",
    "data.test_subset=251",  # does not divide by 2 processes: the sharded evaluation must still count every image
]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _run(args, launcher=(), timeout=300, env=None):
    return subprocess.run(
        [sys.executable, *launcher, "run_ablation.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=timeout,
    )


def _torchrun(nproc: int, port: int):
    return ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_training(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:  # equal up to summation order (measured: <= 1e-5); unsynchronised gradients move them >> 1e-3
        assert (wa[k].float() - wb[k].float()).abs().max() <= 1e-4 * (1 + wa[k].float().abs().max()), k
    la, lb = _lines(a), _lines(b)
    assert [r["epoch"] for r in la] == [r["epoch"] for r in lb] == [1, 2]
    for ra, rb in zip(la, lb):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=2e-5)
        assert ra["top1"] == rb["top1"] and ra["top5"] == rb["top5"]  # integer counts: exactly equal


def single_run(tmp_path_factory) -> Path:
    """The single-process reference run of the same global batch."""
    d = tmp_path_factory.mktemp("single")
    out = _run([*DDP_RUN, f"hydra.run.dir={d}"])
    assert out.returncode == 0, out.stderr[-3000:]
    return d


def free_port() -> int:
    """A TCP port nobody listens on now (for MASTER_PORT / torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
