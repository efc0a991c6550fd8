"""A published model: what a serving process loads, without hyrank's training code or the training world.

    artifact = Artifact.load("exports/default")          # the version `latest` names (or a version folder itself)
    probs = artifact.score_rows([{"user_id": 3, ...}])   # raw rows in the feature-spec format -> P(click)
    probs = artifact.score_table(table)                  # the same from an Arrow table (batch scoring)

An artifact folder (`<root>/versions/<version>/`, written by pipeline/serving/export.py) holds:
  model.pt2      a torch.export program: model inputs (the converter's tensors) -> logits, dynamic batch size
  manifest.json  model name and options, the feature spec and the Arrow types of its columns, days trained,
                 metrics, the stack's versions, the git commit, the parity check it passed, sha256 of every file

Requests go through the training path: raw rows -> the Arrow types training read (a value of a type training refuses
for its column, such as a float or a bool id, is refused with the words check_schema gives a log file:
pipeline/data/schema.py `refusal`) -> validate_rows (the same checks, and the same reasons, as the training
reader's) -> BatchConverter (id hashing and OOV policy, dense normalisation, sequence truncation and order) -> the
exported program. Nothing is re-implemented for serving, so there is no training/serving skew to drift in. Loading
verifies every file's sha256 before torch.export reads it.

Imports torch, torchrec (the program holds torchrec's ops) and pipeline.data, never pipeline.train
(tests/test_layering.py).
"""

from __future__ import annotations

import base64
import json
import re
import reprlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from hyrank.pipeline.config import from_dict
from hyrank.pipeline.data.convert import BatchConverter
from hyrank.pipeline.data.features import FeatureSpec
from hyrank.pipeline.data.schema import ColumnKind, column_kinds, is_list, refusal
from hyrank.pipeline.data.validate import REASONS, validate_rows
from hyrank.pipeline.files import sha256

MANIFEST = "manifest.json"
PROGRAM = "model.pt2"
FORMAT_VERSION = 1
_NOT_CONVERTED = (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError)
# torch.export.load deserializes through one global of torch's (_CURRENT_DESERIALIZER): two loads at once in one
# process (two servers' loader threads) fail one of them with "already set"
_LOADING = threading.Lock()


class NoSuchVersion(FileNotFoundError):
    """A publish root's `latest` names no published version (a broken publish, or a hand edit)."""

    def __init__(self, pointer: Path, name: str):
        super().__init__(f"{pointer} names {name!r}, which is not a published version under {pointer.parent}")
        self.pointer, self.name = pointer, name


