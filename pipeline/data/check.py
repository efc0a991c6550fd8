"""Check a run's feature spec against its logs before any training: the schema from the Parquet footers (in
seconds), then a profile of the values (`hyrank check`).

    report = check_range(cfg.features, cfg.data.root, DayRange.parse("2026-11-01..2026-11-04"), options=cfg.data,
                         partition_key="day", world_size=2, batch_size=512)
    report.errors, report.warnings           # [Problem]: each names the day, file, column, expected and found type
    require_schema(cfg.features, days, options=cfg.data, world_size=2, batch_size=512)   # ValueError listing them
    profile = profile_days(cfg.features, report.readable, options=cfg.data, max_rows_per_day=0)   # .columns, .days
    profile.problems(error_budget=0.01)      # warnings: rows validation would drop, ids that collide, ...

Schema: every column the spec reads must be in every file of every day with a type its kind accepts
(pipeline/data/schema.py `column_kinds`, `check_type`: the converter's rule), and a day's files must agree on them
(`check_same_types`: the reader's rule). The reader (split.py `read_footers`) stops at the first problem; here every
problem of every file is listed, and the same files pass both. Errors: what the reader refuses. Warnings: missing
or incomplete days of a range (one line for many), days disagreeing on a type, ranks left under a batch (split_rows).

Profile: each row group read (all, or whole ones drawn until `max_rows_per_day`) goes through the reader's validation
(`validate_rows`: the rows it drops, per reason) and one vectorised pass per column: null share; for ids the distinct
count against the table's `num_embeddings`, negative ids (always refused) and ids >= num_embeddings (hashed modulo
the table under oov = "hash", refused under "error"; strings are always hashed); sequence length quantiles against
`max_len` and the rows truncated; dense min, max, mean and values the norm refuses (below 0 under "log1p", as the
reader does); the label's positive rate; the group column's distinct count.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hyrank.pipeline.data.days import (MAX_NAMED_MISSING, DayPartition, DayRange, describe_missing, missing_days,
                                       scan_days)
from hyrank.pipeline.data.features import FeatureSpec
from hyrank.pipeline.data.options import ReaderOptions
from hyrank.pipeline.data.schema import (ColumnKind, check_type, column_kinds, is_list, is_string_id, list_lengths,
                                         nulls, plain)
from hyrank.pipeline.data.split import RowRange, split_rows
from hyrank.pipeline.data.validate import check_same_types, validate_rows
from hyrank.pipeline.storage import open_input

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """One finding, as one line: `error` (the reader would refuse the data) or `warning` (training runs, worse)."""

    severity: Literal["error", "warning"]
    message: str  # names the day or file, the column, and both types where they apply
    day: str = ""
    file: str = ""
    column: str = ""
    expected: str = ""  # what the spec's kind of column holds
    found: str = ""  # the Arrow type in the file ("missing" for a missing column)


@dataclass
class DayFiles:
    """What the footers of one day say."""

    day: str
    path: str
    files: int = 0
    row_groups: int = 0
    rows: int = 0
    rows_per_rank: list[int] = field(default_factory=list)  # the reader's split (split_rows) over world_size ranks


@dataclass
class SchemaReport:
    days: list[DayFiles]
    problems: list[Problem]
    readable: list[DayPartition]  # the days without an error: what the profile reads

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def raise_errors(self) -> None:
        """One ValueError naming every error (one line for one error, else one per line); nothing when there is
        none."""
        if errors := self.errors:
            if len(errors) == 1:
                raise ValueError(f"the feature spec does not match the logs: {errors[0].message}")
            raise ValueError(f"the feature spec does not match the logs ({len(errors)} problems; hyrank check "
                             "shows them with a profile of the values):\n  " + "\n  ".join(p.message for p in errors))


# ---------------------------------------------------------------------------------------------------------------
# Schema


def check_days(spec: FeatureSpec, days: list[DayPartition], *, options: ReaderOptions | None = None,
               world_size: int = 1, batch_size: int = 0) -> SchemaReport:
    """Check the footers of `days` against `spec` (see the module docstring); `options` gives the reader's corrupt
    file policy (cfg.data), `batch_size` (per rank; 0: no check) the size a rank's share should reach."""
    opts = options or ReaderOptions()
    report = SchemaReport([], [], [])
    first: tuple[str, pa.Schema] | None = None  # the first day's reference schema, to compare the days by
    for day in days:
        info, problems, schema = _check_day(spec, day, opts, world_size)
        report.days.append(info)
        if schema is not None and first is not None:
            if diff := [f"{c!r} is {f.type}{'' if f.nullable else ' not null'}" for c in spec.columns()
                        if not (f := schema.field(c)).equals(first[1].field(c))]:
                problems.append(Problem("warning", f"day {info.day}: {', '.join(diff)}, another type than on day "
                                        f"{first[0]}: days trained as one unit (train.min_unit_rows) must agree",
                                        info.day))
        if first is None and schema is not None:
            first = (info.day, schema)
        report.problems += problems
        if not any(p.severity == "error" for p in problems):
            report.readable.append(day)
    if short := [f for f in report.days if f.rows and min(f.rows_per_rank) < batch_size]:  # one line for them all
        listed = ", ".join(f"{f.day} ({min(f.rows_per_rank)})" for f in short[:5])
        more = f" and {len(short) - 5} more" if len(short) > 5 else ""
        report.problems.append(Problem("warning", f"{len(short)} of {len(days)} day(s) leave a rank fewer rows than "
                                       f"one batch of {batch_size} (data.batch_size_per_rank) over {world_size} "
                                       f"rank(s): {listed}{more}: read alone, the rest of its batch is weight-0 filler",
                                       short[0].day if len(short) == 1 else ""))
    return report


