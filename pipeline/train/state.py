"""The Stateful parts of a training run that are not a module or a schedule: what pipeline/train/checkpoint.py saves
besides the model, and how each refuses or adapts a checkpoint that does not fit.

    OptimizerState(combined_optimizer)     tensors: fused sparse + dense optimizer state
    RunIdentity(cfg)                       meta: the resolved config; refuses a checkpoint of another model
    Progress()                             meta: global step, finished days, the day in progress
    ReaderCursor()                         per rank: the reader's cursor in the day in progress
    RNGState()                             per rank: torch's CPU generator
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.config import RunConfig, to_dict

log = logging.getLogger(__name__)


class OptimizerState:
    """A torchrec KeyedOptimizer as a checkpoint part.

    Loading follows ../shared/docs/torchrec-on-cpu.md section 4: `init_state()` before DCP loads, or the dense
    optimizer state is silently not restored. Entries the checkpoint lacks (another plan puts a table under another
    optimizer: data-parallel + AdamW on N ranks, fused on 1) keep their initial values, with a warning; anything
    else missing makes DCP fail loudly. Loading keeps the LRs the schedule set (they are not in the state).
    """

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer
        self._fresh: dict[str, dict[str, Any]] = {}

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_template(self, saved: set[str]) -> dict[str, Any]:
        self.optimizer.init_state()
        state = self.optimizer.state_dict()
        self._fresh = {}
        for param, entries in state.get("state", {}).items():
            for name in list(entries):
                key = f"state.{param}.{name}"
                if not any(s == key or s.startswith(key + ".") for s in saved):
                    self._fresh.setdefault(param, {})[name] = entries.pop(name)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for param, entries in self._fresh.items():  # back in, as initialised: the optimizer wants every entry
            state["state"][param].update(entries)
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state)
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        if self._fresh:
            names = [f"{p}.{n}" for p, entries in self._fresh.items() for n in entries]
            log.warning("%d optimizer state entries are not in the checkpoint and start fresh: the sharding plan "
                        "optimizes those tables differently (e.g. data-parallel + dense optimizer vs fused): %s",
                        len(names), ", ".join(names[:6]))
        self._fresh = {}


class RunIdentity:
    """The resolved config of the run; a checkpoint of other tables or another tower is refused, naming what
    differs, before DCP meets mismatched shapes."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def state_dict(self) -> dict[str, Any]:
        return {"config": to_dict(self.cfg), "allreduce": self.cfg.train.allreduce}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_same_model(state["config"], json.loads(json.dumps(to_dict(self.cfg), default=str)))


def check_same_model(saved: dict, current: dict) -> None:
    """The checkpoint must hold the same tables and tower: say what differs instead of a DCP shape error."""
    parts = {"model": lambda c: c.get("model"),
             "features.tables": lambda c: {t["name"]: t for t in c.get("features", {}).get("tables", [])}}
    for key, get in parts.items():
        a, b = get(saved) or {}, get(current) or {}
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            raise ValueError(f"the checkpoint was trained with a different {key} ({', '.join(diff)} differ); "
                             "resume with the config it was saved with (its meta.json holds it)")


@dataclass
class Progress:
    """Where the run stands: training steps taken, days finished, the day in progress (a mid-day checkpoint) and
    its per-step losses so far (so the day's record after a resume holds the whole day)."""

    global_step: int = 0
    days_done: list[str] = field(default_factory=list)
    day: str | None = None
    day_losses: list[float] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"global_step": self.global_step, "days_done": list(self.days_done), "day": self.day,
                "day_losses": list(self.day_losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_step, self.days_done, self.day = int(state["global_step"]), list(state["days_done"]), state["day"]
        self.day_losses = list(state["day_losses"])


class ReaderCursor:
    """This rank's cursor in the day in progress (pipeline/data/reader.py); None between days. A cursor splits a
    day by world size, so it continues only on the same number of ranks."""

    same_world_only = True

    def __init__(self):
        self.reader: Any = None  # the DayReader being trained on, while a day is in progress
        self.loaded: dict[str, Any] | None = None  # a checkpoint's cursor, for the trainer to continue from

    def state_dict(self) -> dict[str, Any] | None:
        return self.reader.state_dict() if self.reader is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.loaded = state


class RNGState:
    """torch's CPU generator of this rank (dropout, shuffles seeded from it)."""

    def state_dict(self) -> str:
        return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()

    def load_state_dict(self, state: str) -> None:
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state)), dtype=torch.uint8))
