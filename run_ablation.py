"""Train and evaluate one roadmap step: python run_ablation.py step=large_kernel [key=value ...] [-m for sweeps]."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ablations import at_chance
from ablations.config import check_override_keys, register
from models import ConfigError

register()
log = logging.getLogger("roadmap")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Compose, build, train, write; user mistakes print one paragraph, no traceback."""
    from ablations import dist as D
    from ablations.run_folder import FolderLock, RunFolderError, prepare, write_json
    from ablations.train import TrainingDiverged, train

    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    multirun = hc.mode == RunMode.MULTIRUN
    owned = False  # only a folder whose config is this run's (and whose lock we hold) may get a 'failed' summary
    msg, info = None, D.DistInfo()
    with contextlib.ExitStack() as held:
        try:
            info = D.setup(cfg.device)  # the DDP group (torchrun, srun or submitit tasks) and this process's cores
            # rank 0 locks and checks the folder; every rank takes its decision (a finished run ends all ranks)
            decision = None
            if info.is_main:
                try:
                    held.enter_context(FolderLock(run_dir))
                    decision = ("done", prepare(cfg, run_dir))
                except ConfigError as e:
                    decision = ("error", str(e))
            decision = D.broadcast(decision)
            if decision[0] == "error":
                raise RunFolderError(decision[1])
            owned, done = True, decision[1]
            if done is not None:
                log.info("already finished: %s (top-1 %.2f%%, %s epochs)%s; summary in %s", run_dir, done["top1"],
                         done["epochs"], f"; {done['rebuilt']}" if done.get("rebuilt") else "",
                         os.path.join(run_dir, "summary.json"))  # fmt: skip
                return done["top1"]
            with _sweep_gpu(multirun, info.world) as gpu:
                summary = train(cfg, run_dir, gpu_index=gpu)
            log.info("done: top-1 %.2f%% top-5 %.2f%% in %.0fs -> %s", summary["top1"], summary["top5"],
                     summary["wall_s"], run_dir)  # fmt: skip
            if at_chance(summary["top1"], summary.get("num_classes")):
                if cfg.data.name == "synthetic":
                    log.info("top-1 at chance level, as expected: synthetic data's labels are random")
                else:
                    log.warning("top-1 %.2f%% is chance level for %d classes: the run learned nothing (training "
                                "collapsed, e.g. to a constant prediction, or the data has no signal); try a lower lr "
                                "or another seed. The factorial analysis leaves such runs out of its fit.",
                                summary["top1"], summary["num_classes"])  # fmt: skip
            return summary["top1"]
        except D.Preempted as e:  # a checkpoint of the exact position is saved; no 'failed' summary
            print(f"preempted: {e}", file=sys.stderr)
            sys.exit(e.exit_code)  # 143 (SIGTERM) / 130 (Ctrl-C); also in a sweep: the signal means stop, not "next"
        except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
            print(f"interrupted: stopped at once; {run_dir}/last.pt keeps the last checkpoint written (if any): run "
                  "the same command again to resume", file=sys.stderr)  # fmt: skip
            sys.exit(130)
        except RunFolderError as e:  # the folder is another process's, another run's, unwritable or full
            msg, owned = f"error: {e}", False
        except (ConfigError, TrainingDiverged) as e:
            msg = f"error: {e}"
        except Exception as e:  # keep a sweep going; single runs re-raise below
            if not multirun:
                raise
            msg = f"error: {type(e).__name__}: {e}"
        finally:
            D.teardown()
        if owned and info.is_main:
            with contextlib.suppress(ConfigError):  # the failure may be the disk itself
                failed = {"status": "failed", "error": msg, "step": cfg.step, "bar": cfg.bar, "seed": cfg.seed}
                write_json(os.path.join(run_dir, "summary.json"), failed)
    print(msg, file=sys.stderr)
    if not multirun:
        sys.exit(2)
    return None


def _sweep_gpu(multirun: bool, world: int):
    """Parallel sweeps on a machine with several GPUs (hydra/launcher=joblib): each job holds a free GPU."""
    import torch

    from ablations.dist import gpu_lease

    count = torch.cuda.device_count()
    if multirun and world == 1 and count > 1:
        return gpu_lease(count)
    return contextlib.nullcontext(None)


LOCAL_LAUNCHERS = ("basic", "joblib", "submitit_local")  # jobs run on this machine, so its hardware is theirs


def _default_profile(argv: list[str]) -> list[str]:
    """Pick profile=gpu when CUDA is present and the command line names no profile. A sweep sent to a cluster
    (a launcher that runs its jobs elsewhere) must name its profile: this host's hardware says nothing there."""
    if any(a.startswith(("profile=", "+profile=")) for a in argv[1:]):
        return argv
    launcher = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("hydra/launcher=")), "basic")
    if launcher not in LOCAL_LAUNCHERS:
        raise ConfigError(
            f"hydra/launcher={launcher} runs the jobs on other machines, so the profile cannot be picked from this "
            "one's hardware (a login node without a GPU would send the CPU proxy to the cluster's GPUs): name it, "
            "e.g. profile=gpu (one GPU per job, small images) or profile=imagenet data.root=... (the paper's scale)"
        )
    import torch

    return argv + ["profile=gpu"] if torch.cuda.is_available() else argv


if __name__ == "__main__":
    try:
        check_override_keys(sys.argv[1:])
        sys.argv = _default_profile(sys.argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
