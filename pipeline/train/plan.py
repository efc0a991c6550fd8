"""What a training run is asked to do and what it did: RunPlan in, RunResult out, and the rules of passes.

    plan = RunPlan(train_days=days, eval_days=[as_span(test_days)], valid_days=as_span(valid_days), resume=None)
    result = trainer.run(plan)          # pipeline/train/trainer.py
    result.best                         # the pass chosen on the validation span (train.passes, train.patience)

Passes (bounded data, `hyrank train`): `train.passes` passes over the run's days. With `data.shuffle` and more
than one pass, each pass visits the days (or the units small days are grouped into) in an order seeded by
(seed, pass), and each reader shuffles its rows with a seed of its pass too, so no two passes are alike and a
resumed pass is the same pass. With a validation span, each finished pass is evaluated on it; the best pass by
`checkpoint.best_metric` is kept (its checkpoint protected from rotation) and is the model `eval_days` are scored
with; `train.patience` passes in a row without a better one stop the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hyrank.pipeline.data.days import Days
from hyrank.pipeline.metrics import EvalMetrics
from hyrank.pipeline.train.resume import WarmStart

HIGHER_IS_BETTER = ("auc", "query_auc")


@dataclass
class RunPlan:
    """What one `Trainer.run` does: train these days in order, then evaluate those, after resuming if asked.

    `train_days`: a list, or any iterable (the daily stream passes one that waits for each day to complete). A list
    is trained in units: consecutive days smaller than `train.min_unit_rows` are read together (DaySpan).
    `eval_days`: days or spans (pipeline.data.days.DaySpan), each scored as one set after training.
    `valid_days`: a day or span evaluated after each pass (train.passes) to choose the pass to keep.
    `progressive`: evaluate each training day before training on it (progressive validation: the metric the model
    serving that day would have had); the first day of a fresh run has no model to evaluate, and says so.
    `resume`: None (a fresh run), "latest" (the newest checkpoint under checkpoint.dir; an error if there is none),
    "latest-if-any" (the same, or a fresh run: a torchelastic restart before the first checkpoint) or a path.
    Days a checkpoint has finished are skipped; a day it stopped in continues from its reader cursor.
    `day_end`: called on every rank at each training day's end, after its checkpoint (DayEnd), and once after a
    resume from a day-end checkpoint, whose day-end work a stop may have cut short (the stream's export and report).
    """

    train_days: Iterable[Days]
    eval_days: list[Days] = field(default_factory=list)
    resume: str | Path | None = None
    trust_checkpoint: bool = False  # resume from a folder outside checkpoint.dir (checkpoints hold pickle code)
    progressive: bool = False
    warm_start: WarmStart | None = None  # a checkpoint of another model: carry these weights (train/resume.py)
    valid_days: Days | None = None
    day_end: Sequence[Callable[[DayEnd], None]] = ()


@dataclass(frozen=True)
class DayEnd:
    """What a day's end callback is told: the day just trained and its stats (both None after a resume from a
    day-end checkpoint), and the run's newest checkpoint."""
    day: Days | None
    stats: DayStats | None
    checkpoint: Path | None


@dataclass
class DayStats:
    day: str  # the day, or the span "A..B" of small days trained as one unit
    steps: int
    rows: int  # across all ranks
    seconds: float
    losses: list[float] = field(default_factory=list)  # per step, averaged over ranks
    step_seconds: list[float] = field(default_factory=list)  # this rank's wall time of each step
    bad_rows: dict[str, int] = field(default_factory=dict)  # rows validation dropped (and quarantined), by reason
    rows_per_s: float = 0.0  # of this session (a resumed day: since the resume)
    pass_index: int = 0
    input_wait_s: float = 0.0  # this rank's wall time waiting for batches (pipeline.train.pipelined.InputClock)
    # of input_wait_s, the part inside the reader's per-batch agreement between ranks (DayReader.agree_wait_s):
    # waiting for the slowest rank, not for decode; the rest is the wait for the loader
    agree_wait_s: float = 0.0
    # per managed table, this session's counts over all ranks (pipeline.distributed.managed_state.managed_stats):
    # ids that found no slot and read zeros, admitted, evicted, refused; slots used at the day's end
    managed: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def input_wait_share(self) -> float:
        """The share of the day's wall time this rank waited on input."""
        return self.input_wait_s / self.seconds if self.seconds > 0 else 0.0

    @property
    def loader_wait_share(self) -> float:
        """The share of the day's wall time this rank waited for its own loader (decode, validate, convert)."""
        return max(0.0, self.input_wait_s - self.agree_wait_s) / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_loss(self) -> float:
        return float(np.mean(self.losses)) if self.losses else float("nan")

    def to_dict(self) -> dict:
        return {"day": self.day, "pass": self.pass_index, "steps": self.steps, "rows": self.rows,
                "seconds": round(self.seconds, 3), "rows_per_s": round(self.rows_per_s, 1),
                "mean_loss": self.mean_loss,
                "input_wait_s": round(self.input_wait_s, 3), "input_wait_share": round(self.input_wait_share, 4),
                "agree_wait_s": round(self.agree_wait_s, 3), "loader_wait_share": round(self.loader_wait_share, 4),
                "bad_rows": self.bad_rows, **({"managed": self.managed} if self.managed else {}),
                "losses": self.losses}


@dataclass
class RunResult:
    trained: list[DayStats]
    metrics: dict[str, EvalMetrics]  # by evaluation day / span label
    resumed_from: Path | None
    checkpoint: Path | None  # the newest checkpoint after the run
    stopped: str | None = None  # the signal that stopped the run early (SIGTERM, SIGINT), else None
    progressive: dict[str, EvalMetrics | None] = field(default_factory=dict)  # by day; None: no model yet
    valid: list[dict[str, Any]] = field(default_factory=list)  # per pass evaluated on the validation span
    best: dict[str, Any] | None = None  # the pass kept (with --valid-days): its record, incl. "checkpoint"
    early_stop: str = ""  # why the run stopped before its last pass, if it did


class RunStopped(Exception):
    """SIGTERM / SIGINT stopped the run after a step; `checkpoint` is where it continues from."""

    def __init__(self, signal_name: str, checkpoint: Path | None):
        super().__init__(f"stopped by {signal_name}")
        self.signal, self.checkpoint = signal_name, checkpoint


def pass_order(units: list[Days], pass_index: int, *, seed: int, shuffle: bool) -> list[Days]:
    """The units of one pass: in time order, or with `shuffle` in an order seeded by (seed, pass)."""
    if not shuffle:
        return list(units)
    perm = np.random.default_rng([seed, 7, pass_index]).permutation(len(units))
    return [units[i] for i in perm]


def reader_seed(seed: int, pass_index: int) -> int:
    """The readers' shuffle seed in a pass: the run's own in the first pass (a one-pass run is unchanged)."""
    return seed + 1_000_003 * pass_index


def is_better(value: float, than: float, metric: str) -> bool:
    return value > than if metric in HIGHER_IS_BETTER else value < than


def best_record(records: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The first record with the best `metric` (a later tie is not better)."""
    best = None
    for r in records:
        if r.get(metric) is not None and (best is None or is_better(r[metric], best[metric], metric)):
            best = r
    return best


def passes_since_best(records: list[dict[str, Any]], metric: str) -> int:
    """How many passes after the best one have not beaten it."""
    best = best_record(records, metric)
    return 0 if best is None else len(records) - 1 - records.index(best)
