"""A day's row groups, from the Parquet footers alone, and their split across ranks.

    footers = read_footers(day, spec, on_corrupt_file="fail")     # DayFooters: refs, files skipped as corrupt,
                                                                   # each file's fingerprint (size, footer hash)
    shares = split_rows(footers.refs, world_size)                  # rank -> its RowRanges, in file order
    units = group_days(days, min_rows=32 * 512 * 2)                # small consecutive days read as one DaySpan

Split: the day's rows, in file then row-group order, are cut into `world_size` contiguous shares whose sizes differ
by at most one row; a row group on a boundary is read by both ranks, each keeping its own rows of it. It is
deterministic from the footers alone, so every rank computes the same split with no communication, and no rank
is left without rows because a day has fewer row groups than ranks (whole row groups dealt to ranks could not
promise either). pipeline/data/reader.py reads the shares (DayReader).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from hyrank.pipeline.data.days import DayPartition, Days, as_span
from hyrank.pipeline.data.features import FeatureSpec
from hyrank.pipeline.data.fingerprint import FileFingerprint, file_fingerprint
from hyrank.pipeline.data.schema import is_string_id
from hyrank.pipeline.data.validate import check_same_types, check_schema
from hyrank.pipeline.storage import open_input

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowRange:
    """Rows [start, stop) of one row group of one file: a whole row group as its footer describes it, or the part
    of one that a rank reads."""

    file: Path
    index: int
    start: int
    stop: int
    group_rows: int  # rows of the whole row group

    @classmethod
    def whole_group(cls, file: Path, index: int, num_rows: int) -> RowRange:
        return cls(file, index, 0, num_rows, num_rows)

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    @property
    def whole(self) -> bool:
        """Whether this is the whole row group (its quarantine file then needs no row suffix)."""
        return self.start == 0 and self.stop == self.group_rows


@dataclass(frozen=True)
class CorruptFile:
    """A file skipped because its Parquet footer is unreadable (on_corrupt_file = "skip"). Its rows are unknown: no
    footer says how many it held, so they are in no row count and no error budget (a fraction of the day's rows)
    can cover them; only data.max_corrupt_files allows skipping it."""

    path: str
    error: str


@dataclass
class DayFooters:
    """Every readable row group of a day, the files skipped as corrupt (on_corrupt_file = "skip"), and which
    version of each file this is (a run's ledger records them: pipeline/data/fingerprint.py)."""

    refs: list[RowRange]  # whole row groups
    skipped: list[CorruptFile] = field(default_factory=list)
    fingerprints: dict[str, FileFingerprint] = field(default_factory=dict)  # by path, every file that opens

    @property
    def corrupt_files(self) -> list[str]:
        return [s.path for s in self.skipped]

    @property
    def rows_known(self) -> bool:
        """False when skipped files hold an unknown number of rows: the day's row count is then a lower bound."""
        return not self.skipped

    def unknown_rows_note(self) -> str:
        """For the day's report: "" when every row is accounted for, else which files' rows are unknown."""
        if self.rows_known:
            return ""
        return (f"rows unknown: {len(self.skipped)} file(s) skipped with an unreadable Parquet footer "
                f"({', '.join(self.corrupt_files)})")


def read_footers(day: Days, spec: FeatureSpec | None = None, *,
                 on_corrupt_file: Literal["fail", "skip"] = "fail", max_corrupt_files: int = 0) -> DayFooters:
    """Row groups of the day in file then row-group order.

    With `spec`, each file's schema is checked against it, and the spec's columns must have the same types in
    every file (rows of two files meet in one batch; a difference would otherwise stop the run mid-day). A sparse
    column of strings is reported once (they are hashed, not looked up). With on_corrupt_file = "skip", at most
    `max_corrupt_files` files with an unreadable footer are skipped: their rows are unknown, so more of them raise
    ValueError, as a day over its error budget does.
    """
    files = day.files
    if not files:
        raise FileNotFoundError(f"{day.path} holds no .parquet files")
    out = DayFooters([])
    first: tuple[pa.Schema, str] | None = None  # the first readable file's schema: the day's reference
    for file in files:
        try:
            out.fingerprints[str(file)] = file_fingerprint(file)  # two small reads beside the footer's
            pf = pq.ParquetFile(open_input(file))
        except (pa.ArrowException, OSError) as e:
            if on_corrupt_file == "fail":
                raise ValueError(f"{file}: cannot read the Parquet footer: {e} "
                                 "(data.on_corrupt_file = 'skip' skips such files)") from e
            log.warning("skipping corrupt file %s: cannot read the Parquet footer, so its rows are unknown: %s",
                        file, e)
            out.skipped.append(CorruptFile(str(file), str(e)))
            continue
        if spec is not None:
            check_schema(spec, pf.schema_arrow, str(file))
            if first is None:
                first = (pf.schema_arrow, str(file))
                _warn_string_ids(spec, pf.schema_arrow, str(file))  # every file has the same types, or raises below
            else:
                check_same_types(spec, pf.schema_arrow, str(file), *first)
        meta = pf.metadata
        out.refs += [RowRange.whole_group(file, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    if len(out.skipped) > max_corrupt_files:
        raise ValueError(
            f"day {day.label}: {len(out.skipped)} file(s) skipped with an unreadable Parquet footer, so their rows are "
            f"unknown and the day counts as over its error budget: {', '.join(out.corrupt_files)} "
            f"(data.max_corrupt_files = {max_corrupt_files} allows up to that many such files a day)")
    return out


_WARNED_STRING_IDS: set[tuple[str, str]] = set()  # (partition folder, column): said once per day and process


def _warn_string_ids(spec: FeatureSpec, schema: pa.Schema, source: str) -> None:
    """Say that a sparse column of strings is hashed: ids that were meant as integers would be, silently. Once per
    day and column in a process (training and evaluation read the same day's footers again)."""
    tables = spec.table_by_name
    for f in spec.sparse:
        t = schema.field(f.name).type
        key = (str(Path(source).parent), f.name)
        if is_string_id(t) and key not in _WARNED_STRING_IDS:
            _WARNED_STRING_IDS.add(key)
            log.warning("%s: column %r holds strings (%s): they are hashed into the %d rows of table %r "
                        "(distinct strings may share a row; oov = %r does not apply)", source, f.name, t,
                        tables[f.table].num_embeddings, f.table, f.oov)


def group_days(days: list[DayPartition], min_rows: int) -> list[Days]:
    """Consecutive days merged, in order, into units of at least `min_rows` rows (from the footers); a day of that
    many rows stays alone, and a short remainder joins the unit before it. Small days read one by one would each
    end in a part-filled batch and pay a day's fixed costs (reader start, end-of-day collectives, a checkpoint):
    read as one DaySpan their rows fill whole batches. A file whose footer is unreadable counts 0 rows here (the
    reader reports it)."""
    units: list[list[DayPartition]] = []
    rows_in_last = 0
    for day in days:
        rows = sum(_footer_rows(f) for f in day.files)
        if units and rows_in_last < min_rows:
            units[-1].append(day)
            rows_in_last += rows
        else:
            units.append([day])
            rows_in_last = rows
    if len(units) > 1 and rows_in_last < min_rows:  # a short tail joins the unit before it
        units[-2].extend(units.pop())
    return [as_span(u) for u in units]


def _footer_rows(file: Path) -> int:
    try:
        return pq.ParquetFile(open_input(file)).metadata.num_rows
    except (pa.ArrowException, OSError):
        return 0


def row_groups(day: Days) -> list[RowRange]:
    """Every row group of the day, in file then row-group order."""
    return read_footers(day).refs


def split_rows(refs: list[RowRange], world_size: int) -> list[list[RowRange]]:
    """Cut the day's rows, in file then row-group order, into `world_size` contiguous shares whose sizes differ by
    at most one row (see the module docstring); each rank's share as row ranges, in file order."""
    total = sum(r.num_rows for r in refs)
    bounds = [total * k // world_size for k in range(world_size + 1)]
    shares: list[list[RowRange]] = [[] for _ in range(world_size)]
    offset = 0
    for ref in refs:
        lo, hi = offset, offset + ref.num_rows
        for rank in range(world_size):
            a, b = max(lo, bounds[rank]), min(hi, bounds[rank + 1])
            if a < b:
                shares[rank].append(RowRange(ref.file, ref.index, a - lo, b - lo, ref.num_rows))
        offset = hi
    return shares
