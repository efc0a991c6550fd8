"""One day of Parquet logs read as Batches on one rank: split across ranks, validated, converted, resumable.

    reader = DayReader(day, spec, batch_size=512, rank=0, world_size=2, seed=cfg.seed, options=cfg.data,
                       sequence_feed=model.sequence_feed, quarantine_dir=out_dir / "quarantine", comm=env.comm)
    for batch in reader: ...                      # pipeline.data.batch.Batch, decoded ahead by loader threads
    state = reader.state_dict()                   # resume: a new reader of the same day, load_state_dict(state)

Days (`day` above) come from pipeline/data/days.py; `options` is a ReaderOptions (pipeline/data/options.py), which
the run config's DataConfig is; `sequence_feed` is the model's (embeddings.dedup.SequenceFeed: the plain lookup's
when None), so batches carry sequences the way the model's lookup reads them.

Split (pipeline/data/split.py): the day's rows are cut into equal contiguous shares (row ranges, +-1 row) from the
footers alone. With `shuffle`, each rank visits its ranges in an order seeded by (seed, day, rank) and permutes
rows within buffers of `shuffle_buffer_rows` (seeded by the buffer's index too). Loader threads (`num_workers`)
decode, validate and convert row groups in parallel; results are consumed in plan order, so the batches do not
depend on the number of workers.

Every valid row is yielded exactly once, and every rank yields the same number of batches of `batch_size` rows
(the collectives of a step need every rank): a rank's last batch is filled up, and a rank whose valid rows have
run out while others' have not yields whole batches of, with `Batch.weights` 0 on the filler rows (repeats of a
valid row: structurally sound, and a weight-0 row adds nothing to the loss, the gradient or the metrics). Before
each batch the ranks agree on three flags in one all_reduce (`comm.step_flags`; no collective in a world of one):
whether any rank failed, so every rank raises together instead of one hanging; whether any rank still has a real
row (when none has, the day ends on every rank); and whether any rank was asked to stop (`should_stop`, the
trainer's SIGTERM): then no rank takes the batch, `stopped` is set and the day ends where it stands, the cursor
after the last batch taken. That is the step's only collective of our own. A day with no valid row at all is an
error. Only
`max_batches` (train.max_steps_per_day) stops a day before its rows run out, and the reader says so
(`rows_unread`). After the last batch the ranks sum their per-reason counts with one all_reduce and all raise if
the day's bad fraction exceeds the budget.

Validation (pipeline/data/validate.py) runs on each row group before conversion: bad rows are dropped, counted per
reason and written to `<quarantine_dir>/<partition folder>/<file>.rg<k>.parquet` with their reason and source
row; the converter only sees good rows, and takes the id bounds validation found (RowVerdict.id_max) instead of
making its own pass over every id. A row group is decoded into one chunk per column and a batch is a slice of it,
zero-copy unless it straddles two row groups (with `shuffle`, a block is made one chunk once, then each batch is
a take() of it: a take() from several chunks would concatenate them again for every batch).

Cursor (`state_dict`): the plan is cut into buffers ("blocks") of `block_rows` valid rows. The cursor holds the
block index, the position of its first row (unit = index in this rank's row-group order, raw row within that row
group), the batches already emitted from it and in all, and the validation counts of the units before it. A
restored reader re-reads the block from its start, rebuilds the same permutation and skips the emitted batches:
no row is trained twice and none is skipped. The cursor counts batches the trainer has taken, not prefetched ones.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from hyrank.embeddings.dedup import SequenceFeed
from hyrank.pipeline.data.batch import Batch
from hyrank.pipeline.data.convert import BatchConverter
from hyrank.pipeline.data.days import Days
from hyrank.pipeline.data.features import FeatureSpec
from hyrank.pipeline.data.options import ReaderOptions
from hyrank.pipeline.data.planner import Cursor, Producer
from hyrank.pipeline.data.split import RowRange, read_footers, split_rows
from hyrank.pipeline.data.validate import DayValidation
from hyrank.pipeline.distributed.collectives import Collectives, StepFlags

log = logging.getLogger(__name__)


class DayReader:
    """Batches of one day for one rank: every valid row once, the same number of batches on every rank. A
    Stateful (its state_dict is plain data)."""

    def __init__(self, day: Days, spec: FeatureSpec, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, max_batches: int = 0, seed: int = 0, options: ReaderOptions | None = None,
                 quarantine_dir: str | Path | None = None, sequence_feed: SequenceFeed | None = None,
                 comm: Collectives | None = None, should_stop: Callable[[], bool] | None = None):
        """`options`: cfg.data (a DataConfig is a ReaderOptions); `sequence_feed`: the model's
        (RankingModel.sequence_feed), None for the plain lookup's; `comm`: the ranks to agree with (default: the
        process group's, if there is one); `should_stop`: whether this rank was asked to stop (a training day)."""
        self.day, self.spec, self.batch_size = day, spec, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.options = opts = options or ReaderOptions()
        footers = read_footers(day, spec, on_corrupt_file=opts.on_corrupt_file,
                               max_corrupt_files=opts.max_corrupt_files)
        self.corrupt_files, self.unknown_rows = footers.corrupt_files, footers.unknown_rows_note()
        self.refs = footers.refs
        self.fingerprints = footers.fingerprints  # which version of each file this day is (the trainer's ledger)
        shares = split_rows(footers.refs, world_size)
        self.mine = self._order(shares[rank])
        rows = [sum(r.num_rows for r in share) for share in shares]
        self.rows_per_rank, self.day_rows = rows, sum(rows)
        # batches of the largest share if all its rows are valid: the most the day can take (bad rows end it early)
        self.max_batches = max_batches
        self.num_batches = max(-(-n // batch_size) for n in rows) if rows else 0
        if max_batches:
            self.num_batches = min(self.num_batches, max_batches)
        self.rows_unread = 0  # valid or not: rows a max_batches cap left unread on any rank (set at the day's end)
        self.block_rows = batch_size * math.ceil(opts.shuffle_buffer_rows / batch_size) if opts.shuffle else batch_size
        # bad rows go to <quarantine_dir>/<partition folder of their file>/ (a span's files are in several)
        self.quarantine_root = Path(quarantine_dir) if quarantine_dir else None
        self.quarantine = None if self.quarantine_root is None else \
            self.quarantine_root / day.path.name if len(day.days) == 1 else self.quarantine_root
        self.convert = BatchConverter(spec, sequence_feed=sequence_feed)
        self.columns = spec.columns()
        self.pin = torch.cuda.is_available() if opts.pin_memory is None else opts.pin_memory
        self.validation = DayValidation(day.label, quarantine=str(self.quarantine or ""))
        self.comm = comm if comm is not None else Collectives.of_world()
        if self.comm.world_size not in (1, world_size):
            raise ValueError(f"world_size={world_size} but the process group has {self.comm.world_size} ranks")
        self.should_stop = should_stop or (lambda: False)
        self.stopped = False  # the ranks agreed to stop before the day's rows ran out (should_stop)
        # wall time inside the per-batch flags' all_reduce: mostly waiting for the slowest rank to ask for its
        # next batch (a lag the step's first collective would wait out otherwise), not decode
        self.agree_wait_s = 0.0
        self._cursor = Cursor()
        self._consumed: list[np.ndarray] = []  # (unit, raw row) of the real rows yielded since pop_consumed()

    def _order(self, share: list[RowRange]) -> list[RowRange]:
        if not self.options.shuffle:
            return share
        rng = np.random.default_rng([self.seed, self.day.day.toordinal(), self.rank])
        return [share[i] for i in rng.permutation(len(share))]

    def __len__(self) -> int:
        return self.num_batches

    def pop_consumed(self) -> list[tuple[str, int, int, int]]:
        """The real rows yielded since the last call, as (file, row group, start, stop) ranges: the ledger's input."""
        if not self._consumed:
            return []
        rows = np.concatenate(self._consumed)
        self._consumed = []
        rows = rows[np.lexsort((rows[:, 1], rows[:, 0]))]
        # a new range wherever the unit changes or the raw rows stop being consecutive
        breaks = np.flatnonzero((np.diff(rows[:, 0]) != 0) | (np.diff(rows[:, 1]) != 1)) + 1
        out = []
        for part in np.split(rows, breaks):
            ref = self.mine[int(part[0, 0])]
            out.append((str(ref.file), ref.index, int(part[0, 1]), int(part[-1, 1]) + 1))
        return out

    @property
    def rows_done(self) -> int:
        """Real rows of the day this rank has yielded, including before a restored cursor."""
        return self._cursor.rows_real

    @property
    def num_remaining(self) -> int:
        return self.num_batches - self._cursor.batches_emitted

    def __iter__(self) -> Iterator[Batch]:
        """The remaining batches from the cursor on; a second pass over a finished reader yields nothing."""
        if self.num_remaining <= 0:
            if self.day_rows == 0:
                raise ValueError(f"day {self.day.label} ({self.day.path}) has no valid row to read: its files hold no "
                                 "rows; a day that trains 0 steps is an error, not done")
            return
        producer = Producer(self, self._cursor)
        seen = self._cursor.counts_before
        first = self._cursor.batches_emitted == 0
        try:
            for _ in range(self.num_remaining):
                item = producer.get()
                failure = item if isinstance(item, BaseException) else None
                flags = self._agree(failure, real=failure is None and item[1].real)
                if flags.stop:
                    self.stopped = True
                    return  # mid-day: the cursor stays after the last batch taken, nothing is summed yet
                if not flags.real:
                    if first:
                        raise ValueError(f"day {self.day.label} ({self.day.path}) has no valid row to read: "
                                         f"{self.day_rows} rows in its files, all bad or skipped; a day that "
                                         "trains 0 steps is an error, not done")
                    break
                first = False
                batch, planned = item
                self._cursor, seen = planned.cursor, planned.counts_seen
                if planned.rows is not None:
                    self._consumed.append(planned.rows)
                yield batch
            else:  # the max_batches cap, or exactly the most batches the day can take
                bad_seen = sum(seen[1:])
                self.rows_unread = max(0, self.rows_per_rank[self.rank] - self._cursor.rows_real - bad_seen)
        finally:
            producer.close()
        self._finish_day(seen)

    # -- Stateful ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain Python: the cursor plus what must match on restore."""
        c = self._cursor
        ref = self.mine[c.unit] if c.unit < len(self.mine) else None
        return {"version": 2, **self._identity(), "block": c.block, "unit": c.unit, "row": c.row,
                "block_batches": c.block_batches, "batches_emitted": c.batches_emitted, "rows_real": c.rows_real,
                "counts_before": list(c.counts_before), "file": str(ref.file) if ref else "",
                "row_group": ref.index if ref else -1, "rows": [ref.start, ref.stop] if ref else []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off; a ValueError names what differs if it is another day or layout."""
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise ValueError(f"reader state for {state.get('day')} does not match this reader: "
                                 f"{key} is {state.get(key)!r} in the state, {value!r} here")
        if state.get("version") != 2:
            raise ValueError(f"reader state version {state.get('version')}: this reader splits days by row ranges "
                             "(version 2); resume from a day-end checkpoint")
        unit = int(state["unit"])
        ref = self.mine[unit] if unit < len(self.mine) else None
        here = (str(ref.file), ref.index, [ref.start, ref.stop]) if ref else None
        if ref is not None and here != (state["file"], int(state["row_group"]), list(state["rows"])):
            raise ValueError(f"reader state points at {state['file']} row group {state['row_group']} rows "
                             f"{state['rows']}, but unit {unit} of this rank is {here}: the day's files changed")
        self._cursor = Cursor(int(state["block"]), unit, int(state["row"]), int(state["block_batches"]),
                              int(state["batches_emitted"]), int(state["rows_real"]),
                              [int(v) for v in state["counts_before"]])

    def _identity(self) -> dict[str, Any]:
        return {"day": self.day.label, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.options.shuffle,
                "block_rows": self.block_rows, "num_batches": self.num_batches, "num_units": len(self.mine)}

    # -- agreement between ranks ---------------------------------------------------------------------------------

    def _agree(self, failure: BaseException | None, real: bool) -> StepFlags:
        """Raise on every rank if any rank failed to produce its next batch; else the agreed flags: whether any
        rank's next batch has a real row, whether any rank was asked to stop (one all_reduce per batch)."""
        start = time.perf_counter()
        flags = self.comm.step_flags(failed=failure is not None, real=real, stop=self.should_stop())
        if self.comm.distributed:  # one rank waits for nobody
            self.agree_wait_s += time.perf_counter() - start
        if not flags.failed:
            return flags
        messages = self.comm.gather_objects(None if failure is None else str(failure))
        if failure is not None:
            raise failure
        failed = {r: m for r, m in enumerate(messages) if m is not None}
        raise ValueError(f"day {self.day.label}: stopped because rank(s) {sorted(failed)} failed: "
                         + "; ".join(f"rank {r}: {m}" for r, m in failed.items()))

    def _finish_day(self, seen: list[int]) -> None:
        """Sum the ranks' validation counts (one all_reduce) and stop the run if the day is over budget."""
        *counts, self.rows_unread = self.comm.sum_ints([*seen, self.rows_unread])
        self.validation = DayValidation.from_vector(self.day.label, counts, str(self.quarantine or ""))
        if self.rows_unread and self.rank == 0:
            log.warning("day %s: %d rows left unread: the day was cut at %d batches (train.max_steps_per_day / "
                        "eval_max_batches)", self.day.label, self.rows_unread, self.max_batches)
        v = self.validation
        if v.num_bad and self.rank == 0:
            log.warning("day %s: dropped %d bad rows of %d: %s (quarantine: %s)", v.day, v.num_bad, v.rows, v.bad,
                        v.quarantine or "none")
        if self.unknown_rows and self.rank == 0:  # allowed by data.max_corrupt_files, still worth a line
            log.warning("day %s: %s", v.day, self.unknown_rows)
        if v.over_budget(self.options.error_budget):
            raise v.budget_error(self.options.error_budget)