def check_range(spec: FeatureSpec, root: str | Path, days: DayRange | None, *, partition_key: str = "day",
                require_success: bool = True, options: ReaderOptions | None = None, world_size: int = 1,
                batch_size: int = 0) -> SchemaReport:
    """`check_days` on the days of `days` under `root` (None: every day there), after a warning for each day of
    the range that will not be read whole (no folder, no _SUCCESS marker; one summary line when there are more than
    MAX_NAMED_MISSING: a sparse calendar) and an error when none is there."""
    try:
        scan = scan_days(root, days, partition_key=partition_key, require_success=require_success)
    except FileNotFoundError as e:
        return SchemaReport([], [Problem("error", str(e))], [])
    problems = [Problem("warning", f"skipped {s.path}: {s.reason}") for s in scan.skipped if s.day is None]
    span = days or (DayRange(scan.found[0].day, scan.found[-1].day) if scan.found else None)
    empty = {d.day for d in scan.empty}  # read, and refused: check_days names them
    gaps = [g for g in (missing_days(span, scan, partition_key=partition_key) if span else []) if g.day not in empty]
    if len(gaps) <= MAX_NAMED_MISSING:
        problems += [Problem("warning", f"day {g.day} of {span} is missing or incomplete: {g.reason}", str(g.day))
                     for g in gaps]
    else:  # a sparse calendar: one line, not thousands
        problems.append(Problem("warning", f"{len(gaps)} of the {len(span.dates())} day(s) of {span} are missing or "
                                f"incomplete: {describe_missing(gaps)}"))
    if not scan.found:
        problems.append(Problem("error", f"no complete day in {days or 'any day'} under {root} "
                                f"({partition_key}=YYYY-MM-DD folders with a _SUCCESS marker)"))
    report = check_days(spec, scan.found, options=options, world_size=world_size, batch_size=batch_size)
    report.problems = problems + report.problems
    return report


def require_schema(spec: FeatureSpec, days: list[DayPartition], *, options: ReaderOptions | None = None,
                   world_size: int = 1, batch_size: int = 0, log_warnings: bool = True) -> SchemaReport:
    """`check_days`, logging its warnings and raising one ValueError naming every error: what a training verb calls
    on the days it will read before building anything."""
    report = check_days(spec, days, options=options, world_size=world_size, batch_size=batch_size)
    if log_warnings:
        for p in report.warnings:
            log.warning("%s", p.message)
    report.raise_errors()
    return report


