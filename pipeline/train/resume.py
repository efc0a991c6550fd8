"""What a run continues from: the check before any collective, and a warm start of a changed model.

    check_resumable(cfg, "latest", warm_start=None)   # every rank, before Trainer(...): a readable diff, or nothing
    carried = warm_start(trainer, path, "matching")   # a new model from the weights of a checkpoint that differs

A resume must find the checkpoint's tables and tower in the config; checking it from meta.json (plain JSON, each rank
reads it alone) before the Trainer is built means a mismatch is refused with its diff before DMP's first
collective, never as a DCP shape error in the middle of loading. A warm start says what to carry instead:
  dense      the dense (data-parallel) tensors: tower, tokenizer, data-parallel tables
  tables     the sharded embedding tables
  matching   every model tensor whose name and shape match
Only weights travel: the optimizer state starts fresh, and so does the dense-step state. The run's progress
(days done, steps) carries over, so a stream continues with its next day; a checkpoint taken mid-day cannot be
warm-started from (its day would be half trained by another model). The warm-started model is checkpointed at
once, under the same step, replacing the checkpoint it started from: the run's newest checkpoint is then of the
configured model and later resumes need no warm start.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from hyrank.pipeline.config import RunConfig, to_dict
from hyrank.pipeline.train.checkpoint import Checkpointer, read_meta
from hyrank.pipeline.train.state import model_diff

log = logging.getLogger(__name__)

WarmStart = Literal["dense", "tables", "matching"]


def checkpoint_to_resume(cfg: RunConfig, where: str | Path | None) -> Path | None:
    """The checkpoint a resume from `where` would start with (no collective; the newest, before any fallback)."""
    if where is None:
        return None
    if where in ("latest", "latest-if-any"):
        root = Path(cfg.checkpoint.dir or Path(cfg.out_dir) / "checkpoints")
        return Checkpointer(root, env=None, keep=cfg.checkpoint.keep, tensors={}).latest()
    return Path(where)


def check_resumable(cfg: RunConfig, where: str | Path | None, *, warm_start: WarmStart | None = None) -> None:
    """Refuse, with a readable diff, a resume whose checkpoint holds other tables or another tower (unless a
    warm start says what to carry). Each rank alone: call it before building the Trainer."""
    path = checkpoint_to_resume(cfg, where)
    if path is None or not (path / "meta.json").is_file() or warm_start is not None:
        return  # nothing to compare (the resume itself names a missing checkpoint), or a warm start takes it
    diff = checkpoint_diff(cfg, path)
    if diff:
        raise ValueError(f"{path}: the checkpoint was trained with another model: " + "; ".join(diff) + ". Resume "
                         "with the config it was saved with (its meta.json holds it), or start this model from its "
                         "weights with --warm-start dense|tables|matching")


def checkpoint_diff(cfg: RunConfig, path: Path) -> list[str]:
    """What the checkpoint at `path` holds that this config's model does not (model_diff's lines)."""
    return model_diff(read_meta(path).config, json.loads(json.dumps(to_dict(cfg), default=str)))


def warm_start(trainer: Any, path: Path, mode: WarmStart) -> list[str]:
    """Load the weights `mode` selects from `path` into `trainer`'s model (a Trainer; not imported here, trainer.py
    imports this) and its progress; returns the tensors carried (collective)."""
    progress = read_meta(path).progress
    if progress.day is not None:
        raise ValueError(f"{path} was taken in the middle of day {progress.day}: warm-start from a day-end "
                         "checkpoint")
    dense = {n for n, _ in trainer.dense_named_parameters()}

    def wanted(name: str, sharded: bool) -> bool:
        if mode == "tables":
            return sharded
        if mode == "dense":
            return not sharded and (name in dense or not name.startswith("sparse."))
        return True

    carried = trainer.checkpointer.load_model_subset(path, wanted)
    trainer.progress.load_state_dict(progress.state_dict())
    if trainer.env.is_main:
        diff = checkpoint_diff(trainer.cfg, path)
        log.warning("warm start (%s) from %s, a checkpoint of another model (%s): %d tensors carried, the rest and "
                    "the optimizer state start fresh", mode, path, "; ".join(diff) or "same model", len(carried))
    return carried
