"""Day-partitioned Parquet logs: find the days, split a day across ranks, read it as Batches.

    days = discover_days(root, DayRange.parse("2026-11-01..2026-11-03"))
    reader = DayReader(days[0], spec, batch_size=512, rank=0, world_size=2)
    for batch in reader: ...

Layout: `<root>/<partition_key>=YYYY-MM-DD/*.parquet`; a day is complete when `_SUCCESS` exists in its folder.

Splitting policy: a day's row groups (in file, then row-group order) are dealt to ranks greedily by row count,
largest first, each to the rank with the fewest rows so far (ties to the lower rank): deterministic from the
Parquet footers alone, so every rank computes the same split with no communication. Every rank then yields
exactly `min over ranks of (rows // batch_size)` batches, so no rank waits in a collective for another that has
run out; the tail rows beyond that count are not trained on this epoch and the reader reports how many.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.batch import Batch
from pipeline.convert import BatchConverter
from pipeline.features import FeatureSpec
from pipeline.validate import check_schema

SUCCESS = "_SUCCESS"


@dataclass(frozen=True)
class DayRange:
    """Inclusive range of days, parsed from `2026-11-01..2026-11-07` or a single `2026-11-01`."""

    first: dt.date
    last: dt.date

    @classmethod
    def parse(cls, text: str) -> "DayRange":
        parts = text.split("..")
        try:
            if len(parts) == 1:
                day = dt.date.fromisoformat(parts[0].strip())
                return cls(day, day)
            if len(parts) == 2:
                first, last = (dt.date.fromisoformat(p.strip()) for p in parts)
                if last < first:
                    raise ValueError("the last day is before the first")
                return cls(first, last)
        except ValueError as e:
            raise ValueError(f"bad day range {text!r}: {e} (expected YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD)") from e
        raise ValueError(f"bad day range {text!r} (expected YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD)")

    def __contains__(self, day: dt.date) -> bool:
        return self.first <= day <= self.last


@dataclass(frozen=True)
class DayPartition:
    day: dt.date
    path: Path
    complete: bool

    @property
    def files(self) -> list[Path]:
        return sorted(self.path.glob("*.parquet"))


def discover_days(root: str | Path, days: DayRange | None = None, *, partition_key: str = "day",
                  require_success: bool = True) -> list[DayPartition]:
    """Day folders under `root` in the range, oldest first; incomplete ones only if `require_success` is off."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root not found: {root}")
    pattern = re.compile(rf"^{re.escape(partition_key)}=(\d{{4}}-\d{{2}}-\d{{2}})$")
    found = []
    for path in sorted(root.iterdir()):
        m = pattern.match(path.name)
        if not (m and path.is_dir()):
            continue
        day = dt.date.fromisoformat(m.group(1))
        if days is not None and day not in days:
            continue
        complete = (path / SUCCESS).exists()
        if complete or not require_success:
            found.append(DayPartition(day, path, complete))
    return found


def find_day(root: str | Path, day: dt.date, *, partition_key: str = "day",
             require_success: bool = True) -> DayPartition:
    """The partition of one day, or a FileNotFoundError saying why it cannot be used."""
    path = Path(root) / f"{partition_key}={day.isoformat()}"
    if not path.is_dir():
        raise FileNotFoundError(f"no partition for {day} under {root} (expected {path})")
    complete = (path / SUCCESS).exists()
    if require_success and not complete:
        raise FileNotFoundError(f"{path} has no {SUCCESS} marker: the day is not complete")
    return DayPartition(day, path, complete)


@dataclass(frozen=True)
class RowGroupRef:
    file: Path
    index: int
    num_rows: int


def row_groups(day: DayPartition) -> list[RowGroupRef]:
    """Every row group of the day, in file then row-group order."""
    refs = []
    files = day.files
    if not files:
        raise FileNotFoundError(f"{day.path} holds no .parquet files")
    for file in files:
        try:
            meta = pq.ParquetFile(file).metadata
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{file}: cannot read the Parquet footer: {e}") from e
        refs += [RowGroupRef(file, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    return refs


def split_row_groups(refs: list[RowGroupRef], world_size: int) -> list[list[RowGroupRef]]:
    """Deal row groups to ranks, balanced by rows (see the module docstring); each rank's list in file order."""
    order = sorted(range(len(refs)), key=lambda i: (-refs[i].num_rows, i))
    loads = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owned[rank].append(i)
        loads[rank] += refs[i].num_rows
    return [[refs[i] for i in sorted(idx)] for idx in owned]


class DayReader:
    """Batches of one day for one rank; every rank gets the same number of batches."""

    def __init__(self, day: DayPartition, spec: FeatureSpec, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, max_batches: int = 0):
        self.day, self.spec, self.batch_size = day, spec, batch_size
        shares = split_row_groups(row_groups(day), world_size)
        self.mine = shares[rank]
        rows = [sum(r.num_rows for r in share) for share in shares]
        self.num_batches = min(r // batch_size for r in rows)
        if max_batches:
            self.num_batches = min(self.num_batches, max_batches)
        self.rows_dropped = sum(rows) - self.num_batches * batch_size * world_size
        self.convert = BatchConverter(spec)
        self.columns = spec.columns()

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        emitted = 0
        pending: list[pa.Table] = []
        pending_rows = 0
        for ref in self.mine:
            if emitted == self.num_batches:
                return
            table = self._read(ref)
            pending.append(table)
            pending_rows += table.num_rows
            while pending_rows >= self.batch_size and emitted < self.num_batches:
                buf = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
                yield self.convert(buf.slice(0, self.batch_size), source=str(ref.file))
                emitted += 1
                rest = buf.slice(self.batch_size)
                pending, pending_rows = [rest], rest.num_rows

    def _read(self, ref: RowGroupRef) -> pa.Table:
        try:
            pf = pq.ParquetFile(ref.file)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{ref.file}: cannot open Parquet file: {e}") from e
        check_schema(self.spec, pf.schema_arrow, str(ref.file))
        try:
            return pf.read_row_group(ref.index, columns=self.columns)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{ref.file}: row group {ref.index} is unreadable: {e}") from e
