"""Logging a run to the tools researchers watch: TensorBoard (default), Weights & Biases (optional) or nothing.

`Tracker(run_dir, cfg, purge_step)` is what train() calls; every call is safe: the first exception (a full disk, a
missing package, a broken writer) logs one warning and switches logging off, so it never ends a training run.
TensorBoard's event files go into the run folder itself, so `tensorboard --logdir runs/sweeps/<sweep>` names each
run <bar>/seed<k>.
"""

from __future__ import annotations

import logging
import os

from omegaconf import OmegaConf

from models.layers import choice

log = logging.getLogger("roadmap")
LOGGERS = ("tensorboard", "wandb", "none")


class Tracker:
    """Scalars, text and hparams to TensorBoard or W&B; a no-op for logger=none, other ranks, or after a failure."""

    def __init__(self, run_dir: str, cfg, purge_step: int | None = None, enabled: bool = True):
        """enabled=False (ranks other than 0) logs nothing; purge_step (resume) hides TensorBoard events logged at
        or after it by an earlier sitting, so a resumed run shows each step once."""
        choice("logger", cfg.logger, LOGGERS)
        self.kind = cfg.logger
        self._tb = self._wandb = None
        self.active = enabled and self.kind != "none"
        if not self.active:
            return
        if self.kind == "wandb":
            self._call("start", self._start_wandb, run_dir, cfg)
        else:
            self._call("start", self._start_tensorboard, run_dir, purge_step)

    def _start_tensorboard(self, run_dir: str, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=run_dir, purge_step=purge_step, flush_secs=30)

    def _start_wandb(self, run_dir: str, cfg) -> None:
        try:
            import wandb
        except ImportError:
            log.warning("logger=wandb: the wandb package is not installed (pip install wandb); logging is off")
            self.active = False
            return
        os.environ.setdefault("WANDB_MODE", "offline")  # works without a network; `wandb sync` uploads later
        self._wandb = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "convnext-roadmap"),
            dir=run_dir,
            name=f"{cfg.bar}/seed{cfg.seed}",
            group=str(cfg.bar),
            config=OmegaConf.to_container(cfg, resolve=True),
            id=_wandb_id(run_dir),  # one W&B run per run folder: a resumed run continues it
            resume="allow",
        )

    def _call(self, what: str, fn, *args) -> None:
        """fn(*args); on the first exception say what failed, once, and log nothing more."""
        if not self.active:
            return
        try:
            fn(*args)
        except Exception as e:  # logging is a by-product: a failure must never end the training run
            self.active = False
            log.warning("logger=%s: %s failed (%s: %s); logging is off for the rest of this run",
                        self.kind, what, type(e).__name__, e)  # fmt: skip

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Log {tag: number} at the global optimizer step; None values are skipped."""
        values = {k: float(v) for k, v in values.items() if v is not None}
        if self._wandb is not None:
            self._call("log", self._wandb.log, values, step)
        elif self._tb is not None:
            self._call("add_scalar", lambda: [self._tb.add_scalar(k, v, step) for k, v in values.items()])

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """Log a Markdown text (config, complexity); W&B keeps these in the run config instead."""
        if self._tb is not None:
            self._call("add_text", self._tb.add_text, tag, text, step)

    def hparams(self, hparams: dict, metrics: tuple[str, ...]) -> None:
        """Record the run's hyper-parameters in TensorBoard's HParams tab, against scalar tags already logged."""
        if self._tb is None:
            return

        def write():
            from torch.utils.tensorboard.summary import hparams as hp_summary

            clean = {k: v for k, v in hparams.items() if isinstance(v, (int, float, str, bool))}
            # into this run's own event file (add_hparams would start a separate run per call)
            for s in hp_summary(clean, dict.fromkeys(metrics, 0.0)):
                self._tb.file_writer.add_summary(s)

        self._call("hparams", write)

    def close(self) -> None:
        """Flush and close; safe to call twice."""
        if self._tb is not None:
            self._call("close", self._tb.close)
        if self._wandb is not None:
            self._call("finish", self._wandb.finish)
        self._tb = self._wandb = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _wandb_id(run_dir: str) -> str:
    import hashlib

    return hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:16]


def config_markdown(cfg) -> str:
    """The resolved config as a Markdown code block (TensorBoard's text tab renders Markdown)."""
    return "\n".join("    " + line for line in OmegaConf.to_yaml(cfg, resolve=True).splitlines())


__all__ = ["LOGGERS", "Tracker", "config_markdown"]