def _check_day(spec: FeatureSpec, day: DayPartition, opts: ReaderOptions,
               world_size: int) -> tuple[DayFiles, list[Problem], pa.Schema | None]:
    """The day's footers, its problems, and the schema of its first file with the spec's columns right."""
    name, info, files = str(day.day), DayFiles(str(day.day), str(day.path)), day.files
    if not files:
        return info, [Problem("error", f"{day.path} holds no .parquet files, but it is marked complete", name)], None
    kinds = column_kinds(spec)
    problems: list[Problem] = []
    refs: list[RowRange] = []
    first: tuple[pa.Schema, str] | None = None  # the first file with a correct schema: the day's reference
    corrupt = 0
    for file in files:
        try:
            pf = pq.ParquetFile(open_input(file))
        except (pa.ArrowException, OSError) as e:
            corrupt += 1
            skip = opts.on_corrupt_file == "skip"
            problems.append(Problem("warning" if skip else "error", f"{file}: cannot read the Parquet footer: {e} " + (
                "(skipped: its rows are unknown)" if skip else "(data.on_corrupt_file = 'skip' skips such files)"),
                name, str(file)))
            continue
        schema = pf.schema_arrow
        found = _file_problems(spec, kinds, schema, str(file), name)
        problems += found
        if not found:
            try:
                if first is None:
                    first = (schema, str(file))
                else:
                    check_same_types(spec, schema, str(file), *first)
            except ValueError as e:
                problems.append(Problem("error", str(e), name, str(file)))
        meta = pf.metadata
        refs += [RowRange.whole_group(file, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
        info.files, info.row_groups = info.files + 1, info.row_groups + meta.num_row_groups
    if corrupt and opts.on_corrupt_file == "skip" and corrupt > opts.max_corrupt_files:
        problems.append(Problem("error", f"day {name}: {corrupt} file(s) with an unreadable Parquet footer, more than "
                                f"data.max_corrupt_files = {opts.max_corrupt_files}: the reader stops there", name))
    info.rows = sum(r.num_rows for r in refs)
    info.rows_per_rank = [sum(r.num_rows for r in share) for share in split_rows(refs, world_size)]
    if not info.rows:
        problems.append(Problem("error", f"day {name}: its files hold no row ({day.path}); a day with no row is an "
                                "error, never 'done'", name))
    return info, problems, first[0] if first else None


def _file_problems(spec: FeatureSpec, kinds: dict[str, ColumnKind], schema: pa.Schema, source: str,
                   day: str) -> list[Problem]:
    """Every column of the spec that `schema` lacks or holds in a type its kind refuses."""
    side_of = {c: s for s in spec.sequences for c in s.columns[1:]}
    out = []
    for column, kind in kinds.items():
        idx = schema.get_field_index(column)
        if idx < 0:
            out.append(Problem("error", f"{source}: missing column {column!r} declared in the feature spec (a "
                               f"{kind.name} column: {kind.description})", day, source, column, kind.description,
                               "missing"))
            continue
        found = schema.field(idx).type
        try:
            check_type(kind, found, source=source, column=column)
        except ValueError as e:
            message = str(e)
            if column in side_of:  # side-info must be aligned, event for event, with its sequence's ids
                seq = side_of[column]
                ids = schema.field(seq.ids).type if schema.get_field_index(seq.ids) >= 0 else "missing"
                message += (f" (side-info of sequence {seq.name!r}: a list aligned event by event with its ids "
                            f"column {seq.ids!r}, which is {ids})")
            out.append(Problem("error", message, day, source, column, kind.description, str(found)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Profile

_INT64_MAX = np.iinfo(np.int64).max
_BITMAP_MAX = 1 << 27  # tables up to this many rows count their distinct ids in a bitmap (128 MiB at most)
_QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}


@dataclass
class ColumnProfile:
    """The values of one column over the rows read. Fields of other kinds keep their defaults: ids (sparse, sequence,
    side) fill `table` to `refused`, sequences and side-info `max_len` to `misaligned_rows`, dense and oracle columns
    `norm` to `wrong_size_rows`, the label the last two. Counts of ids count values (list elements for lists)."""

    column: str
    kind: str  # label, group, oracle, sparse, sequence, side (sequence side-info), dense, or a schema kind's name
    rows: int = 0
    null_rows: int = 0
    table: str = ""
    num_embeddings: int = 0
    oov: str = ""
    string_ids: bool = False  # always hashed into the table
    ids: int = 0  # non-null id values read
    distinct: int | None = None  # distinct ids (group: distinct values) over every day read
    negative: int = 0  # integer ids below 0: refused whatever oov says
    out_of_range: int = 0  # integer ids >= num_embeddings
    hashed: int = 0  # ids taken modulo num_embeddings: out of range under oov = "hash", or strings
    refused: int = 0  # ids whose rows validation drops: negative, or out of range under oov = "error"
    max_len: int = 0
    lengths: dict[str, int] = field(default_factory=dict)  # p50, p90, p99, max of the non-null lists
    truncated_rows: int = 0  # non-null lists longer than max_len (their oldest events are cut)
    misaligned_rows: int = 0  # side-info lists whose length differs from the ids list's
    norm: str = ""
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    non_finite: int = 0
    out_of_domain: int = 0  # values the norm cannot take (below 0 under log1p)
    wrong_size_rows: int = 0  # dense lists whose length is not the feature's size
    positive_rate: float | None = None
    not_binary: int = 0

    @property
    def null_share(self) -> float:
        return self.null_rows / max(self.rows, 1)

    @property
    def truncated_share(self) -> float:
        return self.truncated_rows / max(self.rows - self.null_rows, 1)


@dataclass
class DayProfile:
    day: str
    rows: int  # in the footers
    rows_read: int  # profiled: all of them, or whole row groups up to max_rows_per_day
    bad: dict[str, int] = field(default_factory=dict)  # rows of those the reader's validation drops, per reason

    @property
    def bad_rows(self) -> int:
        return sum(self.bad.values())


@dataclass
class Profile:
    columns: list[ColumnProfile]
    days: list[DayProfile]

    def problems(self, error_budget: float) -> list[Problem]:
        """Warnings: the rows validation would drop (and the days where they exceed the error budget: the run would
        stop there), refused ids, ids hashed into rows they share."""
        out = []
        if bad := [d for d in self.days if d.bad_rows]:  # one line for every day
            dropped, read = sum(d.bad_rows for d in bad), sum(d.rows_read for d in self.days)
            reasons = sum((Counter(d.bad) for d in bad), Counter()).most_common()
            over = [f"{d.day} ({d.bad_rows / d.rows_read:.2%})" for d in bad if d.bad_rows > error_budget * d.rows_read]
            stop = (f"; over data.error_budget = {error_budget:.2%}, where the run would stop: {', '.join(over[:5])}"
                    f"{f' and {len(over) - 5} more' if len(over) > 5 else ''}" if over else "")
            out.append(Problem("warning", f"validation would drop {dropped:,} of the {read:,} rows read, in {len(bad)} "
                               f"day(s) ({', '.join(f'{r} {n:,}' for r, n in reasons)}){stop}",
                               bad[0].day if len(bad) == 1 else ""))
        for c in self.columns:
            if c.refused:
                out.append(Problem("warning", f"column {c.column!r}: {c.refused} id(s) refused ({c.negative} negative, "
                                   f"{c.refused - c.negative} >= num_embeddings {c.num_embeddings} of table "
                                   f"{c.table!r} under oov = {c.oov!r}): their rows are dropped", column=c.column))
            hashing = c.string_ids or c.oov == "hash"  # under "error", ids beyond the table are refused instead
            if hashing and c.distinct is not None and c.table and c.distinct > c.num_embeddings:
                out.append(Problem("warning", f"column {c.column!r}: {c.distinct} distinct ids share the "
                                   f"{c.num_embeddings} rows of table {c.table!r}: hashed ids collide "
                                   "(num_embeddings too small?)", column=c.column))
            elif c.hashed and not c.string_ids:
                out.append(Problem("warning", f"column {c.column!r}: {c.hashed} id(s) >= num_embeddings "
                                   f"{c.num_embeddings} are hashed into table {c.table!r}, sharing rows with "
                                   "other ids", column=c.column))
        return out


def profile_days(spec: FeatureSpec, days: list[DayPartition], *, options: ReaderOptions | None = None,
                 max_rows_per_day: int = 0, seed: int = 0) -> Profile:
    """Read the spec's columns of `days` (whole row groups drawn in a seeded order until `max_rows_per_day`, 0:
    all) and profile them; see the module docstring. Days must have passed `check_days`."""
    opts = options or ReaderOptions()
    accs = _accumulators(spec)
    columns = list(dict.fromkeys(spec.columns()))
    out_days = []
    for day in days:
        files = []
        for file in day.files:
            with contextlib.suppress(pa.ArrowException, OSError):  # unreadable: skipped (on_corrupt_file = "skip")
                files.append(pq.ParquetFile(open_input(file)))
        units = [(pf, i, pf.metadata.row_group(i).num_rows) for pf in files for i in range(pf.metadata.num_row_groups)]
        prof = DayProfile(str(day.day), sum(n for _, _, n in units), 0)
        for pf, i, _ in _sample(units, max_rows_per_day, np.random.default_rng([seed, day.day.toordinal()])):
            table = pf.read_row_group(i, columns=columns)
            prof.rows_read += table.num_rows
            verdict = validate_rows(table, spec, max_list_len=opts.max_list_len)
            prof.bad = dict(Counter(prof.bad) + Counter(verdict.counts()))
            for acc in accs:
                acc.add(table)
        out_days.append(prof)
    return Profile([acc.finish() for acc in accs], out_days)


def _sample(units: list, max_rows: int, rng: np.random.Generator) -> list:
    """All units, or whole ones drawn in a random order until they hold `max_rows` rows, back in file order."""
    if not max_rows or sum(u[2] for u in units) <= max_rows:
        return units
    order = rng.permutation(len(units))
    taken = np.cumsum([units[k][2] for k in order])
    return [units[k] for k in sorted(order[:int(np.searchsorted(taken, max_rows)) + 1])]


def _accumulators(spec: FeatureSpec) -> list[_Acc]:
    tables = {t.name: _INT64_MAX if t.managed else t.num_embeddings for t in spec.tables}  # managed: no id shares
    accs = [_Acc(ColumnProfile(spec.label, "label"))]
    accs += [_Acc(ColumnProfile(spec.group, "group"))] if spec.group is not None else []
    accs += [_Acc(ColumnProfile(spec.oracle, "oracle"))] if spec.oracle is not None else []
    accs += [_Acc(ColumnProfile(f.name, "sparse", table=f.table, num_embeddings=tables[f.table],
                                oov=f.oov)) for f in spec.sparse]
    accs += [_Acc(ColumnProfile(f.name, "dense", norm=f.norm), size=f.size) for f in spec.dense]
    accs += [_Acc(ColumnProfile(c, "sequence" if c == s.ids else "side", table=s.table_of(c), oov=s.oov_of(c),
                                num_embeddings=tables[s.table_of(c)], max_len=s.max_len),
                  ids_column=s.ids) for s in spec.sequences for c in s.columns]
    known = {a.p.column for a in accs}  # other columns (match candidates): their nulls
    return accs + [_Acc(ColumnProfile(c, kind.name)) for c, kind in column_kinds(spec).items() if c not in known]


class _Acc:
    """Accumulates one column's profile over row groups (one vectorised pass each), finished once at the end."""

    def __init__(self, p: ColumnProfile, *, size: int = 1, ids_column: str = ""):
        self.p, self.size, self.ids_column = p, size, ids_column
        self.uniques: list[pa.Array] = []  # the distinct values of each chunk
        self.lengths: list[np.ndarray] = []  # sequences: the lengths of the non-null lists
        self.seen: np.ndarray | None = None  # (num_embeddings,) bool: the table rows an id of the column hits
        self.sum, self.count, self.labels, self.positives = 0.0, 0, 0, 0

    def add(self, table: pa.Table) -> None:
        p = self.p
        col = table.column(p.column)
        arr = plain(col.chunk(0) if col.num_chunks == 1 else col.combine_chunks())
        null = nulls(arr)
        p.rows += len(arr)
        p.null_rows += int(null.sum())
        if p.kind == "label":
            y = pc.drop_null(arr).to_numpy(zero_copy_only=False).astype(np.float64)
            self.labels += len(y)
            self.positives += int(np.count_nonzero(y == 1))
            p.not_binary += int(np.count_nonzero((y != 0) & (y != 1)))
        elif p.kind == "group":
            self.uniques.append(pc.unique(pc.drop_null(arr)))
        elif p.kind in ("sparse", "sequence", "side"):
            self._ids(table, arr, null)
        elif p.kind in ("dense", "oracle"):
            self._numbers(arr)

    def _ids(self, table: pa.Table, arr: pa.Array, null: np.ndarray) -> None:
        p, values = self.p, arr
        if is_list(arr.type):
            lengths = list_lengths(arr)
            if p.kind == "sequence":
                self.lengths.append(lengths[~null])
                p.truncated_rows += int(np.count_nonzero(lengths[~null] > p.max_len))
            elif p.kind == "side":  # as validation compares them: a null list has length 0
                p.misaligned_rows += int(np.count_nonzero(lengths != list_lengths(table.column(self.ids_column))))
            values = plain(pc.list_flatten(arr))
        values = pc.drop_null(values)
        p.ids += len(values)
        if is_string_id(arr.type):
            p.string_ids = True
            p.hashed += len(values)
            self.uniques.append(pc.unique(values))
            return
        low, high = pc.min_max(values).values()
        x = values.to_numpy(zero_copy_only=False)
        inside = None  # the common case: every id is a row of the table
        if len(values) and (low.as_py() < 0 or high.as_py() >= p.num_embeddings):
            inside = (x >= 0) & (x < p.num_embeddings)
            negative, beyond = int(np.count_nonzero(x < 0)), int(np.count_nonzero(x >= p.num_embeddings))
            huge = int(np.count_nonzero(x > _INT64_MAX)) if x.dtype.kind == "u" else 0  # int64 cannot hold them
            hashed = beyond - huge if p.oov == "hash" else 0
            p.negative, p.out_of_range, p.hashed = p.negative + negative, p.out_of_range + beyond, p.hashed + hashed
            p.refused += negative + beyond - hashed
        if p.num_embeddings > _BITMAP_MAX:  # distinct ids: hashed, or marked in a bitmap of the table's rows
            self.uniques.append(pc.unique(values))
            return
        if self.seen is None:
            self.seen = np.zeros(p.num_embeddings, dtype=bool)
        self.seen[x if inside is None else x[inside]] = True
        if inside is not None:
            self.uniques.append(pc.unique(pa.array(x[~inside])))

    def _numbers(self, arr: pa.Array) -> None:
        p, values = self.p, arr
        if is_list(arr.type):
            p.wrong_size_rows += int(np.count_nonzero(list_lengths(pc.drop_null(arr)) != self.size))
            values = pc.list_flatten(arr)
        x = pc.drop_null(values).to_numpy(zero_copy_only=False).astype(np.float64)
        finite = np.isfinite(x)
        p.non_finite += int(np.count_nonzero(~finite))
        x = x[finite]
        if not x.size:
            return
        p.min = float(x.min()) if p.min is None else min(p.min, float(x.min()))
        p.max = float(x.max()) if p.max is None else max(p.max, float(x.max()))
        self.sum += float(x.sum())
        self.count += x.size
        if p.norm == "log1p":
            p.out_of_domain += int(np.count_nonzero(x < 0))

    def finish(self) -> ColumnProfile:
        p = self.p
        if self.uniques or self.seen is not None:
            p.distinct = (0 if self.seen is None else int(np.count_nonzero(self.seen))) + (
                _count_distinct(self.uniques) if self.uniques else 0)
        if self.lengths and (lengths := np.concatenate(self.lengths)).size:
            p.lengths = {k: int(np.quantile(lengths, q, method="inverted_cdf")) for k, q in _QUANTILES.items()}
            p.lengths["max"] = int(lengths.max())
        if self.count:
            p.mean = self.sum / self.count
        if self.labels:
            p.positive_rate = self.positives / self.labels
        return p


def _count_distinct(uniques: list[pa.Array]) -> int:
    """Distinct values of the chunks' distinct values, brought to one type (days need not agree on a column's)."""
    types = {u.type for u in uniques}
    if len(types) > 1:
        target = pa.large_string() if any(is_string_id(t) for t in types) else pa.int64()
        uniques = [u.cast(target, safe=False) for u in uniques]
    return len(pc.unique(pa.chunked_array(uniques)))
