"""Fine-tuning from `pretrained=`: where the weights come from (a run folder or a checkpoint file), whether the
pretrained run fits this one (regime, body), the checks of the finetune.* keys, and the load into a new run (the
body exactly, the head's layers and classifier when they fit). The training side (freezing the body for the first
finetune.freeze_epochs, the fine-tune's lr and layer decay) is in ablations/train.py."""

from __future__ import annotations

import logging
import os

from omegaconf import OmegaConf

from ablations.data import check_classes
from ablations.run_folder import load_checkpoint
from models import ConfigError, RoadmapNet
from models.heads import head_name
from models.pretrained import load_finetune, read_checkpoint

log = logging.getLogger("roadmap")


# model fields that are not weights, or belong to the head, which a fine-tune may change
FINETUNE_FREE = ("head", "head_hidden", "head_norm", "drop_rate", "drop_path_rate")


def pretrained_source(cfg) -> tuple[str, dict | None]:
    """pretrained= as (checkpoint file, the pretrained run's config or None): a run folder gives its last.pt and
    config.yaml, a file itself (a project last.pt says its config when loaded). A run folder of another regime or
    body is refused here, before anything is made, in one paragraph."""
    path = str(cfg.pretrained)
    if not os.path.exists(path):
        raise ConfigError(
            f"pretrained={path} does not exist: give a run folder of this project (its last.pt is loaded) or a local "
            "checkpoint file (timm / torchvision / official ConvNeXt / a last.pt)"
        )
    if not os.path.isdir(path):
        return path, None
    ckpt, conf = os.path.join(path, "last.pt"), os.path.join(path, "config.yaml")
    if not os.path.isfile(ckpt):
        raise ConfigError(
            f"pretrained={path} is a folder but not a run folder of this project (it has no last.pt); give a run "
            "folder whose run has finished at least one epoch, or a checkpoint file"
        )
    if os.path.isfile(conf):
        run_cfg = OmegaConf.to_container(OmegaConf.load(conf))
    else:  # train() called directly writes no config.yaml; the checkpoint carries the config too
        run_cfg = load_checkpoint(ckpt).get("config") or {}
    check_pretrained_run(cfg, run_cfg, path)
    return ckpt, run_cfg


def check_pretrained_run(cfg, run_cfg: dict, path: str) -> None:
    """ConfigError unless the pretrained run has this run's regime and body (every model field but the head's)."""
    theirs = (run_cfg.get("regime") or {}).get("name")
    if theirs != cfg.regime.name:
        raise ConfigError(
            f"pretrained={path} is a run of regime={theirs}, this run is regime={cfg.regime.name}: its weights "
            f"belong to another chain (depths and widths), so they cannot be fine-tuned here; add regime={theirs}, "
            f"or pretrain a run of regime={cfg.regime.name}"
        )
    mine = OmegaConf.to_container(cfg.model, resolve=True)
    old = run_cfg.get("model") or {}
    changes = [f"model.{k}: {old.get(k)!r} -> {v!r}" for k, v in mine.items()
               if k not in FINETUNE_FREE and k in old and old[k] != v]  # fmt: skip
    if changes:
        raise ConfigError(
            f"pretrained={path} is a run of another body ({'; '.join(changes[:5])}{'; ...' if len(changes) > 5 else ''}"
            f"): fine-tuning keeps the pretrained body, only model.head may change; use the pretrained run's step, "
            f"without= and model overrides (its config.yaml)"
        )


def check_finetune(cfg, resume_ckpt: str | None = None) -> None:
    """Clear errors for the fine-tuning keys, the head name, data.classes (what needs no files) and the pretrained
    source (unless resume_ckpt, the run's own last.pt, exists: a resumed run restores its own weights)."""
    ft = cfg.get("finetune")
    freeze = ft.freeze_epochs if ft is not None else 0
    if not isinstance(freeze, int) or freeze < 0:
        raise ConfigError(f"finetune.freeze_epochs must be a whole number >= 0, got {freeze!r}")
    if freeze and freeze >= cfg.train.epochs:
        raise ConfigError(
            f"finetune.freeze_epochs={freeze} leaves no epoch to train the whole model in train.epochs="
            f"{cfg.train.epochs:g} (the frozen epochs train only the head, then everything trains): use fewer frozen "
            "epochs or more epochs"
        )
    if freeze and not cfg.pretrained:
        raise ConfigError(
            f"finetune.freeze_epochs={freeze} freezes a body that nothing pretrained: set pretrained= (a run folder "
            "or a checkpoint file), or finetune.freeze_epochs=0"
        )
    if ft is not None and ft.get("train_norm") and not freeze:
        raise ConfigError(
            "finetune.train_norm=true keeps the body's norm layers training while the body is frozen, but nothing is "
            "frozen: set finetune.freeze_epochs (e.g. 1), or leave finetune.train_norm false"
        )
    if ft is not None and ft.layer_decay is not None and not 0 < ft.layer_decay <= 1:
        raise ConfigError(f"finetune.layer_decay must be in (0, 1] (null: off), got {ft.layer_decay}")
    if ft is not None and ft.lr is not None and ft.lr <= 0:
        raise ConfigError(f"finetune.lr must be > 0 (null: train.lr), got {ft.lr}")
    head = OmegaConf.select(cfg, "model.head", default=None)
    if head is not None:
        head_name(head, False)
    check_classes(cfg.data)
    if cfg.pretrained and not (resume_ckpt and os.path.exists(resume_ckpt)):
        pretrained_source(cfg)


def load_for_finetune(cfg, model: RoadmapNet) -> dict:
    """pretrained= into a new run: the body exactly, the head's layers when the pretrained head is the same, the
    classifier only when it also had the same classes (a foreign file: when its shape fits); logged."""
    path, run_cfg = pretrained_source(cfg)
    raw = read_checkpoint(path)
    if run_cfg is None and isinstance(raw, dict) and isinstance(raw.get("config"), dict):
        run_cfg = raw["config"]  # this project's last.pt given as a file
        check_pretrained_run(cfg, run_cfg, path)
    same_classes = True
    if run_cfg is not None:
        theirs = run_cfg.get("data") or {}
        mine = OmegaConf.to_container(cfg.data, resolve=True)
        same_classes = (theirs.get("name"), theirs.get("classes")) == (mine["name"], mine.get("classes"))
    done = load_finetune(model, raw, path, keep_classifier=same_classes)
    log.info("pretrained %s (%s): body loaded, head layers %s, classifier %s", cfg.pretrained, done["format"],
             done["head"], done["classifier"])  # fmt: skip
    return done
