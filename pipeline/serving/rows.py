"""A request's rows as training read them: JSON rows or an Arrow table -> an Arrow table of the training types,
held to training's rules. The scoring server decodes requests with this in its HTTP process; the model process
(pipeline/serving/worker.py) validates their values with it and scores them.

    rows = RowSchema.of(manifest)                                   # an artifact's manifest.json, as a dict
    table = rows.table_of([{"user_id": 3, ...}])                    # JSON rows; BadRows names each row and field
    table = rows.from_arrow(pa.ipc.open_stream(body).read_all())    # an Arrow request; BadRows names the column
    verdict = rows.verdict(table)                                   # the training reader's row checks

Both forms give the same table: the features in the types training read them (the manifest's `arrow_schema`), then
the label, query id and oracle as zeros (validation and the converter read them; they are not data at serving
time). A value of a type training refuses for its column (schema.refusal: a float or a bool id, a bool or a string
dense value) is refused in the words check_schema gives a log file whose column has that type: a JSON value row by
row, an Arrow column as a whole, as a Parquet column is. Values (ids in range, finite floats, list lengths) are then
checked by validate_rows, the training reader's own checks, with its reasons.
"""

from __future__ import annotations

import base64
import json
import reprlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from hyrank.pipeline.config import from_dict
from hyrank.pipeline.data.features import FeatureSpec
from hyrank.pipeline.data.schema import ColumnKind, column_kinds, is_list, refusal
from hyrank.pipeline.data.validate import REASONS, RowVerdict, validate_rows

_NOT_CONVERTED = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError,
                  OverflowError)


