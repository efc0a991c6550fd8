"""Validation of logs against the feature spec: schema per file, vectorised checks per row, the error budget.

    check_schema(spec, pf.schema_arrow, str(path))            # when a file is opened: fails at once
    check_same_types(spec, pf.schema_arrow, str(path), first_schema, first_path)   # the day's files agree
    verdict = validate_rows(table, spec, max_list_len=100_000)
    good = table.filter(verdict.good_B); verdict.counts()     # {"null": 3, "negative_id": 1}
    verdict.id_max                                            # {"user_id": 49983, ...}: bounds for the converter
    write_quarantine(qdir / "part-0.rg3.parquet", table.filter(~verdict.good_B), ...)

`check_schema`: a missing column, or one of a type its kind refuses (pipeline/data/schema.py, which the converter
shares), fails naming the file and the column, before any row is decoded. `validate_rows`: a bad row is dropped,
never fixed. It refuses every value pipeline/data/convert.py raises on, so a bad value never stops a run from
inside the converter (where the row number is a position in a batch, not in the file); the reader
(pipeline/data/reader.py) counts bad rows per reason (REASONS), writes them to the quarantine and stops the run
when a day's bad fraction exceeds the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hyrank.pipeline.data.features import DenseFeature, FeatureSpec
from hyrank.pipeline.data.schema import check_type, column_kinds, is_list, nulls
from hyrank.pipeline.files import write_atomic


def check_schema(spec: FeatureSpec, schema: pa.Schema, source: str) -> None:
    """Raise ValueError naming `source` and the column if a declared column is missing or of a type its kind
    refuses (pipeline/data/schema.py: the same types the converter refuses)."""
    for column, kind in column_kinds(spec).items():
        idx = schema.get_field_index(column)
        if idx < 0:
            raise ValueError(f"{source}: missing column {column!r} declared in the feature spec")
        check_type(kind, schema.field(idx).type, source=source, column=column)


def check_same_types(spec: FeatureSpec, schema: pa.Schema, source: str, first_schema: pa.Schema,
                     first_source: str) -> None:
    """Raise ValueError naming both files, the column and both types if a column the spec reads has another type
    or nullability in `schema` than in `first_schema` (another file of the same day): rows of several files are
    put together in one batch, which Arrow refuses for schemas that differ."""
    for column in spec.columns():
        ours, theirs = schema.field(column), first_schema.field(column)
        if ours.type != theirs.type or ours.nullable != theirs.nullable:
            raise ValueError(f"{source}: column {column!r} is {_type_of(ours)}, but {first_source} has it as "
                             f"{_type_of(theirs)}: every file of a day must give the feature spec's columns the "
                             "same type")


def _type_of(f: pa.Field) -> str:
    return f"{f.type}" if f.nullable else f"{f.type} not null"


# ---------------------------------------------------------------------------------------------------------------
# Row validation
#
# Every check is a vectorised mask over the rows of an Arrow table (pyarrow.compute / numpy, no per-row Python).
# A row that fails several checks is reported under the first one that fails (columns in the order label, group,
# oracle, sparse, dense, sequences, match candidates), so counts add up to the number of bad rows. Clean data takes
# the fast path: a list column whose min/max and null count are fine is never compared element by element.
#
# REASONS is append-only: DayValidation.as_vector() is summed across ranks and saved in reader cursors in this order.

REASONS = (
    "null",                  # null label, id, list, id inside a list, dense value (in a list too), group or oracle
    "label_not_binary",      # label other than 0 or 1
    "not_finite",            # NaN or Inf in a dense value or the oracle, or a value float32 cannot hold
    "dense_wrong_size",      # a dense list whose length is not the feature's size
    "negative_id",           # an integer id below 0 (string ids are hashed, never negative)
    "id_out_of_range",       # an id >= the table size under oov = "error"; any policy: an unsigned id above int64
    "list_too_long",         # a list longer than the hard cap `max_list_len` (not the truncation max_len)
    "side_length_mismatch",  # a sequence side-info list whose length differs from its id list
    "corrupt_row_group",     # a row group that could not be decoded (reader, on_corrupt_file = "skip")
    "norm_out_of_domain",    # a dense value its norm cannot take: below 0 under norm = "log1p"
)
_INT64_MAX = np.iinfo(np.int64).max  # the converter takes ids as int64: an unsigned id above this would wrap
_CODE = {r: i + 1 for i, r in enumerate(REASONS)}  # 0 means good


@dataclass
class RowVerdict:
    """Per-row outcome of `validate_rows` for a table of B rows."""

    reason_code_B: np.ndarray  # (B,) int8: 0 good, else 1 + index into REASONS
    column_B: np.ndarray  # (B,) object: the column that failed, "" for good rows
    # Largest id of each integer id column over all B rows. Good rows hold no negative ids, so their ids lie in
    # [0, id_max[column]]: the converter takes this instead of its own pass over the ids (BatchConverter id_max).
    id_max: dict[str, int] = field(default_factory=dict)

    @property
    def good_B(self) -> np.ndarray:
        return self.reason_code_B == 0

    @property
    def num_bad(self) -> int:
        return int(np.count_nonzero(self.reason_code_B))

    def counts(self) -> dict[str, int]:
        """Bad rows per reason (only reasons that occurred)."""
        hist = np.bincount(self.reason_code_B, minlength=len(REASONS) + 1)
        return {r: int(hist[_CODE[r]]) for r in REASONS if hist[_CODE[r]]}

    def reasons(self) -> np.ndarray:
        """(B,) reason names, "" for good rows."""
        return np.asarray([""] + list(REASONS), dtype=object)[self.reason_code_B]


class _Marker:
    """Collects failing rows (a row keeps the first reason it is marked with) and the id columns' maxima."""

    def __init__(self, num_rows: int):
        self.code = np.zeros(num_rows, dtype=np.int8)
        self.column = np.full(num_rows, "", dtype=object)
        self.id_max: dict[str, int] = {}

    def mark(self, bad_B: np.ndarray, reason: str, column: str) -> None:
        new = bad_B & (self.code == 0)
        if new.any():
            self.code[new] = _CODE[reason]
            self.column[new] = column

    def mark_rows(self, rows: np.ndarray, reason: str, column: str) -> None:
        if rows.size:
            bad = np.zeros(len(self.code), dtype=bool)
            bad[rows] = True
            self.mark(bad, reason, column)