class BadRows(ValueError):
    """Rows a model cannot score; `problems` names each row, field and reason."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems[:20]) + (f"; ... ({len(problems)} problems)" if len(problems) > 20 else ""))
        self.problems = problems


@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]
    program: torch.nn.Module
    spec: FeatureSpec
    schema: pa.Schema  # of the spec's columns, as training read them

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def __post_init__(self) -> None:
        # the columns a request row carries: the spec's columns but the label, the query id and the oracle, unless
        # one of those is also a feature (group = "user_id"): then the request carries it, and it is not zeroed
        self.features = self.spec.input_columns()
        self._not_features = set(self.spec.columns()) - set(self.features)
        self._kinds = column_kinds(self.spec)  # the types training accepts for each column (pipeline/data/schema.py)

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        """The artifact at `path`: a version folder, or a publish root whose `latest` names one."""
        path = resolve(path)
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path / MANIFEST}: artifact format {manifest.get('format')}, this code reads "
                             f"{FORMAT_VERSION}")
        for name, digest in manifest["files"].items():
            if sha256(path / name) != digest:
                raise ValueError(f"{path / name} does not match the sha256 in its manifest: the artifact is damaged")
        spec = from_dict(FeatureSpec, manifest["features"], source=str(path / MANIFEST), where="features")
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(manifest["arrow_schema"])))
        with _LOADING:
            program = torch.export.load(str(path / PROGRAM)).module()
        return cls(path, manifest, program, spec, schema)

    # -- scoring -------------------------------------------------------------------------------------------------

    def score_rows(self, rows: list[dict[str, Any]], *, max_rows: int = 0) -> np.ndarray:
        """P(click) of each raw row (a dict of feature -> value); BadRows names every bad field of every row."""
        return self.score_table(self.table_of(rows, max_rows=max_rows))

    def table_of(self, rows: list[dict[str, Any]], *, max_rows: int = 0) -> pa.Table:
        """Raw request rows as an Arrow table of the training types; BadRows if a row is not a row of the spec."""
        if not isinstance(rows, list) or not rows:
            raise BadRows(["rows: expected a non-empty list of objects"])
        if max_rows and len(rows) > max_rows:
            raise BadRows([f"rows: {len(rows)} rows, more than the {max_rows} one request may hold"])
        problems = []
        known = set(self.features)
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                problems.append(f"row {i}: expected an object of feature -> value, got {type(row).__name__}")
                continue
            problems += [f"row {i}: unknown field {k!r}" for k in row if k not in known]
            problems += [f"row {i}: missing field {k!r}" for k in self.features if k not in row]
        if problems:
            raise BadRows(problems)
        columns = {}
        for name in self.features:
            column = self._column(name, [row[name] for row in rows])
            if isinstance(column, list):
                problems += column
            else:
                columns[name] = column
        if problems:
            raise BadRows(problems)
        return self._with_neutral_columns(pa.table(columns))

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
        if refusal(kind, _nulls_as(given.type, want)) is not None:
            return _row_type_problems(values, name, kind, want)
        if given.type == want:
            return given
        try:
            return pa.array(values, type=want)  # ints for floats, float64 for float32, lists for fixed-size lists
        except _NOT_CONVERTED:
            return _row_type_problems(values, name, kind, want)

    def score_table(self, table: pa.Table) -> np.ndarray:
        """P(click) of every row of `table` (the spec's feature columns); BadRows names the rows validation
        refuses, with the reason, as the training reader would have counted them."""
        logits = self.logits(table)
        return torch.sigmoid(logits).numpy()

    def _with_neutral_columns(self, table: pa.Table) -> pa.Table:
        """`table` with the label, query id and oracle (not data at serving time) as zeros where absent: validation
        and the converter read them."""
        for name in self._not_features:
            if name not in table.column_names:
                table = table.append_column(name, pa.array(np.zeros(table.num_rows),
                                                           type=self.schema.field(name).type))
        return table

    def bad_rows(self, table: pa.Table) -> dict[int, str]:
        """{row: "field 'x': reason"} for every row of `table` the training reader's validation refuses (the same
        checks and reasons)."""
        table = self._with_neutral_columns(table)
        verdict = validate_rows(table, self.spec, max_list_len=self.manifest["max_list_len"])
        return {int(r): f"field {verdict.column_B[r]!r}: {REASONS[verdict.reason_code_B[r] - 1]}"
                for r in np.flatnonzero(~verdict.good_B)}

    @torch.no_grad()
    def logits(self, table: pa.Table) -> torch.Tensor:
        bad = self.bad_rows(table)
        if bad:
            raise BadRows([f"row {r}: {problem}" for r, problem in bad.items()])
        table = self._with_neutral_columns(table)
        if table.num_rows == 1:  # torch.export specialises sizes 0 and 1 away from a dynamic batch size: a lone row
            return self.logits(pa.concat_tables([table, table]))[:1]  # is scored beside a copy (rows are independent)
        converter = BatchConverter(self.spec)
        return self.program(*model_inputs(converter(table, source="request"))).float()


def model_inputs(batch) -> tuple[torch.Tensor, ...]:
    """The exported program's inputs, from a Batch: pooled ids and lengths, sequence ids and lengths, dense."""
    return (batch.pooled.values(), batch.pooled.lengths(), batch.sequence.values(), batch.sequence.lengths(),
            batch.dense)


def resolve(path: str | Path) -> Path:
    """A version folder, or the one a publish root's `latest` names (never a path out of the root)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    pointer = path / "latest"
    if not pointer.is_file():
        raise FileNotFoundError(f"{path}: neither an artifact (no {MANIFEST}) nor a publish root (no latest)")
    name = pointer.read_text().strip()
    if not re.fullmatch(r"[\w.-]+", name) or not (path / "versions" / name / MANIFEST).is_file():
        raise NoSuchVersion(pointer, name)
    return path / "versions" / name


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
