"""The Stateful parts of a training run that are not a module or a schedule: what pipeline/train/checkpoint.py saves
besides the model, and how each refuses or adapts a checkpoint that does not fit.

    OptimizerState(combined_optimizer)     tensors: fused sparse + dense optimizer state
    RunIdentity(cfg)                       meta: the resolved config; refuses a checkpoint of another model
    Progress()                             meta: global step, finished days, the day in progress
    ReaderCursor()                         per rank: the reader's cursor in the day in progress
    RNGState()                             per rank: torch's CPU generator
    Ledger(out_dir / "ledger", rank)       per rank: which rows this rank trained, from which version of each file,
                                           segment files beside the run
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hyrank.pipeline.config import RunConfig, to_dict
from hyrank.pipeline.data.fingerprint import FileFingerprint, file_changes
from hyrank.pipeline.files import write_atomic
from hyrank.pipeline.storage import S3Path, is_remote, location

log = logging.getLogger(__name__)


class OptimizerState:
    """A torchrec KeyedOptimizer as a checkpoint part.

    Loading calls `init_state()` before DCP loads: the dense optimizer's state is empty until its first step, and
    DCP would silently restore nothing into it. Entries the checkpoint lacks (another plan puts a table under another
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
    """The resolved config of the run and its run id; a checkpoint of other tables or another tower is refused with
    a readable diff (normally before any collective: see pipeline.train.resume.check_resumable).

    The run id is drawn when a run starts fresh and carried by every resume, so two runs never share one even in
    the same out_dir with the same config (their step numbers do collide: published versions are named
    `<run id>-step-N`). A warm start (a changed model) does not load it: the new model's lineage gets its own."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_id = uuid.uuid4().hex[:8]  # only rank 0's is saved; every rank adopts the saved one on resume

    def state_dict(self) -> dict[str, Any]:
        return {"config": to_dict(self.cfg), "allreduce": self.cfg.train.allreduce, "run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_same_model(state["config"], json.loads(json.dumps(to_dict(self.cfg), default=str)))
        self.run_id = run_id_of(state)


def run_id_of(state: dict[str, Any]) -> str:
    """The run id a RunIdentity saved; for a checkpoint from before run ids, a hash of its resolved config (two
    such runs with the same config and out_dir share it: a published version of theirs is still never rewritten)."""
    if state.get("run_id"):
        return str(state["run_id"])
    return hashlib.sha256(json.dumps(state["config"], sort_keys=True, default=str).encode()).hexdigest()[:8]


def model_diff(saved: dict, current: dict) -> list[str]:
    """What differs between two resolved configs in what the weights depend on: tables added, removed or resized,
    the tower or its options. One readable line each; empty if the weights fit."""
    lines = []
    old = {t["name"]: t for t in saved.get("features", {}).get("tables", [])}
    new = {t["name"]: t for t in current.get("features", {}).get("tables", [])}
    lines += [f"table {name!r} added ({new[name]['num_embeddings']} x {new[name]['dim']})" for name in new
              if name not in old]
    lines += [f"table {name!r} removed" for name in old if name not in new]
    for name in sorted(set(old) & set(new)):
        for key in ("num_embeddings", "dim"):
            if old[name].get(key) != new[name].get(key):
                lines.append(f"table {name!r} resized: {key} {old[name].get(key)} -> {new[name].get(key)}")
        # a managed table's state is its remap (ids and eviction scores by slot): on or off, or scores of another
        # policy, it does not fit; the admission settings (interval, admit_after) can change freely
        evictions = [(t.get("managed") or {}).get("eviction", "lru") if t.get("managed") is not None else "off"
                     for t in (old[name], new[name])]
        if evictions[0] != evictions[1]:
            lines.append(f"table {name!r} managed eviction: {evictions[0]} -> {evictions[1]}")
    m_old, m_new = saved.get("model", {}), current.get("model", {})
    if m_old.get("name") != m_new.get("name"):
        lines.append(f"model.name {m_old.get('name')!r} -> {m_new.get('name')!r}")
    else:
        o_old, o_new = m_old.get("options", {}), m_new.get("options", {})
        lines += [f"model.options.{k}: {o_old.get(k, '(default)')} -> {o_new.get(k, '(default)')}"
                  for k in sorted(set(o_old) | set(o_new)) if o_old.get(k) != o_new.get(k)]
    return lines


def check_same_model(saved: dict, current: dict) -> None:
    """The checkpoint must hold the same tables and tower: say what differs instead of a DCP shape error."""
    diff = model_diff(saved, current)
    if diff:
        raise ValueError("the checkpoint was trained with another model: " + "; ".join(diff) + ". Resume with the "
                         "config it was saved with (its meta.json holds it), or start a new run from its weights "
                         "with --warm-start dense|tables|matching")


@dataclass
class Progress:
    """Where the run stands: training steps taken, days finished, the day in progress (a mid-day checkpoint) and
    its per-step losses so far (so the day's record after a resume holds the whole day), and how each day-end
    checkpoint scored on the next day (progressive validation; checkpoint.keep_best keeps the best)."""

    global_step: int = 0
    days_done: list[str] = field(default_factory=list)  # of the pass in progress
    day: str | None = None  # the day (or span label, "A..B") in progress
    day_losses: list[float] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    pass_index: int = 0  # the pass over the run's days in progress (train.passes)
    valid: list[dict[str, Any]] = field(default_factory=list)  # per finished pass: its checkpoint and metrics

    def state_dict(self) -> dict[str, Any]:
        return {"global_step": self.global_step, "days_done": list(self.days_done), "day": self.day,
                "day_losses": list(self.day_losses), "scores": dict(self.scores), "pass_index": self.pass_index,
                "valid": [dict(v) for v in self.valid]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_step, self.days_done, self.day = int(state["global_step"]), list(state["days_done"]), state["day"]
        self.day_losses, self.scores = list(state["day_losses"]), dict(state.get("scores", {}))
        self.pass_index, self.valid = int(state.get("pass_index", 0)), [dict(v) for v in state.get("valid", [])]


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


class Ledger:
    """Which rows this rank trained, and from which version of each file: lines in segment files under
    `<out_dir>/ledger/rank-R/`, one written with each checkpoint. A row line is (day, file, row group, start, stop,
    step); when a day starts, a file line per file of the day gives its fingerprint (size, footer hash:
    pipeline/data/fingerprint.py), at the top of the segment it lands in.

    A segment is written (atomically) when the checkpoint is saved, and the checkpoint lists this rank's segments,
    so the segments a checkpoint lists are exactly the rows its weights have seen. A segment written for a
    checkpoint that never completed (a crash in between) is an orphan: the next resume deletes it. The pipelined
    loop (train.pipeline = "sparse_dist") reads batches ahead, so there a row's step may be early by the pipeline's
    depth; which rows a day trained is exact either way.

    A day resumed from a mid-day checkpoint must find the files it recorded (`begin_day`): its rows before the
    checkpoint came from them, and a file replaced with another of the same layout would pass the reader's cursor
    check. Every rank records every file of the day (each reads every footer), so every rank raises the same error.
    """

    def __init__(self, root: str | Path | S3Path, rank: int):
        self.dir = location(root) / f"rank-{rank}"
        self.segments: list[str] = []
        self._pending: list[dict[str, Any]] = []
        self._pending_files: list[dict[str, Any]] = []

    def add(self, day: str, step: int, ranges: list[tuple[str, int, int, int]]) -> None:
        self._pending += [{"day": day, "file": file, "row_group": group, "start": start, "stop": stop, "step": step}
                          for file, group, start, stop in ranges]

    def begin_day(self, day: str, step: int, files: dict[str, FileFingerprint], *, resumed: bool) -> None:
        """A day's reader starts at `step` (the first step it trains): a fresh day records its `files`; a day
        resumed mid-way raises a ValueError naming each file that is not the version recorded when it started."""
        recorded = self.files_of(day) if resumed else {}
        changes = file_changes(recorded, files) if recorded else []
        if changes:
            raise ValueError(
                f"day {day}: its files changed since the run started the day, and its checkpoint is part-way through "
                f"it (the rows before it were trained from the files as they were): {'; '.join(changes)}. Put the "
                "files back as they were to continue, or redo the day from a checkpoint taken at the end of the day "
                "before (hyrank train --resume PATH; a stream resumes from its latest checkpoint: move the newer, "
                "mid-day ones out of the checkpoint folder)")
        if not recorded:  # a fresh day (or a resumed one whose start predates fingerprints in the ledger)
            self._pending_files += [{"day": day, "file": file, **fp.to_dict(), "step": step}
                                    for file, fp in files.items()]

    def files_of(self, day: str) -> dict[str, FileFingerprint]:
        """The files the latest start of `day` recorded in this rank's segments, by path ({} if none did)."""
        for name in reversed(self.segments):
            if found := {e["file"]: FileFingerprint.from_dict(e) for e in self._file_lines(name) if e["day"] == day}:
                return found
        return {}

    def recorded_files(self) -> dict[str, FileFingerprint]:
        """Every file recorded in this rank's segments, at its latest record: the versions the run trained."""
        return {e["file"]: FileFingerprint.from_dict(e) for name in self.segments for e in self._file_lines(name)}

    def _file_lines(self, name: str) -> Iterator[dict[str, Any]]:
        """The file lines of a segment: they come first, so the rows after them are not parsed."""
        for line in (self.dir / name).read_text().splitlines():
            entry = json.loads(line)
            if "footer" not in entry:
                return
            yield entry

    def state_dict(self) -> list[str]:
        """Writes the files and rows since the last checkpoint as a segment; returns the segments so far."""
        if entries := self._pending_files + self._pending:
            steps = [e["step"] for e in entries]
            name = f"seg-{min(steps):09d}-{max(steps):09d}.jsonl"
            write_atomic(self.dir / name, "".join(json.dumps(e) + "\n" for e in entries))
            self.segments.append(name)
            self._pending, self._pending_files = [], []
        return list(self.segments)

    def load_state_dict(self, segments: list[str]) -> None:
        self.segments, self._pending, self._pending_files = list(segments), [], []
        if self.dir.is_dir():
            for orphan in set(p.name for p in self.dir.glob("seg-*.jsonl")) - set(self.segments):
                (self.dir / orphan).unlink()


def ledger_dir(out_dir: str | Path, checkpoint_root: Path | S3Path) -> Path | S3Path:
    """Where a run's ledger lies: beside its checkpoints when they are on object storage (a job restarted on
    another node, with a fresh out_dir, finds the segments its checkpoint lists), else `<out_dir>/ledger`."""
    return checkpoint_root / "ledger" if is_remote(checkpoint_root) else Path(out_dir) / "ledger"


def read_ledger(out_dir: str | Path, segments_by_rank: list[list[str]],
                ledger: str | Path | S3Path | None = None) -> list[dict[str, Any]]:
    """The row lines of the segments a checkpoint lists (meta.json: ranks[r]["ledger"]), with their rank (the file
    lines are Ledger.recorded_files')."""
    lines = []
    for rank, segments in enumerate(segments_by_rank):
        for name in segments:
            text = (location(ledger or Path(out_dir) / "ledger") / f"rank-{rank}" / name).read_text()
            lines += [dict(entry, rank=rank) for line in text.splitlines()
                      if "footer" not in (entry := json.loads(line))]
    return lines
