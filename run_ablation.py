"""Train and evaluate one roadmap step: python run_ablation.py step=large_kernel [key=value ...] [-m for sweeps]."""

from __future__ import annotations

import json
import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ablations.config import PAPER, left_out, register, toggles
from models import STEPS, ConfigError

register()
log = logging.getLogger("roadmap")
# keys that may differ when a run folder is reused; factorial only says which design a sweep runs, not the model
IGNORED = ("progress", "device", "logger", "log_every", "factorial")


def _plain(cfg) -> dict:
    d = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in IGNORED}
    # default toggles are left out, so a default run's config.yaml is what it was before toggles existed (and a
    # finished run from then is still recognised and reused)
    d["without"] = left_out(d.get("without"))  # [a,b] and [b,a] are the same run
    if not d["without"]:
        d.pop("without")
    roadmap = d.get("roadmap")
    if isinstance(roadmap, dict) and roadmap.get("name") == PAPER and tuple(roadmap.get("steps") or ()) == STEPS:
        d.pop("roadmap")
    return d


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    # top-level values (step, bar, seed) first: they say most about why the folders differ
    for k in sorted(set(a) | set(b), key=lambda k: (isinstance(a.get(k), dict), k)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} -> {y!r}")
    return out


def prepare_run_dir(cfg: DictConfig, run_dir: str) -> dict | None:
    """Write config.yaml; refuse a folder holding another config; return the summary of a finished run."""
    toggles(cfg)  # a bad step name in without= or the roadmap: one ConfigError paragraph before any folder is touched
    path = os.path.join(run_dir, "config.yaml")
    new = _plain(cfg)
    if os.path.exists(path):
        diff = _diff(_plain(OmegaConf.load(path)), new)
        if diff:
            raise ConfigError(
                f"run folder {run_dir} already holds a run with a different config ({'; '.join(diff[:5])}). "
                "Nothing was changed: pick another folder with hydra.run.dir=..., or delete that one."
            )
        summary = os.path.join(run_dir, "summary.json")
        if os.path.exists(summary):
            with open(summary) as f:
                s = json.load(f)
            if s.get("status") == "finished":
                return s
    else:
        os.makedirs(run_dir, exist_ok=True)
        OmegaConf.save(OmegaConf.create(new), path)
    return None


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Compose, build, train, write; user mistakes print one paragraph, no traceback."""
    from ablations import dist as D
    from ablations.train import TrainingDiverged, train, write_json

    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    multirun = hc.mode == RunMode.MULTIRUN
    info = D.setup(cfg.device)  # the DDP group (torchrun or submitit tasks) and this process's share of the cores
    owned = False  # only a folder whose config is this run's may get a 'failed' summary
    try:
        # rank 0 checks the folder; every rank takes its decision (a finished run ends all ranks, not only rank 0)
        decision = None
        if info.is_main:
            try:
                decision = ("done", prepare_run_dir(cfg, run_dir))
            except ConfigError as e:
                decision = ("error", str(e))
        decision = D.broadcast(decision)
        if decision[0] == "error":
            raise ConfigError(decision[1])
        owned, done = True, decision[1]
        if done is not None:
            log.info(
                "already finished: %s (top-1 %.2f%%, %s epochs); summary in %s",
                run_dir,
                done["top1"],
                done["epochs"],
                os.path.join(run_dir, "summary.json"),
            )
            return done["top1"]
        with _sweep_gpu(multirun, info.world) as gpu:
            summary = train(cfg, run_dir, gpu_index=gpu)
        log.info(
            "done: top-1 %.2f%% top-5 %.2f%% in %.0fs -> %s",
            summary["top1"],
            summary["top5"],
            summary["wall_s"],
            run_dir,
        )
        return summary["top1"]
    except D.Preempted as e:  # a checkpoint of the exact position is saved; no 'failed' summary
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM; also in a one-process sweep: the signal means stop, not "next job"
    except (ConfigError, TrainingDiverged) as e:
        msg = f"error: {e}"
    except Exception as e:  # keep a sweep going; single runs re-raise below
        if not multirun:
            raise
        msg = f"error: {type(e).__name__}: {e}"
    finally:
        D.teardown()
    if owned and info.is_main:
        write_json(
            os.path.join(run_dir, "summary.json"),
            {"status": "failed", "error": msg, "step": cfg.step, "bar": cfg.bar, "seed": cfg.seed},
        )
    print(msg, file=sys.stderr)
    if not multirun:
        sys.exit(2)
    return None


def _sweep_gpu(multirun: bool, world: int):
    """Parallel sweeps on a machine with several GPUs (hydra/launcher=joblib): each job holds a free GPU."""
    import contextlib

    import torch

    from ablations.dist import gpu_lease

    count = torch.cuda.device_count()
    if multirun and world == 1 and count > 1:
        return gpu_lease(count)
    return contextlib.nullcontext(None)


def _default_profile(argv: list[str]) -> list[str]:
    """Pick profile=gpu when CUDA is present and the command line names no profile."""
    if any(a.startswith(("profile=", "+profile=")) for a in argv[1:]):
        return argv
    import torch

    return argv + ["profile=gpu"] if torch.cuda.is_available() else argv


if __name__ == "__main__":
    sys.argv = _default_profile(sys.argv)
    main()
