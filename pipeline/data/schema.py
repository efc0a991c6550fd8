"""Which Arrow types each kind of column accepts: the one definition that validation and conversion share.

    kinds = column_kinds(spec)                     # column -> ColumnKind, for every column the spec reads
    kinds["click"].accepts(pa.float64())           # True: 0.0/1.0 labels are labels
    check_type(kinds["click"], arr.type, source="part-0.parquet", column="click")   # ValueError if refused

pipeline/data/validate.py refuses a file whose column types are not accepted (check_schema, before any row is
decoded); pipeline/data/convert.py refuses the same types with the same message, so a table that passes the schema
check always converts, and one that fails it never half-converts. The scoring server holds each value of a request
to the same rule (`refusal`): a float id is refused in a request as a float64 id column is in the logs. Values (0/1
labels, finite floats, id ranges, list lengths) are checked row by row in those modules, not here; what counts as a
null value (`nulls`) is defined here, for both. A column read in two roles (the group column that is also a sparse
feature) takes the types both roles accept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hyrank.pipeline.data import features
from hyrank.pipeline.data.features import DenseFeature, FeatureSpec


def is_list(t: pa.DataType) -> bool:
    """A list, large list or fixed-size list (the list types every list column may use)."""
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def nulls(arr: pa.Array) -> np.ndarray:
    """(len(arr),) bool: the null values of `arr`, counting a valid index to a null entry of a dictionary as null.

    Arrow's `null_count` of a dictionary array counts only null indices, so a null string behind a valid index
    would pass a null_count check and then fail to hash (or decode as garbage) in the converter."""
    if arr.null_count or (pa.types.is_dictionary(arr.type) and arr.dictionary.null_count):
        return arr.is_null().to_numpy(zero_copy_only=False)  # is_null() of a dictionary array follows the values
    return np.zeros(len(arr), dtype=bool)


def plain(arr: pa.Array) -> pa.Array:
    """`arr` with a dictionary encoding decoded (its values as a plain array)."""
    return arr.dictionary_decode() if pa.types.is_dictionary(arr.type) else arr


def list_lengths(arr: pa.Array) -> np.ndarray:
    """(len(arr),) int64: the length of each list of `arr`, 0 for a null list."""
    return pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _decoded(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def is_id(t: pa.DataType) -> bool:
    """An integer or string id, plain or dictionary-encoded (strings are hashed)."""
    t = _decoded(t)
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def is_string_id(t: pa.DataType) -> bool:
    """Ids that are hashed into a table (strings), as opposed to integers taken as row numbers."""
    t = _decoded(t.value_type if is_list(t) else t)
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def is_number(t: pa.DataType) -> bool:
    """A float or an integer (a dense value; bools and decimals are not numbers here)."""
    return pa.types.is_floating(t) or pa.types.is_integer(t)


@dataclass(frozen=True)
class ColumnKind:
    """A role a column plays in the feature spec, and the Arrow types that can hold it."""

    name: str
    description: str  # what the column must hold, as error messages say it
    accepts: Callable[[pa.DataType], bool]


LABEL = ColumnKind("label", "0/1 integers, bools or floats",
                   lambda t: pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_floating(t))
GROUP = ColumnKind("group", "integer or string ids", is_id)
SPARSE = ColumnKind("sparse", "integer or string ids, or lists of them",
                    lambda t: is_id(t) or (is_list(t) and is_id(t.value_type)))
SEQUENCE = ColumnKind("sequence", "list<int64> ids (or ids in another integer list type)",
                      lambda t: is_list(t) and pa.types.is_integer(t.value_type))
DENSE = ColumnKind("dense", "one float or integer per row", is_number)
ORACLE = ColumnKind("oracle", "floats", pa.types.is_floating)
MATCH_CANDIDATE = ColumnKind("match candidate", SPARSE.description, SPARSE.accepts)


def dense_list(size: int) -> ColumnKind:
    """A dense feature of `size` > 1 values: a list of numbers (a fixed-size list must have that size)."""
    return ColumnKind("dense list", f"lists of {size} floats or integers",
                      lambda t: is_list(t) and is_number(t.value_type)
                      and (not pa.types.is_fixed_size_list(t) or t.list_size == size))


def dense_kind(f: DenseFeature) -> ColumnKind:
    """A scalar column for a feature of size 1, a list column for a wider one."""
    return DENSE if f.size == 1 else dense_list(f.size)


def column_kinds(spec: FeatureSpec) -> dict[str, ColumnKind]:
    """Every column the spec reads -> its kind; a column read in two roles (FeatureSpec.column_roles) takes the
    types both accept."""
    dense = spec.dense_by_name
    by_role = {features.LABEL: LABEL, features.GROUP: GROUP, features.ORACLE: ORACLE, features.SPARSE: SPARSE,
               features.SEQUENCE: SEQUENCE, features.CANDIDATE: MATCH_CANDIDATE}
    kinds = {}
    for column, roles in spec.column_roles().items():
        found: dict[str, ColumnKind] = {}
        for role in roles:
            if role == features.CANDIDATE and features.SPARSE in roles:
                continue  # a sparse feature's types are a candidate's
            kind = dense_kind(dense[column]) if role == features.DENSE else by_role[role]
            found.setdefault(kind.name, kind)  # the candidate of several match features counts once
        kinds[column] = both(*found.values()) if len(found) > 1 else next(iter(found.values()))
    return kinds


def both(*kinds: ColumnKind) -> ColumnKind:
    """The kind of a column read in several roles: the types every one of them accepts."""
    return ColumnKind(" and ".join(k.name for k in kinds), " and ".join(f"{k.description} ({k.name})" for k in kinds),
                      lambda t: all(k.accepts(t) for k in kinds))


def refusal(kind: ColumnKind, t: pa.DataType) -> str | None:
    """Why `kind` refuses values of type `t`, or None if it accepts them: the words check_type raises for a log
    file's column, and the scoring server gives for a request's value (pipeline/serving/artifact.py)."""
    if kind.accepts(t):
        return None
    shown = str(t) if len(str(t)) <= 80 else str(t)[:77] + "..."  # a JSON value nested 900 deep has such a type
    return f"has type {shown}, but the feature spec reads it as a {kind.name} column, which holds {kind.description}"


def check_type(kind: ColumnKind, t: pa.DataType, *, source: str, column: str) -> None:
    """Raise ValueError naming `source`, the column and its type if `kind` does not accept `t`."""
    why = refusal(kind, t)
    if why is not None:
        raise ValueError(f"{source}: column {column!r} {why}")