def validate_rows(table: pa.Table, spec: FeatureSpec, *, max_list_len: int) -> RowVerdict:
    """Check every row of `table` (which holds the spec's columns) against the spec; see REASONS."""
    m = _Marker(table.num_rows)
    tables = spec.table_by_name
    _check_label(_col(table, spec.label), m, spec.label)
    if spec.group is not None:
        m.mark(nulls(_col(table, spec.group)), "null", spec.group)
    if spec.oracle is not None:  # the converter takes any float; a NaN oracle would poison the oracle AUC instead
        oracle = _col(table, spec.oracle)
        m.mark(nulls(oracle), "null", spec.oracle)
        m.mark(~np.isfinite(_as_float32(oracle)), "not_finite", spec.oracle)
    for f in spec.sparse:
        _check_ids(_col(table, f.name), tables[f.table].num_embeddings, f.oov, max_list_len, m, f.name)
    for f in spec.dense:
        _check_dense(_col(table, f.name), f, m)
    for s in spec.sequences:
        ids_len = None
        for column in s.columns:
            arr = _col(table, column)
            lengths = _check_ids(arr, tables[s.table_of(column)].num_embeddings, s.oov_of(column), max_list_len, m,
                                 column)
            if ids_len is None:
                ids_len = lengths
            else:
                m.mark(lengths != ids_len, "side_length_mismatch", column)
    sparse = {f.name for f in spec.sparse}
    for column in dict.fromkeys(f.candidate for f in spec.match if f.candidate not in sparse):
        _check_candidate(_col(table, column), max_list_len, m, column)
    return RowVerdict(m.code, m.column, m.id_max)


def _col(table: pa.Table, name: str) -> pa.Array:
    """The column as one Array; zero-copy for a single chunk (a row group), where combine_chunks would copy."""
    col = table.column(name)
    if not isinstance(col, pa.ChunkedArray):
        return col
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _as_float32(arr: pa.Array) -> np.ndarray:
    """Numbers as the converter takes them (float32, nulls as 0: they are marked separately), so a float64 that
    float32 cannot hold shows as Inf here, as it would there."""
    with np.errstate(over="ignore"):  # the overflow is what the caller looks for, not news
        return pc.fill_null(arr, 0).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)


def _list_lengths(arr: pa.Array) -> np.ndarray:
    """(B,) int64 list lengths, 0 for null lists (which are marked separately)."""
    return pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _element_rows(arr: pa.Array, bad_elements: np.ndarray) -> np.ndarray:
    """Rows holding at least one flagged element of the flattened list `arr`."""
    if not bad_elements.any():
        return np.zeros(0, dtype=np.int64)
    parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
    return np.unique(parents[bad_elements])


def _check_label(arr: pa.Array, m: _Marker, column: str) -> None:
    m.mark(nulls(arr), "null", column)
    if pa.types.is_boolean(arr.type):
        return
    y = pc.fill_null(arr, 0).to_numpy(zero_copy_only=False)
    m.mark((y != 0) & (y != 1), "label_not_binary", column)


