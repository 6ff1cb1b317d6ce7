"""Where a training process runs: its rank in a DDP group, its share of the node's cores, its GPU, its signals.

One entry, `setup()`, is called by run_ablation.py before anything trains. It reads the job's environment the way
each launcher leaves it:
- torchrun: RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_* are already set;
- submitit (hydra/launcher=submitit_slurm or submitit_local with tasks_per_node > 1): each task is told its rank by
  submitit's job environment, exported with submitit's own helper (TorchDistributedEnvironment);
- a plain `srun` step of several tasks (`srun --ntasks-per-node=8 python run_ablation.py ...`): SLURM_PROCID,
  SLURM_STEP_NUM_TASKS and SLURM_LOCALID, as the official ConvNeXt's `init_distributed_mode` reads them, with the
  master from the step's node list;
- anything else: one process.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from models import ConfigError

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
        # submitit's export() refuses to overwrite a MASTER_ADDR / MASTER_PORT already in the environment (a user's
        # or a parent job's): overwrite, then put back what the user set (every task inherits the same values)
        user = {k: os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT") if os.environ.get(k)}
        # keep every GPU visible: device = LOCAL_RANK mod the visible count (works with per-node or per-task GPUs)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        os.environ.update(user)


def _export_slurm() -> None:
    """A plain `srun` step of several tasks and no torchrun / submitit: export the torch.distributed variables.

    SLURM_STEP_NUM_TASKS is set by srun for its own step only, so a python started directly in a batch script (one
    process, although SLURM_NTASKS may say 8) stays a single process instead of waiting for tasks that never come.
    """
    env = os.environ
    if "RANK" in env or env.get("SUBMITIT_EXECUTOR") or "SLURM_PROCID" not in env:
        return
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or 1)
    if tasks <= 1:
        return
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
    master = env.get("MASTER_ADDR") or _first_slurm_host()  # before exporting anything: an error leaves env as it was
    # the port: the same on every task, from the job id (as submitit picks it)
    port = env.get("MASTER_PORT") or str(random.Random(env.get("SLURM_JOB_ID", "0")).randint(20000, 60000))
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=str(tasks), LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
               LOCAL_WORLD_SIZE=str(max(1, tasks // nodes)), MASTER_ADDR=master,
               MASTER_PORT=port)  # fmt: skip


def _first_slurm_host() -> str:
    """The first host of the step's node list: SLURM's own `scontrol show hostnames`, else submitit's parser of the
    compressed list (node[01-04,07]); a clear error when neither is there."""
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    with contextlib.suppress(Exception):  # no submitit, or a list it cannot parse
        from submitit.slurm.slurm import _parse_node_list

        hosts = _parse_node_list(nodelist)
        if hosts:
            return hosts[0]
    raise ConfigError(
        f"a plain srun launch of {os.environ.get('SLURM_STEP_NUM_TASKS')} tasks needs the address of rank 0, but "
        f"the node list {nodelist!r} could not be read (no scontrol, no submitit): export "
        "MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1) in the batch script, or launch with "
        "torchrun or hydra/launcher=submitit_slurm"
    )


def cpu_share(local_world: int) -> tuple[int, str]:
    """Threads for one training process and where the number comes from.

    The scheduler's CPUs per task where there is one (SLURM_CPUS_PER_TASK), divided by the training processes that
    share that task (torchrun's local processes when torchrun runs inside one SLURM task; 1 for srun / submitit,
    which start one task per process), else this process's usable cores divided by the training processes on the
    node. An explicit OMP_NUM_THREADS is respected.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"])), "OMP_NUM_THREADS"
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        per_task = max(1, local_world) if os.environ.get("TORCHELASTIC_RUN_ID") else 1  # set by torchrun's agent
        n = max(1, int(os.environ["SLURM_CPUS_PER_TASK"]) // per_task)
        return n, "SLURM_CPUS_PER_TASK" + (f" / {per_task} torchrun processes" if per_task > 1 else "")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world)), f"{cores} cores / {local_world} processes"


def setup(device: str) -> DistInfo:
    """Derive the distributed environment, take this process's share of the cores, join the DDP group."""
    _export_submitit()
    _export_slurm()
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
    """The job was asked to stop (SIGTERM / SIGUSR1 / Ctrl-C); a checkpoint of the exact position was saved."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's code for the signal: 130 for Ctrl-C (SIGINT), 143 (SIGTERM) for the scheduler's signals."""
        return 130 if self.signum == signal.SIGINT else 143


class PreemptionGuard:
    """Turns SIGTERM / SIGUSR1 (and submitit's own signal) and Ctrl-C into a flag the training loop checks between
    steps.

    The loop saves a checkpoint of its exact position, then calls `stop()`: the handler that was installed before
    (submitit's, which requeues the job) runs, and `Preempted` ends the run with a message saying how to resume.
    Ctrl-C is a preemption too (the same save, exit 130); a second Ctrl-C quits at once (KeyboardInterrupt),
    keeping the last checkpoint written.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _signals(self) -> list[int]:
        sigs = [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT]
        if os.environ.get("SUBMITIT_EXECUTOR"):
            with contextlib.suppress(Exception):
                import submitit

                sigs.append(submitit.JobEnvironment._usr_sig())
        return list(dict.fromkeys(sigs))

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: quit now
        if self.signum is None:
            again = " (Ctrl-C again quits at once, without saving)" if signum == signal.SIGINT else ""
            log.warning("received %s: saving a checkpoint at the next step%s", signal.Signals(signum).name, again)
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
        if callable(previous) and signum != signal.SIGINT:  # Python's SIGINT handler would raise KeyboardInterrupt
            previous(signum, None)
        raise Preempted(message, signum)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """DataLoader worker_init_fn: workers ignore the stop signals, and the training process decides.

    SLURM signals the whole process group and Ctrl-C the whole foreground group; torch's workers die of SIGTERM
    (their C handler re-raises it unless the parent sent it), and the parent then fails with "DataLoader worker
    ... killed by signal" before it can save. Ignoring the signals in the workers lets the parent finish its step,
    save and stop; the workers are shut down with the loader.
    """
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