class BadRows(ValueError):
    """Rows a model cannot score; `problems` names each row, field and reason."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems[:20]) + (f"; ... ({len(problems)} problems)" if len(problems) > 20 else ""))
        self.problems = problems


@dataclass
class RowSchema:
    """What a request row of one artifact holds, and how it is turned into the table training would have read."""

    spec: FeatureSpec
    schema: pa.Schema  # of the spec's columns, as training read them
    max_list_len: int  # the training reader's hard cap on a list (validation's list_too_long)
    features: list[str] = field(init=False)

    def __post_init__(self) -> None:
        # the columns a request row carries: the spec's columns but the label, the query id and the oracle, unless
        # one of those is also a feature (group = "user_id"): then the request carries it, and it is not zeroed
        self.features = self.spec.input_columns()
        self._known = frozenset(self.features)
        self._not_features = [c for c in self.spec.columns() if c not in self._known]
        self._kinds = column_kinds(self.spec)  # the types training accepts for each column (pipeline/data/schema.py)
        self._refusals: dict[tuple[str, pa.DataType], str | None] = {}
        self._zeros: dict[int, dict[str, pa.Array]] = {}  # the neutral columns, by number of rows

    def refusal(self, name: str, t: pa.DataType) -> str | None:
        """schema.refusal of type `t` for column `name`, remembered: every request asks it of every column."""
        key = (name, t)
        if key not in self._refusals:
            if len(self._refusals) > 10_000:  # types of JSON values nested at will: no unbounded memory
                self._refusals.clear()
            self._refusals[key] = refusal(self._kinds[name], t)
        return self._refusals[key]

    def _arrow_column(self, name: str, t: pa.DataType) -> str | None:
        """Why an Arrow column `name` of type `t` cannot be taken (refused by training, or not the same values once
        cast to the model's type), or None; remembered per column and type, like `refusal`."""
        key = ("arrow", name, t)
        if key not in self._refusals:
            why = self.refusal(name, t)
            want = self.schema.field(name).type
            if why is None and not _same_values(t, want):
                why = (f"has type {t}, which does not convert to the {want} the model read in training (a cast "
                       "would parse or format the values: training hashes string ids and takes integer ids as rows)")
            self._refusals[key] = why
        return self._refusals[key]

    @classmethod
    def of(cls, manifest: dict[str, Any], source: str = "manifest.json") -> RowSchema:
        """The row schema of an artifact, from its manifest (pipeline/serving/export.py writes it)."""
        spec = from_dict(FeatureSpec, manifest["features"], source=source, where="features")
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(manifest["arrow_schema"])))
        return cls(spec, schema, manifest["max_list_len"])

    # -- JSON rows -----------------------------------------------------------------------------------------------

    def table_of(self, rows: list[dict[str, Any]], *, max_rows: int = 0) -> pa.Table:
        """Raw request rows as an Arrow table of the training types; BadRows if a row is not a row of the spec."""
        if not isinstance(rows, list) or not rows:
            raise BadRows(["rows: expected a non-empty list of objects"])
        if max_rows and len(rows) > max_rows:
            raise BadRows([f"rows: {len(rows)} rows, more than the {max_rows} one request may hold"])
        # the common case in one comparison per row (a dict's keys against a set); the rows' problems else
        if not all(isinstance(row, dict) and row.keys() == self._known for row in rows):
            raise BadRows(self._field_problems(rows))
        columns, problems = {}, []
        for name in self.features:
            column = self._column(name, [row[name] for row in rows])
            if isinstance(column, list):
                problems += column
            else:
                columns[name] = column
        if problems:
            raise BadRows(problems)
        return self._table(columns, len(rows))

    def _field_problems(self, rows: list) -> list[str]:
        problems = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                problems.append(f"row {i}: expected an object of feature -> value, got {type(row).__name__}")
                continue
            problems += [f"row {i}: unknown field {k!r}" for k in row if k not in self._known]
            problems += [f"row {i}: missing field {k!r}" for k in self.features if k not in row]
        return problems

    def _column(self, name: str, values: list) -> pa.Array | list[str]:
        """One field of the rows as an array of the type training read, or the problems of the rows whose value
        cannot be one: a value of a type training refuses for the column (schema.refusal: a float or a bool id, a
        bool or a string number), or one that does not convert to the training type (a string for an integer id).

        The JSON values' own types are checked, not what Arrow makes of them given the training type: it
        truncates 3.99 to the id 3 and takes true as the number 1.0."""
        want, kind = self.schema.field(name).type, self._kinds[name]
        try:
            given = pa.array(values)  # the common case, one call: integer ids, lists of them, strings, numbers
        except _NOT_CONVERTED:
            return _row_type_problems(values, name, kind, want)
        if self.refusal(name, _nulls_as(given.type, want)) is not None:
            return _row_type_problems(values, name, kind, want)
        if given.type == want:
            return given
        try:
            return pa.array(values, type=want)  # ints for floats, float64 for float32, lists for fixed-size lists
        except _NOT_CONVERTED:
            return _row_type_problems(values, name, kind, want)

    # -- Arrow tables --------------------------------------------------------------------------------------------

    def from_arrow(self, table: pa.Table, *, max_rows: int = 0) -> pa.Table:
        """An Arrow request as a table of the training types. Its columns are the features, each once (BadRows
        names a missing, unknown or repeated column), of a type training accepts for it (refused in the words
        check_schema gives a log file), converted to the type the model read (an int32 id column is an int64 one;
        a string id column for an integer one does not convert: strings are hashed, integers are rows)."""
        problems = []
        if table.num_rows == 0:
            problems.append("rows: expected at least one row, got none")
        elif max_rows and table.num_rows > max_rows:
            problems.append(f"rows: {table.num_rows} rows, more than the {max_rows} one request may hold")
        counts = Counter(table.column_names)
        problems += [f"column {c!r}: given {n} times" for c, n in counts.items() if n > 1]
        problems += [f"unknown column {c!r}" for c in counts if c not in self._known]
        problems += [f"missing column {c!r}" for c in self.features if c not in counts]
        columns = {}
        for name in self.features:
            if counts.get(name) != 1:
                continue
            given, want = table.schema.field(name).type, self.schema.field(name).type
            why = self._arrow_column(name, given)
            if why is not None:
                problems.append(f"column {name!r}: {why}")
                continue
            try:
                columns[name] = table.column(name) if given == want else table.column(name).cast(want)
            except _NOT_CONVERTED as e:
                problems.append(f"column {name!r}: has type {given}, which does not convert to the {want} the model "
                                f"read in training ({e})")
        if problems:
            raise BadRows(problems)
        return self._table(columns, table.num_rows)

    # -- both ----------------------------------------------------------------------------------------------------

    def _table(self, columns: dict[str, pa.Array | pa.ChunkedArray], num_rows: int) -> pa.Table:
        """The features, then the label, query id and oracle as zeros: one schema for every request, whatever its
        form, so that the requests of a batch concatenate."""
        zeros = self._zeros.get(num_rows)
        if zeros is None:  # made once per request size (requests of one client tend to have one)
            if len(self._zeros) > 64:
                self._zeros.clear()
            zeros = self._zeros[num_rows] = {name: pa.array(np.zeros(num_rows), type=self.schema.field(name).type)
                                             for name in self._not_features}
        return pa.table({**columns, **zeros})

    def with_neutral_columns(self, table: pa.Table) -> pa.Table:
        """`table` (the features) with the label, query id and oracle as zeros where absent."""
        for name in self._not_features:
            if name not in table.column_names:
                table = table.append_column(name, pa.array(np.zeros(table.num_rows),
                                                           type=self.schema.field(name).type))
        return table

    def verdict(self, table: pa.Table) -> RowVerdict:
        """The training reader's validation of every row of `table` (the same checks and reasons)."""
        return validate_rows(self.with_neutral_columns(table), self.spec, max_list_len=self.max_list_len)

    def bad_rows(self, table: pa.Table) -> dict[int, str]:
        """{row: "field 'x': reason"} for every row of `table` the training reader's validation refuses."""
        return explain(self.verdict(table))


