"""Hydra callback that redraws the roadmap figure (the leave-one-out and factorial figures, for such sweeps) when a
multirun ends.

Enable with `hydra.callbacks.roadmap_figure._target_=analysis.callback.RoadmapFigureCallback`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class RoadmapFigureCallback(Callback):
    """Runs analysis.analyze on the sweep folder at the end of a multirun; never raises."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Analyse hydra.sweep.dir; the multirun-end hook gets no job results, so the sweep folder is the source."""
        try:
            sweep = OmegaConf.select(config, "hydra.sweep.dir", throw_on_missing=True)
            if not sweep:
                raise ValueError("config has no hydra.sweep.dir")
            sweep_dir = Path(str(sweep))
            cwd = OmegaConf.select(config, "hydra.runtime.cwd", default=None)
            if not sweep_dir.is_absolute() and not sweep_dir.exists() and cwd:
                sweep_dir = Path(str(cwd)) / sweep_dir  # relative to where hydra was launched
            from analysis import analyze  # lazy: an import problem must be caught and logged like any other

            written = analyze([sweep_dir])
            log.info("roadmap figure: %s", ", ".join(str(p) for p in written.values()))
        except Exception as e:  # a figure is a by-product: a failure here must never fail the sweep
            log.warning("roadmap figure not written: %s: %s", type(e).__name__, e)
