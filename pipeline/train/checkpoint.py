"""DCP checkpoints of a training run: everything needed to continue exactly where it stopped.

    ckpt = Checkpointer(cfg, env)
    ckpt.save(trainer, reader=reader)        # collective; reader: the day in progress (None at a day's end)
    path = ckpt.latest()                     # the newest complete checkpoint, or None
    resume = ckpt.load(trainer, path)        # collective; resume.days_done, resume.day, resume.reader_state

One checkpoint is a folder `<checkpoint.dir>/step-000000123/`:
  DCP shards   "model": sharded tables (ShardedTensors) and the dense tower; "optim": the fused sparse optimizer
               state and the dense AdamW state, by parameter name; "hook": the async allreduce's pending gradients
               (pipeline/distributed/comm_hooks.py) with the delay compensation's and weight prediction's
               state, so a resumed async run applies exactly what the saved one would have. DCP reshards on
               load: a checkpoint taken on N ranks loads on M ranks.
  meta.json    global step, finished days, the day in progress with every rank's reader cursor, LR scheduler,
               every rank's RNG state, world size, sharding plan and the resolved config.
All ranks write into `step-...tmp`; rank 0 writes meta.json last and renames the folder, so a crash leaves the
previous checkpoint or the new one, never half of one. `latest` names the newest; `keep` bounds how many stay.
On several hosts `checkpoint.dir` must be storage every host sees.

Loading follows ../shared/docs/torchrec-on-cpu.md section 4: `optimizer.init_state()` before `dcp.load`, or the
dense optimizer state is silently not restored.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from pipeline.config import RunConfig, to_dict
from pipeline.distributed.comm_hooks import StaleAllReduce
from pipeline.distributed.env import DistEnv

if TYPE_CHECKING:
    from pipeline.data.reader import DayReader
    from pipeline.train.trainer import Trainer

log = logging.getLogger(__name__)

META = "meta.json"
FORMAT_VERSION = 1


@dataclass
class Resume:
    """Where a loaded checkpoint says the run stands."""

    path: Path
    global_step: int
    days_done: list[str] = field(default_factory=list)
    day: str | None = None  # a day stopped part-way (mid-day checkpoint), or None
    reader_state: dict[str, Any] | None = None  # this rank's cursor in `day`


class Checkpointer:
    def __init__(self, cfg: RunConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.root = Path(cfg.checkpoint.dir or Path(cfg.out_dir) / "checkpoints")

    # -- save ----------------------------------------------------------------------------------------------------

    def save(self, trainer: Trainer, *, reader: DayReader | None = None) -> Path:
        """Write a checkpoint of `trainer` (and of `reader`'s position in the day in progress) on every rank."""
        env, start = self.env, time.perf_counter()
        final = self.root / f"step-{trainer.global_step:09d}"
        tmp = final.with_name(final.name + ".tmp")
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        dcp.save(trainer.checkpoint_state(), checkpoint_id=str(tmp))
        mine = {"reader": reader.state_dict() if reader is not None else None,
                "rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
        ranks = _gather(mine, env)
        if env.is_main:
            meta = {
                "format": FORMAT_VERSION,
                "global_step": trainer.global_step,
                "days_done": list(trainer.days_done),
                "day": reader.day.day.isoformat() if reader is not None else None,
                "world_size": env.world_size,
                "allreduce": self.cfg.train.allreduce,
                "scheduler": trainer.scheduler.state_dict(),
                "lr_window": trainer.lr_window,
                "ranks": ranks,
                "plan": trainer.sharded.plan_dict,
                "config": to_dict(self.cfg),
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            _write_atomic(tmp / META, json.dumps(meta, indent=1, default=str) + "\n")
            _replace_dir(tmp, final)
            _write_atomic(self.root / "latest", final.name + "\n")
            self._prune()
            log.info("checkpoint %s (step %d%s) in %.2f s", final, trainer.global_step,
                     f", mid-day {meta['day']}" if meta["day"] else "", time.perf_counter() - start)
        _barrier()
        return final

    def _prune(self) -> None:
        complete = self.complete()
        for old in complete[:-self.cfg.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)

    # -- find ----------------------------------------------------------------------------------------------------

    def complete(self) -> list[Path]:
        """Complete checkpoints (with meta.json), oldest first by when they were written: a fresh run in a folder
        that holds an older run's higher steps still finds (and keeps) its own newest."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step-*") if re.fullmatch(r"step-\d+", p.name) and (p / META).is_file()]
        return sorted(found, key=lambda p: ((p / META).stat().st_mtime_ns, p.name))

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if pointer.is_file():
            named = self.root / pointer.read_text().strip()
            if (named / META).is_file():
                return named
        complete = self.complete()  # the pointer is missing or stale (a crash between rename and pointer)
        return complete[-1] if complete else None

    # -- load ----------------------------------------------------------------------------------------------------

    def load(self, trainer: Trainer, path: str | Path) -> Resume:
        """Restore `trainer` from the checkpoint at `path` (collective) and say where to continue."""
        path = Path(path)
        meta_path = path / META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint: no {META} (an interrupted save leaves "
                                    f"a .tmp folder; pick another with `latest`)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: checkpoint format {meta.get('format')}, this code reads {FORMAT_VERSION}")
        _check_same_model(meta["config"], json.loads(json.dumps(to_dict(self.cfg), default=str)), meta_path)
        same_world = meta["world_size"] == self.env.world_size
        if meta["day"] is not None and not same_world:
            raise ValueError(f"{path} was taken in the middle of day {meta['day']} on {meta['world_size']} ranks; "
                             f"its reader cursors cannot continue on {self.env.world_size} ranks (the day's row groups "
                             "are split by world size). Resume from a day-end checkpoint, or on the same world size.")
        start = time.perf_counter()
        trainer.optimizer.init_state()  # without it the dense optimizer state is silently not restored
        state = trainer.checkpoint_state()
        if meta["allreduce"] == "sync":
            state.pop("hook", None)  # a sync run has nothing pending
        elif "hook" not in state:  # saved async, resumed sync: the pending gradient is applied now, once
            state["hook"] = StaleAllReduce.pending_template(trainer.dense_named_parameters())
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        fresh = _set_aside_unsaved_optimizer_state(state, saved)
        unsaved_hook = [k for k in state.get("hook", {}) if not _has_prefix(saved, f"hook.{k}")]
        for key in unsaved_hook:  # compensation / prediction turned on after this checkpoint: start fresh
            state["hook"].pop(key)
        dcp.load(state, checkpoint_id=str(path))
        for param, entries in fresh.items():  # back in, as initialised: the optimizer wants every entry
            state["optim"]["state"][param].update(entries)
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optim"])
        trainer.scheduler.load_state_dict(meta["scheduler"])
        window = meta.get("lr_window")
        trainer.lr_window = tuple(window) if window else None
        trainer.apply_lr_schedule()  # before the pending gradient: a sync trainer applies it right away
        if "hook" in state:
            trainer.load_pending_gradients(state["hook"])
        trainer.global_step = int(meta["global_step"])
        trainer.days_done = list(meta["days_done"])
        mine = meta["ranks"][self.env.rank] if same_world else None
        if mine is not None:
            torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(mine["rng"])), dtype=torch.uint8))
        if self.env.is_main and fresh:
            names = [f"{p}.{n}" for p, entries in fresh.items() for n in entries]
            log.warning("%d optimizer state entries are not in %s and start fresh: the sharding plan on %d ranks "
                        "optimizes those tables differently from the one on %d (e.g. data-parallel + dense "
                        "optimizer vs fused): %s", len(names), path, self.env.world_size, meta["world_size"],
                        ", ".join(names[:6]))
        if self.env.is_main and unsaved_hook:
            log.warning("%s has no delay-compensation / weight-prediction state (%s): the pending gradient counts "
                        "as computed at the loaded weights, the mean squares start fresh and the first step is not "
                        "predicted", path, ", ".join(unsaved_hook))
        if self.env.is_main:
            log.info("resumed from %s: step %d, days done %s%s (%.2f s)", path, trainer.global_step,
                     trainer.days_done or "none", f", day {meta['day']} part-way" if meta["day"] else "",
                     time.perf_counter() - start)
        return Resume(path=path, global_step=trainer.global_step, days_done=trainer.days_done, day=meta["day"],
                      reader_state=mine["reader"] if mine is not None else None)


def _set_aside_unsaved_optimizer_state(state: dict, saved: dict) -> dict[str, dict[str, Any]]:
    """Take out the optimizer-state entries the checkpoint (`saved`: its DCP metadata) does not have and return
    them, by parameter.

    That happens when another plan puts a table under another optimizer (a small table is data-parallel and
    AdamW-updated on N ranks, fused on 1 rank). Anything else missing stays in, so DCP fails loudly on it.
    """
    aside: dict[str, dict[str, Any]] = {}
    for param, entries in state["optim"].get("state", {}).items():
        for name in list(entries):
            if not _has_prefix(saved, f"optim.state.{param}.{name}"):
                aside.setdefault(param, {})[name] = entries.pop(name)
    return aside


def _has_prefix(saved: dict, prefix: str) -> bool:
    """DCP flattens nested dicts with dots: an entry is saved if its key or a key under it is."""
    return any(k == prefix or k.startswith(prefix + ".") for k in saved)


def _check_same_model(saved: dict, current: dict, where: Path) -> None:
    """The checkpoint must hold the same tables and tower: say what differs instead of a DCP shape error."""
    parts = {"model": lambda c: c.get("model"),
             "features.tables": lambda c: {t["name"]: t for t in c.get("features", {}).get("tables", [])}}
    for key, get in parts.items():
        a, b = get(saved) or {}, get(current) or {}
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            raise ValueError(f"{where}: the checkpoint was trained with a different {key} ({', '.join(diff)} "
                             f"differ); resume with the config it was saved with (its meta.json holds it)")


def _gather(obj: Any, env: DistEnv) -> list[Any]:
    if env.world_size == 1 or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename src to dst; an existing dst (the same step saved again) is moved aside first, then deleted."""
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
    src.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
