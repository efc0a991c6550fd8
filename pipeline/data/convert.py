"""Arrow table -> Batch, vectorised: KJT lengths/values come straight from Arrow list offsets and values.

    convert = BatchConverter(spec, sequence_feed=model.sequence_feed)   # default: the plain lookup's feed
    batch = convert(table, source="day=2026-11-01/part-00000.parquet", first_row=0)

No per-row Python. A column of a type its kind refuses raises the ValueError validation raises for it
(pipeline/data/schema.py). Bad values raise ValueError naming the source, the column and the first bad row (row
numbers count from `first_row`, so a message points into the file); the reader's validation stage
(pipeline/data/validate.py) refuses every value raised on here, and drops and quarantines those rows before they
get here (tests/test_bad_input.py holds the two to that). Sequences leave through the model's `sequence_feed`
(embeddings.dedup.SequenceFeed): as they are, or as distinct ids plus a DedupIndex when the model deduplicates.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec import KeyedJaggedTensor

from embeddings.dedup import SequenceFeed
from pipeline.data.batch import Batch
from pipeline.data.features import DenseFeature, FeatureSpec, OOVPolicy, SequenceFeature
from pipeline.data.schema import (GROUP, LABEL, ORACLE, SEQUENCE, SPARSE, ColumnKind, check_type, dense_kind, is_list,
                                  is_string_id, nulls)


class BatchConverter:
    """Turns Arrow tables holding the spec's columns into Batches."""

    def __init__(self, spec: FeatureSpec, *, sequence_feed: SequenceFeed | None = None):
        """`sequence_feed`: the model's (RankingModel.sequence_feed); None: the plain lookup's, for batches that
        no deduplicating model reads."""
        self.spec = spec
        self.layout = spec.embedding_layout()
        self.sequence_feed = self.layout.sequence_feed(dedup=False) if sequence_feed is None else sequence_feed
        if self.sequence_feed.table_of != self.layout.ec_table_of:
            raise ValueError(f"the sequence feed reads {self.sequence_feed.table_of}, but this feature spec's "
                             f"sequence lookups are {self.layout.ec_table_of}: the model was built from another spec")
        self._num_rows = {t.name: t.num_embeddings for t in spec.tables}

    def __call__(self, table: pa.Table, *, source: str = "<table>", first_row: int = 0,
                 id_max: Mapping[str, int] | None = None) -> Batch:
        """`id_max`: per integer id column, a bound such that every id of `table` is in [0, id_max] (the reader's
        validation proves it: pipeline.data.validate.RowVerdict.id_max); such columns skip the range pass over
        their ids."""
        ctx = _Ctx(source, first_row)
        id_max = id_max or {}
        jagged: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for f in self.spec.sparse:
            jagged[f.name] = ids_column(table.column(f.name), self._num_rows[f.table], f.oov, ctx.at(f.name),
                                        kind=SPARSE, known_max=id_max.get(f.name))
        for seq in self.spec.sequences:
            jagged.update(self._sequence(table, seq, ctx, id_max))
        sequence = self.sequence_feed(_kjt(self.layout.ec_features, jagged))
        return Batch(
            pooled=_kjt(self.layout.ebc_features, jagged),
            sequence=sequence.kjt,
            sequence_index=sequence.index,
            dense=self._dense(table, ctx),
            labels=labels_column(table.column(self.spec.label), ctx.at(self.spec.label)),
            group_ids=self._groups(table, ctx),
            oracle_p=self._oracle(table, ctx),
        )

    def _sequence(self, table: pa.Table, seq: SequenceFeature, ctx: "_Ctx",
                  id_max: Mapping[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        ids_lengths = None
        for column in seq.columns:
            col_ctx = ctx.at(column)
            lengths, values = ids_column(table.column(column), self._num_rows[seq.table_of(column)],
                                         seq.oov_of(column), col_ctx, kind=SEQUENCE, known_max=id_max.get(column))
            if ids_lengths is None:
                ids_lengths = lengths
            elif not np.array_equal(lengths, ids_lengths):
                row = int(np.flatnonzero(lengths != ids_lengths)[0])
                raise col_ctx.error(row, f"has {lengths[row]} events but {seq.ids!r} has {ids_lengths[row]}")
            out[column] = truncate_recent(lengths, values, seq.max_len, seq.order)
        return out

    def _dense(self, table: pa.Table, ctx: "_Ctx") -> torch.Tensor:
        cols = [dense_column(table.column(f.name), f, ctx.at(f.name)) for f in self.spec.dense_order]
        if not cols:
            return torch.zeros(table.num_rows, 0)
        return torch.from_numpy(np.concatenate(cols, axis=1))

    def _groups(self, table: pa.Table, ctx: "_Ctx") -> torch.Tensor:
        if self.spec.group is None:
            return torch.zeros(table.num_rows, dtype=torch.int64)
        arr = _checked(table.column(self.spec.group), GROUP, ctx.at(self.spec.group))
        return torch.from_numpy(_as_int64(arr).copy())

    def _oracle(self, table: pa.Table, ctx: "_Ctx") -> torch.Tensor | None:
        if self.spec.oracle is None:
            return None
        arr = _checked(table.column(self.spec.oracle), ORACLE, ctx.at(self.spec.oracle))
        return torch.from_numpy(arr.to_numpy(zero_copy_only=False).astype(np.float32))


class _Ctx:
    """Where a value came from, for error messages."""

    def __init__(self, source: str, first_row: int, column: str | None = None):
        self.source, self.first_row, self.column = source, first_row, column

    def at(self, column: str) -> "_Ctx":
        return _Ctx(self.source, self.first_row, column)

    def error(self, row: int, what: str) -> ValueError:
        return ValueError(f"{self.source}: column {self.column!r}, row {self.first_row + row}: {what}")


def _combine(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """One Array; zero-copy for a single chunk (a slice of one row group), where combine_chunks would copy."""
    if not isinstance(col, pa.ChunkedArray):
        return col
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _checked(col: pa.ChunkedArray | pa.Array, kind: ColumnKind, ctx: _Ctx) -> pa.Array:
    """The column as one Array, once its type is one `kind` accepts and it holds no null row."""
    arr = _combine(col)
    check_type(kind, arr.type, source=ctx.source, column=ctx.column)
    null = nulls(arr)  # a null dictionary entry too: it would not hash
    if null.any():
        raise ctx.error(int(np.flatnonzero(null)[0]), "is null")
    return arr


def _list_offsets(arr: pa.Array) -> np.ndarray:
    """(B+1,) offsets of each row's values in `arr.flatten()` (a fixed-size list stores none)."""
    if pa.types.is_fixed_size_list(arr.type):
        return np.arange(len(arr) + 1, dtype=np.int64) * arr.type.list_size
    offsets = arr.offsets.to_numpy()  # of a slice: they start where the slice does, flatten() at 0
    return offsets - offsets[0]


def stable_hash(strings: pa.Array) -> np.ndarray:
    """A process- and platform-independent 63-bit hash of each string (blake2b), one Python call per distinct value."""
    encoded = pc.dictionary_encode(strings)
    digests = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") >> 1
               for s in encoded.dictionary.to_pylist()]
    return np.asarray(digests, dtype=np.int64)[encoded.indices.to_numpy(zero_copy_only=False)]


def _as_int64(values: pa.Array) -> np.ndarray:
    """Ids of an id-typed array (schema.is_id): integers as they are, strings hashed."""
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if pa.types.is_integer(values.type):
        return values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    return stable_hash(values)


def ids_column(col: pa.ChunkedArray | pa.Array, num_embeddings: int, oov: OOVPolicy, ctx: _Ctx, *,
               kind: ColumnKind, known_max: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(lengths (B,), values (N,)) int64 ids of a scalar or list id column, mapped into [0, num_embeddings).

    `kind`: SPARSE or SEQUENCE (pipeline/data/schema.py). `known_max`: the ids are known to lie in
    [0, known_max] (validated); if that is inside the table, they are returned as they are without another pass.
    """
    arr = _checked(col, kind, ctx)
    if is_list(arr.type):
        offsets = _list_offsets(arr)
        lengths = np.diff(offsets).astype(np.int64)
        flat = arr.flatten()  # respects slice offsets, unlike .values
        null = nulls(flat)
        if null.any():
            event = int(np.flatnonzero(null)[0])
            raise ctx.error(int(np.searchsorted(offsets, event, side="right") - 1), "holds a null id")
        values = _as_int64(flat)
    else:
        lengths = np.ones(len(arr), dtype=np.int64)
        values = _as_int64(arr)
    hashed = is_string_id(arr.type)
    if known_max is not None and not hashed and known_max < num_embeddings:
        return lengths, values
    return lengths, map_ids(values, lengths, num_embeddings, oov, ctx, hashed=hashed)


def map_ids(values: np.ndarray, lengths: np.ndarray, num_embeddings: int, oov: OOVPolicy, ctx: _Ctx,
            *, hashed: bool = False) -> np.ndarray:
    """Apply the out-of-range policy: `hash` takes ids modulo the table size, `error` refuses them."""
    low, high = _min_max(values)
    if not hashed and low < 0:
        raise ctx.error(_row_of(np.flatnonzero(values < 0)[0], lengths), f"negative id {values[values < 0][0]}")
    if 0 <= low and high < num_embeddings:  # the common case: skip the modulo, a division per id
        return values
    if hashed or oov == "hash":
        return np.mod(values, num_embeddings)
    bad = values >= num_embeddings
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ctx.error(_row_of(first, lengths), f"id {values[first]} >= table size {num_embeddings} (oov = 'error')")
    return values


def _min_max(values: np.ndarray) -> tuple[int, int]:
    """(min, max) in one pass without the GIL (Arrow's kernel on a zero-copy view); numpy takes two passes."""
    if not values.size:
        return 0, 0
    low, high = pc.min_max(pa.array(values)).values()
    return int(low.as_py()), int(high.as_py())


def _row_of(event: int, lengths: np.ndarray) -> int:
    return int(np.searchsorted(np.cumsum(lengths), event, side="right"))


def truncate_recent(lengths: np.ndarray, values: np.ndarray, max_len: int,
                    order: str = "newest_last") -> tuple[np.ndarray, np.ndarray]:
    """Keep each row's `max_len` most recent events, returned oldest first."""
    if order == "newest_last" and (lengths.size == 0 or lengths.max() <= max_len):
        return lengths, values  # nothing to cut: skip the gather
    kept = np.minimum(lengths, max_len)
    in_starts = np.cumsum(lengths) - lengths
    out_starts = np.cumsum(kept) - kept
    # index[p] for output position p = out_start + w (w = 0..kept-1 in a row) is one shift per row plus or minus
    # p: two passes over the events (repeat, add) before the gather
    if order == "newest_last":  # the most recent are the last `kept`: in_start + (length - kept) + w
        index = np.arange(int(kept.sum()), dtype=np.int64)
        index += np.repeat(in_starts + (lengths - kept) - out_starts, kept)
    else:  # newest first: the most recent are the first `kept`, reversed to oldest first: in_start + kept - 1 - w
        index = np.repeat(in_starts + kept - 1 + out_starts, kept)
        index -= np.arange(int(kept.sum()), dtype=np.int64)
    return kept, values[index]


def dense_column(col: pa.ChunkedArray | pa.Array, f: DenseFeature, ctx: _Ctx) -> np.ndarray:
    """(B, size) float32, normalised; NaN/Inf and wrong list sizes are errors, never zeroed."""
    arr = _checked(col, dense_kind(f), ctx)
    if is_list(arr.type):
        lengths = np.diff(_list_offsets(arr))
        if (lengths != f.size).any():
            row = int(np.flatnonzero(lengths != f.size)[0])
            raise ctx.error(row, f"must hold {f.size} floats per row (dense size), got {lengths[row]}")
        flat = arr.flatten()
        null = nulls(flat)
        if null.any():  # named here: to_numpy would make it a NaN, and the message a wrong one
            raise ctx.error(int(np.flatnonzero(null)[0]) // f.size, "holds a null value")
        values = flat.to_numpy(zero_copy_only=False).reshape(-1, f.size)
    else:
        values = arr.to_numpy(zero_copy_only=False).reshape(-1, 1)
    with np.errstate(over="ignore"):  # a float64 beyond float32 becomes Inf, refused just below
        values = values.astype(np.float32)
    bad = ~np.isfinite(values)
    if bad.any():
        raise ctx.error(int(np.flatnonzero(bad.any(axis=1))[0]), "holds NaN or Inf")
    if f.norm == "log1p":
        if (values < 0).any():
            raise ctx.error(int(np.flatnonzero((values < 0).any(axis=1))[0]), "is negative but norm = 'log1p'")
        values = np.log1p(values)
    elif f.norm == "standard":
        values = (values - f.mean) / f.std
    return values


def labels_column(col: pa.ChunkedArray | pa.Array, ctx: _Ctx) -> torch.Tensor:
    """(B,) float32 labels; any value but 0 and 1 (NaN included) is an error."""
    arr = _checked(col, LABEL, ctx)
    y = arr.to_numpy(zero_copy_only=False).astype(np.float32)
    bad = (y != 0) & (y != 1)
    if bad.any():
        raise ctx.error(int(np.flatnonzero(bad)[0]), f"label {y[bad][0]} is not 0 or 1")
    return torch.from_numpy(y)


def _kjt(keys: list[str], jagged: dict[str, tuple[np.ndarray, np.ndarray]]) -> KeyedJaggedTensor:
    if not keys:
        return KeyedJaggedTensor.empty(values_dtype=torch.int64, lengths_dtype=torch.int64)
    lengths = np.concatenate([jagged[k][0] for k in keys])
    values = np.concatenate([jagged[k][1] for k in keys])
    return KeyedJaggedTensor(keys=list(keys), values=torch.from_numpy(values), lengths=torch.from_numpy(lengths))
