"""Validation of logs against the feature spec.

`check_schema` runs when a file is opened: a missing or wrongly typed column fails at once, naming the file and
the column, before any row is decoded.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline.features import FeatureSpec


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_id(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_float(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t)


def expected_types(spec: FeatureSpec) -> dict[str, tuple[str, callable]]:
    """column -> (description, predicate on its Arrow type)."""
    want: dict[str, tuple[str, callable]] = {
        spec.label: ("0/1 integer or bool", lambda t: pa.types.is_integer(t) or pa.types.is_boolean(t)),
    }
    if spec.group:
        want[spec.group] = ("integer or string id", _is_id)
    if spec.oracle:
        want[spec.oracle] = ("float", pa.types.is_floating)
    for f in spec.sparse:
        want[f.name] = ("integer/string id or a list of them", lambda t: _is_id(t) or (_is_list(t) and _is_id(t.value_type)))
    for f in spec.dense:
        if f.size == 1:
            want[f.name] = ("float", _is_float)
        else:
            want[f.name] = (f"list of {f.size} floats", lambda t: _is_list(t) and _is_float(t.value_type))
    for s in spec.sequences:
        for c in s.columns:
            want[c] = ("list<int64>", lambda t: _is_list(t) and pa.types.is_integer(t.value_type))
    return want


def check_schema(spec: FeatureSpec, schema: pa.Schema, source: str) -> None:
    """Raise ValueError naming `source` and the column if a declared column is missing or of the wrong type."""
    for column, (description, ok) in expected_types(spec).items():
        idx = schema.get_field_index(column)
        if idx < 0:
            raise ValueError(f"{source}: missing column {column!r} declared in the feature spec")
        t = schema.field(idx).type
        if not ok(t):
            raise ValueError(f"{source}: column {column!r} has type {t}, the feature spec needs {description}")