def _check_ids(arr: pa.Array, num_embeddings: int, oov: str, max_list_len: int, m: _Marker,
               column: str) -> np.ndarray | None:
    """Mark bad ids of a scalar or list column; returns the list lengths (None for a scalar column)."""
    m.mark(nulls(arr), "null", column)
    listed = is_list(arr.type)
    lengths = None
    if listed:
        lengths = _list_lengths(arr)  # computed once: the caller reuses it for the side-info length check
        m.mark(lengths > max_list_len, "list_too_long", column)
        values = pc.list_flatten(arr)
    else:
        values = arr
    if pa.types.is_dictionary(values.type) and pa.types.is_integer(values.type.value_type):
        values = values.dictionary_decode()  # integer ids the converter takes as rows: range-check them too
    if not pa.types.is_integer(values.type):
        if listed:  # string ids: hashed, so only nulls can be wrong (a null dictionary entry too)
            m.mark_rows(_element_rows(arr, nulls(values)), "null", column)
        return lengths
    # under oov = "hash" any id is taken modulo the table size, except one int64 cannot hold (an unsigned id)
    limit = num_embeddings if oov == "error" else _INT64_MAX + 1
    low, high = pc.min_max(values).values()  # one pass over the values, the only one on clean data
    if high.as_py() is not None:
        m.id_max[column] = high.as_py()
    if not values.null_count and (low.as_py() is None or low.as_py() >= 0) and \
            (high.as_py() is None or high.as_py() < limit):
        return lengths  # the fast path: nothing to flag element by element
    ids = pc.fill_null(values, 0).to_numpy(zero_copy_only=False)
    checks = [(nulls(values), "null"), (ids < 0, "negative_id"), (ids >= limit, "id_out_of_range")]
    for bad, reason in checks:
        if listed:
            m.mark_rows(_element_rows(arr, bad), reason, column)
        else:
            m.mark(bad, reason, column)
    return lengths


def _check_candidate(arr: pa.Array, max_list_len: int, m: _Marker, column: str) -> None:
    """A match candidate that is no sparse feature: compared as it is, so any id will do, but not a null (in a list
    too) and not a list over the cap."""
    m.mark(nulls(arr), "null", column)
    if is_list(arr.type):
        m.mark(_list_lengths(arr) > max_list_len, "list_too_long", column)
        m.mark_rows(_element_rows(arr, nulls(pc.list_flatten(arr))), "null", column)


def _check_dense(arr: pa.Array, f: DenseFeature, m: _Marker) -> None:
    """Null rows and values, wrong list sizes, values the converter's float32 cannot hold (NaN, Inf, beyond
    float32's range) and values outside the norm's domain."""
    column = f.name
    m.mark(nulls(arr), "null", column)
    listed = is_list(arr.type)
    values = arr
    if listed:
        m.mark(_list_lengths(arr) != f.size, "dense_wrong_size", column)
        values = pc.list_flatten(arr)
        m.mark_rows(_element_rows(arr, nulls(values)), "null", column)  # integer lists too: NaN once converted
    x = _as_float32(values)
    checks = [(~np.isfinite(x), "not_finite")]
    if f.norm == "log1p":
        checks.append((x < 0, "norm_out_of_domain"))  # the converter refuses them rather than log1p a negative
    for bad, reason in checks:
        if listed:
            m.mark_rows(_element_rows(arr, bad), reason, column)
        else:
            m.mark(bad, reason, column)


# ---------------------------------------------------------------------------------------------------------------
# Quarantine and the error budget


def write_quarantine(path: Path, bad_rows: pa.Table, verdict_bad: RowVerdict, *, source_file: str,
                     source_rows: np.ndarray) -> Path:
    """Write the bad rows of one row group with `_reason`, `_column`, `_source_file`, `_source_row` columns.

    One file per source row group, written atomically: re-validating a row group (after a resume, or on
    another rank) rewrites the same file instead of appending duplicates.
    """
    table = bad_rows.append_column("_reason", pa.array(verdict_bad.reasons().tolist(), pa.string()))
    table = table.append_column("_column", pa.array(verdict_bad.column_B.tolist(), pa.string()))
    table = table.append_column("_source_file", pa.array([source_file] * bad_rows.num_rows, pa.string()))
    table = table.append_column("_source_row", pa.array(source_rows, pa.int64()))
    return write_atomic(path, lambda tmp: pq.write_table(table, tmp))


@dataclass
class DayValidation:
    """Counts of one day (or one rank's part of it): rows validated and bad rows per reason."""

    day: str
    rows: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    quarantine: str = ""  # where the bad rows went ("" when no sink was configured)

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    def add(self, rows: int, bad: dict[str, int]) -> None:
        self.rows += rows
        for reason, n in bad.items():
            self.bad[reason] = self.bad.get(reason, 0) + n

    def as_vector(self) -> list[int]:
        """[rows, bad per reason in REASONS order]: what ranks sum with one all_reduce."""
        return [self.rows] + [self.bad.get(r, 0) for r in REASONS]

    @classmethod
    def from_vector(cls, day: str, vector: list[int], quarantine: str = "") -> "DayValidation":
        bad = {r: int(n) for r, n in zip(REASONS, vector[1:]) if n}
        return cls(day, int(vector[0]), bad, quarantine)

    def over_budget(self, error_budget: float) -> bool:
        return self.rows > 0 and self.num_bad > error_budget * self.rows

    def budget_error(self, error_budget: float) -> ValueError:
        where = f"; bad rows are in {self.quarantine}" if self.quarantine else "; no quarantine sink was configured"
        return ValueError(
            f"day {self.day}: {self.num_bad} of {self.rows} rows ({self.num_bad / max(self.rows, 1):.2%}) failed "
            f"validation, over the error budget of {error_budget:.2%} (data.error_budget); per reason: "
            f"{dict(sorted(self.bad.items()))}{where}")
