"""A day's row groups, from the Parquet footers alone, and their split across ranks.

    footers = read_footers(day, spec, on_corrupt_file="fail")     # DayFooters: refs + files skipped as corrupt
    shares = split_row_groups(footers.refs, world_size)            # rank -> its RowGroupRefs, in file order
    n = batches_per_rank([sum(r.num_rows for r in s) for s in shares], batch_size, error_budget)

Split: a day's row groups are dealt to ranks greedily by row count, largest first, each to the rank with the
fewest rows so far (ties to the lower rank): deterministic from the footers alone, so every rank computes the
same split with no communication. Equal batch counts: every rank yields exactly
    N = min over ranks r of (rows_r - ceil(error_budget * rows_r)) // batch_size
batches, so no rank waits in a collective for one that has run out; each keeps `error_budget` of its rows in
reserve for rows that validation drops. pipeline/data/reader.py reads the shares (DayReader).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.days import DayPartition
from pipeline.data.features import FeatureSpec
from pipeline.data.validate import check_schema

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowGroupRef:
    """One row group of one file, as its footer describes it."""

    file: Path
    index: int
    num_rows: int


@dataclass
class DayFooters:
    """Every readable row group of a day, and the files skipped as corrupt (on_corrupt_file = "skip")."""

    refs: list[RowGroupRef]
    corrupt_files: list[str] = field(default_factory=list)


def read_footers(day: DayPartition, spec: FeatureSpec | None = None, *,
                 on_corrupt_file: Literal["fail", "skip"] = "fail") -> DayFooters:
    """Row groups of the day in file then row-group order; each file's schema is checked against `spec`."""
    files = day.files
    if not files:
        raise FileNotFoundError(f"{day.path} holds no .parquet files")
    out = DayFooters([])
    for file in files:
        try:
            pf = pq.ParquetFile(file)
        except (pa.ArrowException, OSError) as e:
            if on_corrupt_file == "fail":
                raise ValueError(f"{file}: cannot read the Parquet footer: {e} "
                                 "(data.on_corrupt_file = 'skip' skips such files)") from e
            log.warning("skipping corrupt file %s: cannot read the Parquet footer: %s", file, e)
            out.corrupt_files.append(str(file))
            continue
        if spec is not None:
            check_schema(spec, pf.schema_arrow, str(file))
        meta = pf.metadata
        out.refs += [RowGroupRef(file, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    return out


def row_groups(day: DayPartition) -> list[RowGroupRef]:
    """Every row group of the day, in file then row-group order."""
    return read_footers(day).refs


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


def batches_per_rank(rows_per_rank: list[int], batch_size: int, error_budget: float) -> int:
    """N of the equal-count policy: every rank can fill N batches while its bad rows stay within the reserve."""
    return min((rows - math.ceil(error_budget * rows)) // batch_size for rows in rows_per_rank)
