"""Hydra glue of `+sweep=factorial` (conf/sweep/factorial.yaml): the design as the sweep over `without`.

Why a resolver and no sweeper plugin: Hydra's basic sweeper takes `hydra.sweeper.params` from the composed config,
and Hydra instantiates the sweeper from that config, which resolves interpolations with the whole config as root.
So `without: ${factorial.without:}` in the sweep file becomes the design's runs after the command line's
`factorial.*` overrides are applied, and every launcher (joblib, submitit) gets plain `without=[...]` jobs, exactly
as for the leave-one-out sweep. A plugin would have to live in the hydra_plugins namespace package and would
replace the sweeper every other sweep and launcher option assumes.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ablations.factorial import Design, design_of
from models import ConfigError

log = logging.getLogger(__name__)


def _design(root) -> Design:
    """The design named by a config's `factorial` node."""
    node = OmegaConf.select(root, "factorial", default=None)
    return design_of(OmegaConf.to_container(node, resolve=True) if node is not None else {})


def without_sweep(*, _root_) -> str:
    """Resolver factorial.without: the design's runs as a sweep over without ("[],[gelu],[gelu,bn_to_ln],...")."""
    return _design(_root_).sweep_value()


class FactorialDesignCallback(Callback):
    """Before the first job: check the design (a bad one ends the command with one paragraph) and write
    design.csv/.json/.md into the sweep folder."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Build the design from config.factorial; write it; exit 2 with `error: ...` on a bad design."""
        try:
            design = _design(config)
        except ConfigError as e:  # before Hydra builds the sweeper, whose resolver would raise it inside a traceback
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        design.write(sweep_dir)
        log.info(
            "factorial design: %d runs x %d factors (%s%s) -> %s/design.csv",
            design.runs,
            len(design.factors),
            design.kind,
            " + fold-over" if design.foldover else "",
            sweep_dir,
        )


def register() -> None:
    """Register the resolver factorial.without (ablations.config.register calls this)."""
    if not OmegaConf.has_resolver("factorial.without"):
        OmegaConf.register_new_resolver("factorial.without", without_sweep)