def explain(verdict: RowVerdict) -> dict[int, str]:
    """{row: "field 'x': reason"} of the rows a verdict refuses."""
    return {int(r): f"field {verdict.column_B[r]!r}: {REASONS[verdict.reason_code_B[r] - 1]}"
            for r in np.flatnonzero(verdict.reason_code_B)}


def _row_type_problems(values: list, name: str, kind: ColumnKind, want: pa.DataType) -> list[str]:
    """The rows whose value of field `name` is of a type `kind` refuses, or does not convert to `want`."""
    problems = []
    for i, value in enumerate(values):
        if value is None:
            continue  # a null: validation names it, as it does in the logs
        try:
            why = refusal(kind, _nulls_as(pa.array([value]).type, want))
            if why is None:
                pa.array([value], type=want)
        except _NOT_CONVERTED:
            why = f"is not a {want}"
        if why is not None:
            problems.append(f"row {i}: field {name!r}: {_shown(value)} {why}")
    # the rows' values fit one by one but not together (a type no single value has): never a column half made
    return problems or [f"field {name!r}: the rows' values do not make one column of type {want}"]


def _strings(t: pa.DataType) -> bool:
    t = t.value_type if pa.types.is_dictionary(t) else t
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _same_values(t: pa.DataType, want: pa.DataType) -> bool:
    """Whether an Arrow column of type `t` cast to `want` holds the values training would have read from it:
    numbers to numbers, strings (dictionary-encoded or not) to strings, lists of them to lists; never strings to
    numbers or back (a cast parses or formats them; training hashes string ids and takes integers as rows)."""
    if is_list(t) and is_list(want):
        return _same_values(t.value_type, want.value_type)
    numeric = (pa.types.is_integer, pa.types.is_floating)
    if any(f(want) for f in numeric):
        return pa.types.is_null(t) or any(f(t) for f in numeric)
    return pa.types.is_null(t) or (_strings(t) and _strings(want))


def _nulls_as(t: pa.DataType, want: pa.DataType) -> pa.DataType:
    """`t` with the null type of all-null values (and of the elements of empty lists) taken as `want`'s: nulls are
    not a type training refuses, but a value validation refuses."""
    if pa.types.is_null(t):
        return want
    if is_list(t) and is_list(want):
        return pa.list_(_nulls_as(t.value_type, want.value_type))
    return t


def _shown(value: Any) -> str:
    """A request's value as JSON spells it, cut short (an over-long list is not echoed back whole)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = reprlib.repr(value)  # bounded depth: a value nested too deeply for json.dumps
    return text if len(text) <= 60 else text[:57] + "..."
