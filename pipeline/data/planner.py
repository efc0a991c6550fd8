"""The plan of one rank's day: which rows form which batch, read, validated and converted on background threads.

    producer = Producer(reader, cursor)      # starts planning at `cursor` (pipeline/data/reader.py's DayReader)
    batch, planned = producer.get()          # in plan order; planned.cursor is where the reader stands after it
    producer.close()

The plan is computed in order on one thread, so it is the same for any number of loader threads (`num_workers`);
only reading, validating and converting are parallel. The queue holds at most `prefetch_batches` planned batches.
See reader.py's docstring for the cursor, the blocks and the filler batches.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from hyrank.pipeline.data.batch import Batch
from hyrank.pipeline.data.split import RowRange
from hyrank.pipeline.data.validate import REASONS, DayValidation, validate_rows, write_quarantine
from hyrank.pipeline.storage import open_input

log = logging.getLogger(__name__)


@dataclass
class Cursor:
    """Where a rank is in its day (see reader.py's docstring); DayReader.state_dict stores it."""

    block: int = 0  # index of the current buffer of block_rows valid rows
    unit: int = 0  # the block's first row: index into this rank's row-group order ...
    row: int = 0  # ... and its raw row number inside that row group
    block_batches: int = 0  # batches of the block already emitted
    batches_emitted: int = 0  # batches of the day already emitted
    rows_real: int = 0  # real (weight 1) rows of the day already emitted
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
    real: bool = True  # False: a batch of filler rows only (this rank's valid rows have run out)
    rows: np.ndarray | None = None  # (num_real, 2) (unit, raw row) of the batch's real rows, in batch order


class Producer:
    """Plans one rank's batches from a cursor on a background thread; loader threads read, validate and convert.

    The plan (which rows form which batch) is computed in order on one thread, so it is the same for any number
    of workers; only the decoding is parallel. The queue holds at most `prefetch_batches` planned batches.
    """

    def __init__(self, reader: Any, start: Cursor):
        """`reader`: the DayReader (reader.py) whose plan this is; not imported here, reader.py imports this."""
        self.r, self.start = reader, start
        self.pool = ThreadPoolExecutor(reader.options.num_workers, thread_name_prefix="hyrank-reader")
        self.out: queue.Queue = queue.Queue(maxsize=reader.options.prefetch_batches)
        self.stopping = threading.Event()
        self.counts = list(start.counts_before)  # validation counts of the units pulled so far
        self.unit_counts: dict[int, list[int]] = {}  # unit -> counts of the units before it
        self.next_unit = start.unit
        self.template: pa.Table | None = None  # a valid row of this rank's, for filler rows
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
        block, skip, emitted, rows_real = c.block, c.block_batches, c.batches_emitted, c.rows_real
        while not r.max_batches or emitted < r.max_batches:
            if not pieces:
                self._pull(units, pieces, first_row=c.row if block == c.block else 0)
            while sum(p[1].num_rows for p in pieces) < r.block_rows and self._pull(units, pieces):
                pass
            start = (pieces[0][0], int(pieces[0][2][0])) if pieces else (self.next_unit, 0)
            table, num_rows, units_id_max, sources = self._cut(pieces, r.block_rows)
            if num_rows == 0:
                break
            if self.template is None:  # one valid row, to fill batches once this rank's rows run out
                self.template = table.slice(0, 1)
            if r.options.shuffle:  # made one chunk on a loader thread, before its batches
                table = self.pool.submit(_one_chunk, table)  # (else each take() concatenates the whole block again)
            id_max = _merge_id_max(units_id_max)  # holds for every batch of the block
            num_in_block = -(-num_rows // r.batch_size)  # the last one filled up if the rank's rows end in it
            if skip >= num_in_block:
                raise ValueError(f"day {r.day.label}: a resumed cursor points past its block ({skip} of "
                                 f"{num_in_block} batches): the day's files changed since the checkpoint")
            end = (pieces[0][0], int(pieces[0][2][0])) if pieces else (self.next_unit, 0)
            counts_end = self._counts_before(end[0])
            perm = np.random.default_rng([r.seed, r.day.day.toordinal(), r.rank, block]).permutation(num_rows) \
                if r.options.shuffle else None
            for k in range(skip, num_in_block):
                if r.max_batches and emitted == r.max_batches:
                    return
                emitted += 1
                rows_real += min(r.batch_size, num_rows - k * r.batch_size)
                last = k + 1 == num_in_block
                cursor = Cursor(block + 1, *end, 0, emitted, rows_real, counts_end) if last else \
                    Cursor(block, *start, k + 1, emitted, rows_real, self._counts_before(start[0]))
                picked = slice(k * r.batch_size, (k + 1) * r.batch_size)
                rows = sources[picked] if perm is None else sources[perm[picked]]
                yield _Planned(self.pool.submit(self._convert, table, perm, k, id_max), cursor, list(self.counts),
                               rows=rows)
            block, skip = block + 1, 0
        # this rank's valid rows have run out: filler batches for as long as another rank still has rows
        template = self.pool.submit(self._template)
        while not r.max_batches or emitted < r.max_batches:
            emitted += 1
            cursor = Cursor(block, self.next_unit, 0, 0, emitted, rows_real, list(self.counts))
            yield _Planned(self.pool.submit(self._filler, template), cursor, list(self.counts), real=False)

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
    def _cut(pieces: list, num_rows: int) -> tuple[pa.Table | None, int, list[dict[str, int]], np.ndarray]:
        """Take up to `num_rows` rows off the front of `pieces` as one table; also the id_max of their units and
        where each row comes from ((unit, raw row) pairs, for the ledger)."""
        taken, have, id_maxes, sources = [], 0, [], []
        while pieces and have < num_rows:
            u, table, raw, id_max = pieces[0]
            n = min(table.num_rows, num_rows - have)
            taken.append(table.slice(0, n))
            id_maxes.append(id_max)
            sources.append(np.stack([np.full(n, u, dtype=np.int64), raw[:n]], axis=1))
            if n == table.num_rows:
                pieces.pop(0)
            else:
                pieces[0] = (u, table.slice(n), raw[n:], id_max)
            have += n
        if not taken:
            return None, 0, id_maxes, np.zeros((0, 2), np.int64)
        return (taken[0] if len(taken) == 1 else pa.concat_tables(taken)), have, id_maxes, np.concatenate(sources)

    def _check_budget(self) -> None:
        """This rank alone has more bad rows than the budget allows for the whole day: stop now."""
        r = self.r
        v = DayValidation.from_vector(r.day.label, self.counts, str(r.quarantine or ""))
        if v.num_bad > r.options.error_budget * r.day_rows:
            v.rows = r.day_rows
            raise v.budget_error(r.options.error_budget)

    # -- work done on loader threads -----------------------------------------------------------------------------

    def _read_unit(self, ref: RowRange) -> _Unit:
        """Rows [ref.start, ref.stop) of a row group, validated; raw row numbers are the row group's own."""
        r = self.r
        try:
            table = pq.ParquetFile(open_input(ref.file)).read_row_group(ref.index, columns=r.columns,
                                                                    use_threads=True)
        except (pa.ArrowException, OSError) as e:
            if r.options.on_corrupt_file == "fail":
                raise ValueError(f"{ref.file}: row group {ref.index} is unreadable: {e} "
                                 "(data.on_corrupt_file = 'skip' skips it)") from e
            log.warning("skipping %s row group %d rows %d..%d: unreadable: %s", ref.file, ref.index, ref.start,
                        ref.stop, e)
            return _Unit(pa.table({}), np.zeros(0, np.int64), ref.num_rows, {"corrupt_row_group": ref.num_rows})
        if not ref.whole:
            table = table.slice(ref.start, ref.num_rows)
        verdict = validate_rows(table, r.spec, max_list_len=r.options.max_list_len)
        if not verdict.num_bad:
            return _Unit(table, np.arange(ref.start, ref.stop, dtype=np.int64), table.num_rows, {}, verdict.id_max)
        good = verdict.good_B
        if r.quarantine_root is not None:  # one file per row range: a rank rewrites its own, never another's
            bad_rows = np.flatnonzero(~good)
            suffix = "" if ref.whole else f".rows{ref.start}-{ref.stop}"
            write_quarantine(r.quarantine_root / ref.file.parent.name / f"{ref.file.stem}.rg{ref.index}{suffix}.parquet", table.take(bad_rows),
                             _subset(verdict, ~good), source_file=str(ref.file), source_rows=bad_rows + ref.start)
        return _Unit(table.filter(pa.array(good)), np.flatnonzero(good) + ref.start, table.num_rows,
                     verdict.counts(), verdict.id_max)

    def _convert(self, table: pa.Table | Future, perm: np.ndarray | None, k: int, id_max: dict[str, int]) -> Batch:
        """Batch k of a block: a slice of its table, or with `perm` a take() of the block's one-chunk table (a future
        submitted to this pool before any of the block's batches, so it has started before this waits on it).
        A block's last batch may hold fewer rows: it is filled up with weight-0 repeats of its first row."""
        b = self.r.batch_size
        rows = table.slice(k * b, b) if perm is None else table.result().take(perm[k * b:(k + 1) * b])
        return self._batch(rows, id_max, num_real=rows.num_rows)

    def _filler(self, template: Future) -> Batch:
        """A batch with no real row (weights all 0), for a rank whose valid rows have run out."""
        return self._batch(template.result(), {}, num_real=0)

    def _batch(self, rows: pa.Table, id_max: dict[str, int], *, num_real: int) -> Batch:
        b = self.r.batch_size
        if rows.num_rows < b:
            rows = pa.concat_tables([rows.slice(0, num_real), rows.take(np.zeros(b - num_real, dtype=np.int64))])
        batch = self.r.convert(rows, source=f"{self.r.day.path}", id_max=id_max)
        if num_real < b:
            batch.weights = (torch.arange(b) < num_real).float()
        return batch.pin_memory() if self.r.pin else batch

    def _template(self) -> pa.Table:
        """One valid row: this rank's first, else the day's first (a rank whose whole share is bad or empty)."""
        if self.template is not None:
            return self.template
        r = self.r
        for ref in r.refs:
            try:
                table = pq.ParquetFile(open_input(ref.file)).read_row_group(ref.index, columns=r.columns,
                                                                            use_threads=True)
            except (pa.ArrowException, OSError):
                continue  # counted by the rank whose share it is
            good = np.flatnonzero(validate_rows(table, r.spec, max_list_len=r.options.max_list_len).good_B)
            if len(good):
                return table.slice(int(good[0]), 1)
        raise ValueError(f"day {r.day.label} ({r.day.path}) has no valid row in any file: nothing to train on")


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
