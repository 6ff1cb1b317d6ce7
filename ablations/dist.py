"""Where a training process runs: its rank in a DDP group, its share of the node's cores, its GPU, its signals.

One entry, `setup()`, is called by run_ablation.py before anything trains. It reads the job's environment the way
each launcher leaves it:
- torchrun: RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_* are already set;
- submitit (hydra/launcher=submitit_slurm or submitit_local with tasks_per_node > 1): each task is told its rank by
  submitit's job environment, exported with submitit's own helper (TorchDistributedEnvironment);
- anything else: one process.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("roadmap")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: global rank, world size, rank and process count on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder."""
        return self.rank == 0


def dist_info() -> DistInfo:
    """The DDP position from the environment (torchrun's variables, or those setup() exported); one process without."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", 1))
    return DistInfo(
        int(env.get("RANK", 0)),
        world,
        int(env.get("LOCAL_RANK", 0)),
        int(env.get("LOCAL_WORLD_SIZE", world)),
    )


def _export_submitit() -> None:
    """In a multi-task submitit job, export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT for torch.distributed."""
    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import submitit

    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job after all
        return
    if env.num_tasks > 1:
        # keep every GPU visible: device = LOCAL_RANK mod the visible count (works with per-node or per-task GPUs)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def cpu_share(local_world: int) -> tuple[int, str]:
    """Threads for one training process and where the number comes from.

    The scheduler's CPUs per task where there is one (SLURM_CPUS_PER_TASK), else this process's usable cores divided
    by the training processes on the node. An explicit OMP_NUM_THREADS is respected.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"])), "OMP_NUM_THREADS"
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"])), "SLURM_CPUS_PER_TASK"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world)), f"{cores} cores / {local_world} processes"


def setup(device: str) -> DistInfo:
    """Derive the distributed environment, take this process's share of the cores, join the DDP group."""
    _export_submitit()
    info = dist_info()
    threads, why = cpu_share(info.local_world)
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # DataLoader workers and subprocesses inherit it
    log.info("process %d/%d (local %d/%d): %d threads (%s)", info.rank, info.world, info.local_rank,
             info.local_world, threads, why)  # fmt: skip
    if info.world > 1 and not dist.is_initialized():
        use_nccl = device != "cpu" and torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        dist.init_process_group("nccl" if use_nccl else "gloo")
    return info


def teardown() -> None:
    """Leave the DDP group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj):
    """rank 0's `obj` on every rank (the identity without a group): every rank takes rank 0's decision."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------------------ GPU leases
@contextlib.contextmanager
def gpu_lease(count: int, lock_dir: str | None = None, poll_s: float = 2.0):
    """Hold one of `count` GPUs for as long as the block runs: the first free one, by an exclusive file lock.

    Parallel sweep workers on one node (hydra/launcher=joblib) each take a free GPU for the job they run and give
    it back when it ends, so a slow job never gets a second job queued on its GPU while another GPU idles. Cached
    GPU memory is released when the job ends.
    """
    lock_dir = lock_dir or os.path.join(tempfile.gettempdir(), f"convnext-roadmap-gpus-{os.getuid()}")
    os.makedirs(lock_dir, exist_ok=True)
    while True:
        for i in range(count):
            f = open(os.path.join(lock_dir, f"gpu{i}.lock"), "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            try:
                yield i
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
            return
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------------------ preemption
class Preempted(RuntimeError):
    """The job was asked to stop (SIGTERM / SIGUSR1); a checkpoint of the exact position was saved."""


class PreemptionGuard:
    """Turns SIGTERM / SIGUSR1 (and submitit's own signal) into a flag the training loop checks between steps.

    The loop saves a checkpoint of its exact position, then calls `stop()`: the handler that was installed before
    (submitit's, which requeues the job) runs, and `Preempted` ends the run with a message saying how to resume.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _signals(self) -> list[int]:
        sigs = [signal.SIGTERM, signal.SIGUSR1]
        if os.environ.get("SUBMITIT_EXECUTOR"):
            with contextlib.suppress(Exception):
                import submitit

                sigs.append(submitit.JobEnvironment._usr_sig())
        return list(dict.fromkeys(sigs))

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            log.warning("received %s: saving a checkpoint at the next step", signal.Signals(signum).name)
        self.signum = signum

    def __enter__(self) -> PreemptionGuard:
        with contextlib.suppress(ValueError):  # signal handlers can only be set in the main thread
            for s in self._signals():
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def stop(self, message: str) -> None:
        """After the checkpoint: run the previous handler (submitit requeues), then raise Preempted."""
        signum = self.signum if self.signum is not None else signal.SIGTERM
        previous = self._previous.get(signum)
        self.__exit__()
        if callable(previous):
            previous(signum, None)
        raise Preempted(message)
