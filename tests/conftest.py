"""Shared fixtures: Hydra composition of conf/ and a tiny Fashion-MNIST-format folder."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from ablations.config import register

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
register()
# one thread per pytest-xdist worker (make test runs one worker per core), two when running alone
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip cleanly without a CUDA device; `pytest -m cuda` selects them on a GPU machine."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides) -> the composed config, exactly as run_ablation.py would see it (no hydra node)."""

    def _compose(*overrides: str, return_hydra_config: bool = False):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)

    return _compose


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped idx file (the MNIST family's format)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fmnist_dir(tmp_path) -> Path:
    """A tiny learnable Fashion-MNIST-format folder: class k is a bright bar at row 2k (train 200, test 100)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("t10k", 100)):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 40, (n, 28, 28))
        for i, k in enumerate(y):
            x[i, 2 * k + 3 : 2 * k + 6, 4:24] = 255
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", y)
    return tmp_path


@pytest.fixture(scope="session")
def single(tmp_path_factory) -> Path:
    """The single-process reference run of the multi-process tests (tests/ddp_helpers.py), once per worker."""
    from ddp_helpers import single_run

    return single_run(tmp_path_factory)


@pytest.fixture
def ctrl_c_at(monkeypatch):
    """ctrl_c_at(n): a SIGINT to this process at the trainer's n-th seed_all (one when the model is built, then one
    per optimizer step), as a Ctrl-C mid-run; returns the function that puts seed_all back."""
    import signal

    import ablations.train as T

    real, calls = T.seed_all, {"n": 0}

    def install(n: int):
        def seed_then_ctrl_c(seed):
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGINT)
            real(seed)

        monkeypatch.setattr(T, "seed_all", seed_then_ctrl_c)
        return lambda: monkeypatch.setattr(T, "seed_all", real)

    return install
