"""One day of Parquet logs read as Batches on one rank: split across ranks, validated, converted, resumable.

    reader = DayReader(day, spec, batch_size=512, rank=0, world_size=2, seed=cfg.seed, options=cfg.data,
                       sequence_feed=model.sequence_feed, quarantine_dir=out_dir / "quarantine")
    for batch in reader: ...                      # pipeline.data.batch.Batch, decoded ahead by loader threads
    state = reader.state_dict()                   # resume: a new reader of the same day, load_state_dict(state)

Days (`day` above) come from pipeline/data/days.py; `options` is a ReaderOptions (pipeline/data/options.py), which
the run config's DataConfig is; `sequence_feed` is the model's (embeddings.dedup.SequenceFeed: the plain lookup's
when None), so batches carry sequences the way the model's lookup reads them.

Split (pipeline/data/split.py): the day's row groups are dealt to ranks by row count from the footers alone, and
every rank yields the same number N of batches (capped by max_batches), keeping `error_budget` of its rows in
reserve for rows that validation drops. With `shuffle`, each rank visits its row groups in an order seeded by
(seed, day, rank) and permutes rows within buffers of `shuffle_buffer_rows` (seeded by the buffer's index too).
Loader threads (`num_workers`) decode, validate and convert row groups in parallel; results are consumed in
plan order, so the batches do not depend on the number of workers.

Rows beyond N batches are not trained this epoch (`rows_dropped`). If a rank's share holds more bad rows than
its reserve it cannot fill N batches; that, a bad-row count over the day's budget, or a corrupt file, is a
failure, and failures are agreed on: before each batch the ranks all_reduce one status flag (a gloo group; no
collective in a world of one or without a process group), so every rank raises together instead of one hanging.
After the last batch the ranks sum their per-reason counts with one all_reduce and all raise if the day's bad
fraction exceeds the budget.

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
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from embeddings.dedup import SequenceFeed
from pipeline.data.batch import Batch
from pipeline.data.convert import BatchConverter
from pipeline.data.days import DayPartition
from pipeline.data.features import FeatureSpec
from pipeline.data.options import ReaderOptions
from pipeline.data.split import RowGroupRef, batches_per_rank, read_footers, split_row_groups
from pipeline.data.validate import REASONS, DayValidation, validate_rows, write_quarantine

log = logging.getLogger(__name__)


@dataclass
class Cursor:
    """Where a rank is in its day (see the module docstring); `as_dict()` is what `state_dict` stores."""

    block: int = 0  # index of the current buffer of block_rows valid rows
    unit: int = 0  # the block's first row: index into this rank's row-group order ...
    row: int = 0  # ... and its raw row number inside that row group
    block_batches: int = 0  # batches of the block already emitted
    batches_emitted: int = 0  # batches of the day already emitted
    counts_before: list[int] = field(default_factory=lambda: [0] * (1 + len(REASONS)))  # units < `unit`


@dataclass
class _Unit:
    """One validated row group: its good rows, their raw row numbers, and its counts."""

    table: pa.Table
    raw_rows: np.ndarray  # (num_good,) int64 row numbers inside the row group
    num_rows: int
    bad: dict[str, int]
    id_max: dict[str, int] = field(default_factory=dict)  # RowVerdict.id_max: the converter skips a range pass


@dataclass
class _Planned:
    """A batch on its way: the conversion future, and the cursor once the trainer has taken it."""

    batch: Future
    cursor: Cursor
    counts_seen: list[int]  # validation counts of every unit the plan has read so far


class DayReader:
    """Batches of one day for one rank; every rank gets the same number of batches. A Stateful (DCP)."""

    def __init__(self, day: DayPartition, spec: FeatureSpec, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, max_batches: int = 0, seed: int = 0, options: ReaderOptions | None = None,
                 quarantine_dir: str | Path | None = None, sequence_feed: SequenceFeed | None = None):
        """`options`: cfg.data (a DataConfig is a ReaderOptions); `sequence_feed`: the model's
        (RankingModel.sequence_feed), None for the plain lookup's."""
        self.day, self.spec, self.batch_size = day, spec, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.options = opts = options or ReaderOptions()
        footers = read_footers(day, spec, on_corrupt_file=opts.on_corrupt_file)
        self.corrupt_files = footers.corrupt_files
        shares = split_row_groups(footers.refs, world_size)
        self.mine = self._order(shares[rank])
        rows = [sum(r.num_rows for r in share) for share in shares]
        self.rows_per_rank, self.day_rows = rows, sum(rows)
        self.num_batches = max(0, batches_per_rank(rows, batch_size, opts.error_budget))
        if max_batches:
            self.num_batches = min(self.num_batches, max_batches)
        self.rows_dropped = sum(rows) - self.num_batches * batch_size * world_size
        self.block_rows = batch_size * math.ceil(opts.shuffle_buffer_rows / batch_size) if opts.shuffle else batch_size
        self.quarantine = Path(quarantine_dir) / day.path.name if quarantine_dir else None
        self.convert = BatchConverter(spec, sequence_feed=sequence_feed)
        self.columns = spec.columns()
        self.pin = torch.cuda.is_available() if opts.pin_memory is None else opts.pin_memory
        self.validation = DayValidation(str(day.day), quarantine=str(self.quarantine or ""))
        self._group = _status_group(world_size)
        self._cursor = Cursor()

    def _order(self, share: list[RowGroupRef]) -> list[RowGroupRef]:
        if not self.options.shuffle:
            return share
        rng = np.random.default_rng([self.seed, self.day.day.toordinal(), self.rank])
        return [share[i] for i in rng.permutation(len(share))]

    def __len__(self) -> int:
        return self.num_batches

    @property
    def num_remaining(self) -> int:
        return self.num_batches - self._cursor.batches_emitted

    def __iter__(self) -> Iterator[Batch]:
        """The remaining batches from the cursor on; a second pass over a finished reader yields nothing."""
        if self.num_remaining <= 0:
            return
        producer = _Producer(self, self._cursor)
        seen = self._cursor.counts_before
        try:
            for _ in range(self.num_remaining):
                item = producer.get()
                self._agree(item if isinstance(item, BaseException) else None)
                batch, planned = item
                self._cursor, seen = planned.cursor, planned.counts_seen
                yield batch
        finally:
            producer.close()
        self._finish_day(seen)

    # -- Stateful ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain Python: the cursor plus what must match on restore."""
        c = self._cursor
        ref = self.mine[c.unit] if c.unit < len(self.mine) else None
        return {"version": 1, **self._identity(), "block": c.block, "unit": c.unit, "row": c.row,
                "block_batches": c.block_batches, "batches_emitted": c.batches_emitted,
                "counts_before": list(c.counts_before), "file": str(ref.file) if ref else "",
                "row_group": ref.index if ref else -1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off; a ValueError names what differs if it is another day or layout."""
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise ValueError(f"reader state for {state.get('day')} does not match this reader: "
                                 f"{key} is {state.get(key)!r} in the state, {value!r} here")
        unit = int(state["unit"])
        ref = self.mine[unit] if unit < len(self.mine) else None
        if ref is not None and (str(ref.file), ref.index) != (state["file"], int(state["row_group"])):
            raise ValueError(f"reader state points at {state['file']} row group {state['row_group']}, but unit "
                             f"{unit} of this rank is {ref.file} row group {ref.index}: the day's files changed")
        self._cursor = Cursor(int(state["block"]), unit, int(state["row"]), int(state["block_batches"]),
                              int(state["batches_emitted"]), [int(v) for v in state["counts_before"]])

    def _identity(self) -> dict[str, Any]:
        return {"day": self.day.day.isoformat(), "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.options.shuffle,
                "block_rows": self.block_rows, "num_batches": self.num_batches, "num_units": len(self.mine)}

    # -- agreement between ranks ---------------------------------------------------------------------------------

    def _agree(self, failure: BaseException | None) -> None:
        """Raise on every rank if any rank failed to produce its next batch (one all_reduce per batch)."""
        if self._group is False:
            if failure is not None:
                raise failure
            return
        flag = torch.tensor([0 if failure is None else 1], dtype=torch.int64)
        dist.all_reduce(flag, group=self._group)
        if not flag.item():
            return
        messages: list[Any] = [None] * self.world_size
        dist.all_gather_object(messages, None if failure is None else str(failure), group=self._group)
        if failure is not None:
            raise failure
        failed = {r: m for r, m in enumerate(messages) if m is not None}
        raise ValueError(f"day {self.day.day}: stopped because rank(s) {sorted(failed)} failed: "
                         + "; ".join(f"rank {r}: {m}" for r, m in failed.items()))

    def _finish_day(self, seen: list[int]) -> None:
        """Sum the ranks' validation counts (one all_reduce) and stop the run if the day is over budget."""
        total = torch.tensor(seen, dtype=torch.int64)
        if self._group is not False:
            dist.all_reduce(total, group=self._group)
        self.validation = DayValidation.from_vector(str(self.day.day), total.tolist(), str(self.quarantine or ""))
        if self.corrupt_files:
            self.validation.bad["corrupt_file"] = len(self.corrupt_files)
        v = self.validation
        if v.num_bad and self.rank == 0:
            log.warning("day %s: dropped %d bad rows of %d: %s (quarantine: %s)", v.day, v.num_bad, v.rows, v.bad,
                        v.quarantine or "none")
        if v.over_budget(self.options.error_budget):
            raise v.budget_error(self.options.error_budget)


_STATUS_GROUPS: dict[int, Any] = {}


def _status_group(world_size: int) -> Any:
    """The group for the reader's status collectives: False when there is none to make (world of one or no
    process group), None for the default group when it is gloo, else a gloo side group made once (CPU flags,
    so no device sync per batch under NCCL)."""
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return False
    if dist.get_world_size() != world_size:
        raise ValueError(f"world_size={world_size} but the process group has {dist.get_world_size()} ranks")
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _STATUS_GROUPS:
        _STATUS_GROUPS[key] = dist.new_group(backend="gloo")
    return _STATUS_GROUPS[key]


class _Producer:
    """Plans one rank's batches from a cursor on a background thread; loader threads read, validate and convert.

    The plan (which rows form which batch) is computed in order on one thread, so it is the same for any number
    of workers; only the decoding is parallel. The queue holds at most `prefetch_batches` planned batches.
    """

    def __init__(self, reader: DayReader, start: Cursor):
        self.r, self.start = reader, start
        self.pool = ThreadPoolExecutor(reader.options.num_workers, thread_name_prefix="hyrank-reader")
        self.out: queue.Queue = queue.Queue(maxsize=reader.options.prefetch_batches)
        self.stopping = threading.Event()
        self.counts = list(start.counts_before)  # validation counts of the units pulled so far
        self.unit_counts: dict[int, list[int]] = {}  # unit -> counts of the units before it
        self.next_unit = start.unit
        self.thread = threading.Thread(target=self._run, name="hyrank-planner", daemon=True)
        self.thread.start()

    def get(self) -> tuple[Batch, _Planned] | BaseException:
        item = self.out.get()
        if isinstance(item, BaseException):
            return item
        try:
            return item.batch.result(), item
        except Exception as e:  # noqa: BLE001 - handed to the agreement step, which raises it
            return e

    def close(self) -> None:
        self.stopping.set()
        while not self.out.empty():
            self.out.get_nowait()
        self.thread.join()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        try:
            for planned in self._plan():
                if not self._put(planned):
                    return
        except Exception as e:  # noqa: BLE001 - the consumer re-raises it on every rank
            self._put(e)

    def _put(self, item: Any) -> bool:
        while not self.stopping.is_set():
            try:
                self.out.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    # -- the plan ------------------------------------------------------------------------------------------------

    def _plan(self) -> Iterator[_Planned]:
        r, c = self.r, self.start
        units = self._units(c.unit)
        pieces: list[tuple[int, pa.Table, np.ndarray, dict]] = []  # (unit, good rows, raw rows, id_max) not used yet
        block, skip, emitted = c.block, c.block_batches, c.batches_emitted
        while emitted < r.num_batches:
            if not pieces:
                self._pull(units, pieces, first_row=c.row if block == c.block else 0)
            while sum(p[1].num_rows for p in pieces) < r.block_rows and self._pull(units, pieces):
                pass
            start = (pieces[0][0], int(pieces[0][2][0])) if pieces else (self.next_unit, 0)
            table, num_rows, units_id_max = self._cut(pieces, r.block_rows)
            if r.options.shuffle and table is not None:  # made one chunk on a loader thread, before its batches
                table = self.pool.submit(_one_chunk, table)  # (else each take() concatenates the whole block again)
            id_max = _merge_id_max(units_id_max)  # holds for every batch of the block
            num_in_block = num_rows // r.batch_size
            if skip >= num_in_block and emitted < r.num_batches:
                raise self._shortfall()
            end = (pieces[0][0], int(pieces[0][2][0])) if pieces else (self.next_unit, 0)
            counts_end = self._counts_before(end[0])
            perm = np.random.default_rng([r.seed, r.day.day.toordinal(), r.rank, block]).permutation(num_rows) \
                if r.options.shuffle else None
            for k in range(skip, num_in_block):
                if emitted == r.num_batches:
                    return
                emitted += 1
                last = k + 1 == num_in_block
                cursor = Cursor(block + 1, *end, 0, emitted, counts_end) if last else \
                    Cursor(block, *start, k + 1, emitted, self._counts_before(start[0]))
                yield _Planned(self.pool.submit(self._convert, table, perm, k, id_max), cursor, list(self.counts))
            block, skip = block + 1, 0

    def _units(self, first: int) -> Iterator[_Unit]:
        """Validated units from `first` on, in order, `num_workers + 1` of them in flight."""
        ahead: list[Future] = []
        refs = self.r.mine
        nxt = first
        while True:
            while nxt < len(refs) and len(ahead) <= self.r.options.num_workers:
                ahead.append(self.pool.submit(self._read_unit, refs[nxt]))
                nxt += 1
            if not ahead:
                return
            yield ahead.pop(0).result()

    def _pull(self, units: Iterator[_Unit], pieces: list, first_row: int = 0) -> bool:
        """Append the next unit's good rows (those at raw row >= first_row) to `pieces`; False at the end."""
        unit = next(units, None)
        if unit is None:
            return False
        u = self.next_unit
        self.next_unit += 1
        self.unit_counts[u] = self.counts.copy()
        self.counts[0] += unit.num_rows
        for reason, n in unit.bad.items():
            self.counts[1 + REASONS.index(reason)] += n
        self._check_budget()
        keep = unit.raw_rows >= first_row
        if keep.any():
            table = unit.table if keep.all() else unit.table.filter(pa.array(keep))
            pieces.append((u, table, unit.raw_rows[keep], unit.id_max))
        return True

    def _counts_before(self, unit: int) -> list[int]:
        return list(self.unit_counts[unit]) if unit in self.unit_counts else list(self.counts)

    @staticmethod
    def _cut(pieces: list, num_rows: int) -> tuple[pa.Table | None, int, list[dict[str, int]]]:
        """Take up to `num_rows` rows off the front of `pieces` as one table; also the id_max of their units."""
        taken, have, id_maxes = [], 0, []
        while pieces and have < num_rows:
            u, table, raw, id_max = pieces[0]
            n = min(table.num_rows, num_rows - have)
            taken.append(table.slice(0, n))
            id_maxes.append(id_max)
            if n == table.num_rows:
                pieces.pop(0)
            else:
                pieces[0] = (u, table.slice(n), raw[n:], id_max)
            have += n
        if not taken:
            return None, 0, id_maxes
        return (taken[0] if len(taken) == 1 else pa.concat_tables(taken)), have, id_maxes

    def _check_budget(self) -> None:
        """This rank alone has more bad rows than the budget allows for the whole day: stop now."""
        r = self.r
        v = DayValidation.from_vector(str(r.day.day), self.counts, str(r.quarantine or ""))
        if v.num_bad > r.options.error_budget * r.day_rows:
            v.rows = r.day_rows
            raise v.budget_error(r.options.error_budget)

    def _shortfall(self) -> ValueError:
        r = self.r
        v = DayValidation.from_vector(str(r.day.day), self.counts, str(r.quarantine or ""))
        return ValueError(
            f"day {r.day.day}: rank {r.rank} ran out of valid rows after {self.start.batches_emitted} + planned "
            f"batches of the {r.num_batches} every rank must yield: its share of {r.rows_per_rank[r.rank]} rows "
            f"holds {v.num_bad} bad rows {v.bad}, more than the {r.options.error_budget:.2%} reserve "
            f"(data.error_budget) kept per rank; quarantine: {v.quarantine or 'none'}")

    # -- work done on loader threads -----------------------------------------------------------------------------

    def _read_unit(self, ref: RowGroupRef) -> _Unit:
        r = self.r
        try:
            table = pq.ParquetFile(ref.file).read_row_group(ref.index, columns=r.columns, use_threads=True)
        except (pa.ArrowException, OSError) as e:
            if r.options.on_corrupt_file == "fail":
                raise ValueError(f"{ref.file}: row group {ref.index} is unreadable: {e} "
                                 "(data.on_corrupt_file = 'skip' skips it)") from e
            log.warning("skipping %s row group %d (%d rows): unreadable: %s", ref.file, ref.index, ref.num_rows, e)
            return _Unit(pa.table({}), np.zeros(0, np.int64), ref.num_rows, {"corrupt_row_group": ref.num_rows})
        verdict = validate_rows(table, r.spec, max_list_len=r.options.max_list_len)
        if not verdict.num_bad:
            return _Unit(table, np.arange(table.num_rows, dtype=np.int64), table.num_rows, {}, verdict.id_max)
        good = verdict.good_B
        if r.quarantine is not None:
            bad_rows = np.flatnonzero(~good)
            write_quarantine(r.quarantine / f"{ref.file.stem}.rg{ref.index}.parquet", table.take(bad_rows),
                             _subset(verdict, ~good), source_file=str(ref.file), source_rows=bad_rows)
        return _Unit(table.filter(pa.array(good)), np.flatnonzero(good), table.num_rows, verdict.counts(),
                     verdict.id_max)

    def _convert(self, table: pa.Table | Future, perm: np.ndarray | None, k: int, id_max: dict[str, int]) -> Batch:
        """Batch k of a block: a slice of its table, or with `perm` a take() of the block's one-chunk table (a future
        submitted to this pool before any of the block's batches, so it has started before this waits on it)."""
        b = self.r.batch_size
        rows = table.slice(k * b, b) if perm is None else table.result().take(perm[k * b:(k + 1) * b])
        batch = self.r.convert(rows, source=f"{self.r.day.path}", id_max=id_max)
        return batch.pin_memory() if self.r.pin else batch


def _merge_id_max(per_unit: list[dict[str, int]]) -> dict[str, int]:
    """Bounds that hold for rows of all these units: a column's largest bound, if every unit has one."""
    if not per_unit:
        return {}
    common = set(per_unit[0]).intersection(*per_unit[1:])
    return {c: max(m[c] for m in per_unit) for c in common}


def _one_chunk(table: pa.Table) -> pa.Table:
    """`table` with one chunk per column: copied once only if it spans several row groups."""
    if all(col.num_chunks <= 1 for col in table.columns):
        return table
    return table.combine_chunks()


def _subset(verdict: Any, mask: np.ndarray) -> Any:
    return type(verdict)(verdict.reason_code_B[mask], verdict.column_B[mask])
