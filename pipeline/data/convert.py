"""Arrow table -> Batch, vectorised: KJT lengths/values come straight from Arrow list offsets and values.

    convert = BatchConverter(spec, sequence_feed=model.sequence_feed)   # default: the plain lookup's feed
    batch = convert(table, source="day=2026-11-01/part-00000.parquet", first_row=0)

No per-row Python. A column of a type its kind refuses raises the ValueError validation raises for it
(pipeline/data/schema.py). Bad values raise ValueError naming the source, the column and the first bad row (row
numbers count from `first_row`, so a message points into the file); the reader's validation stage
(pipeline/data/validate.py) refuses every value raised on here, and drops and quarantines those rows before they
get here (tests/test_bad_input.py holds the two to that). Sequences leave through the model's `sequence_feed`
(embeddings.dedup.SequenceFeed): as they are, or as distinct ids plus a DedupIndex when the model deduplicates.
Match features (pipeline.data.features.MatchFeature) are computed here, from the same truncated events the model
sees, into their columns of Batch.dense (`match_stats`: one bincount over the events, no per-row Python).
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec import KeyedJaggedTensor

from hyrank.embeddings.dedup import SequenceFeed
from hyrank.pipeline.data.batch import Batch
from hyrank.pipeline.data.features import DenseFeature, FeatureSpec, MatchFeature, OOVPolicy, SequenceFeature
from hyrank.pipeline.data.schema import LABEL, ColumnKind, check_type, column_kinds, dense_kind, is_list, is_string_id, nulls


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
        # a managed table's ids go to its remap raw (num_rows None): the table decides where they land
        self._num_rows = {t.name: None if t.managed is not None else t.num_embeddings for t in spec.tables}
        self._kinds = column_kinds(spec)  # a column read in two roles is checked once, for both (schema.py)
        self._sequences = {s.name: s for s in spec.sequences}

    def __call__(self, table: pa.Table, *, source: str = "<table>", first_row: int = 0,
                 id_max: Mapping[str, int] | None = None) -> Batch:
        """`id_max`: per integer id column, a bound such that every id of `table` is in [0, id_max] (the reader's
        validation proves it: pipeline.data.validate.RowVerdict.id_max); such columns skip the range pass over
        their ids."""
        ctx = _Ctx(source, first_row)
        ids = _IdColumns(table, self._kinds, ctx, id_max or {})
        jagged: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for f in self.spec.sparse:
            jagged[f.name] = ids.rows(f.name, self._num_rows[f.table], f.oov)
        for seq in self.spec.sequences:
            jagged.update(self._sequence(ids, seq))
        sequence = self.sequence_feed(_kjt(self.layout.ec_features, jagged))
        managed_pooled = self.layout.mc_ebc_features
        return Batch(
            pooled=_kjt(self.layout.ebc_features, jagged),
            sequence=sequence.kjt,
            sequence_index=sequence.index,
            managed_pooled=_kjt(managed_pooled, jagged) if managed_pooled else None,
            managed_sequence=sequence.managed_kjt,
            dense=self._dense(table, ids, ctx),
            labels=labels_column(table.column(self.spec.label), ctx.at(self.spec.label)),
            group_ids=self._groups(table, ctx),
            oracle_p=self._oracle(table, ctx),
        )

    def _sequence(self, ids: "_IdColumns", seq: SequenceFeature) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        ids_lengths = None
        for column in seq.columns:
            lengths, values = ids.rows(column, self._num_rows[seq.table_of(column)], seq.oov_of(column))
            if ids_lengths is None:
                ids_lengths = lengths
            elif not np.array_equal(lengths, ids_lengths):
                row = int(np.flatnonzero(lengths != ids_lengths)[0])
                raise ids.ctx.at(column).error(row, f"has {lengths[row]} events but {seq.ids!r} has "
                                                    f"{ids_lengths[row]}")
            out[column] = truncate_recent(lengths, values, seq.max_len, seq.order)
        return out

    def _dense(self, table: pa.Table, ids: "_IdColumns", ctx: "_Ctx") -> torch.Tensor:
        cols = [self._match(f, ids) if isinstance(f, MatchFeature)
                else dense_column(table.column(f.name), f, ctx.at(f.name), kind=self._kinds[f.name])
                for f in self.spec.dense_order]
        if not cols:
            return torch.zeros(table.num_rows, 0)
        return torch.from_numpy(np.concatenate(cols, axis=1))

    def _match(self, f: MatchFeature, ids: "_IdColumns") -> np.ndarray:
        """(B, len(f.stats)) float32: the candidate against the events the model sees of the sequence's column."""
        seq = self._sequences[f.sequence]
        event_lengths, event_values, _ = ids.raw(f.side or seq.ids)
        candidate_lengths, candidate_values, _ = ids.raw(f.candidate)
        window = min(seq.max_len, f.last_k) if f.last_k else seq.max_len
        stats = match_stats(candidate_lengths, candidate_values, event_lengths, event_values, window=window,
                            order=seq.order, stats=f.stats)
        return normalise(stats, f.norm, f.mean, f.std)

    def _groups(self, table: pa.Table, ctx: "_Ctx") -> torch.Tensor:
        if self.spec.group is None:
            return torch.zeros(table.num_rows, dtype=torch.int64)
        arr = _checked(table.column(self.spec.group), self._kinds[self.spec.group], ctx.at(self.spec.group))
        return torch.from_numpy(_as_int64(arr).copy())

    def _oracle(self, table: pa.Table, ctx: "_Ctx") -> torch.Tensor | None:
        if self.spec.oracle is None:
            return None
        arr = _checked(table.column(self.spec.oracle), self._kinds[self.spec.oracle], ctx.at(self.spec.oracle))
        return torch.from_numpy(arr.to_numpy(zero_copy_only=False).astype(np.float32))


class _IdColumns:
    """The id columns of one table, each decoded once (a column may feed a sparse feature, a sequence and match
    features): its lengths and raw int64 ids, and those ids mapped into an embedding table."""

    def __init__(self, table: pa.Table, kinds: Mapping[str, ColumnKind], ctx: "_Ctx", id_max: Mapping[str, int]):
        self.table, self.kinds, self.ctx, self.id_max = table, kinds, ctx, id_max
        self._raw: dict[str, tuple[np.ndarray, np.ndarray, bool]] = {}

    def raw(self, column: str) -> tuple[np.ndarray, np.ndarray, bool]:
        """(lengths (B,), ids (N,), hashed): integers as they are, strings hashed (`raw_ids`)."""
        if column not in self._raw:
            self._raw[column] = raw_ids(self.table.column(column), self.kinds[column], self.ctx.at(column))
        return self._raw[column]

    def rows(self, column: str, num_embeddings: int | None, oov: OOVPolicy) -> tuple[np.ndarray, np.ndarray]:
        """(lengths, ids mapped into [0, num_embeddings)); ids validation bounded inside the table skip the pass.
        `num_embeddings` None (a managed table): the ids as they are, any int64 >= 0 (a string's hash is one)."""
        lengths, values, hashed = self.raw(column)
        if num_embeddings is None:
            return lengths, map_ids(values, lengths, None, oov, self.ctx.at(column), hashed=hashed)
        known_max = self.id_max.get(column)
        if known_max is not None and not hashed and known_max < num_embeddings:
            return lengths, values
        return lengths, map_ids(values, lengths, num_embeddings, oov, self.ctx.at(column), hashed=hashed)


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


def raw_ids(col: pa.ChunkedArray | pa.Array, kind: ColumnKind, ctx: _Ctx) -> tuple[np.ndarray, np.ndarray, bool]:
    """(lengths (B,), values (N,), hashed) of a scalar or list id column: int64 ids before any table mapping
    (integers as they are, strings by `stable_hash`; `hashed` says which). `kind`: the column's kind
    (pipeline/data/schema.py); a null row or a null id in a list is an error."""
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
    return lengths, values, is_string_id(arr.type)


def map_ids(values: np.ndarray, lengths: np.ndarray, num_embeddings: int | None, oov: OOVPolicy, ctx: _Ctx,
            *, hashed: bool = False) -> np.ndarray:
    """Apply the out-of-range policy: `hash` takes ids modulo the table size, `error` refuses them. A negative id is
    an error whatever the policy; `num_embeddings` None (a managed table) keeps every other id as it is."""
    low, high = _min_max(values)
    if not hashed and low < 0:
        raise ctx.error(_row_of(np.flatnonzero(values < 0)[0], lengths), f"negative id {values[values < 0][0]}")
    if num_embeddings is None or (0 <= low and high < num_embeddings):  # the common case: no modulo
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


def dense_column(col: pa.ChunkedArray | pa.Array, f: DenseFeature, ctx: _Ctx,
                 kind: ColumnKind | None = None) -> np.ndarray:
    """(B, size) float32, normalised; NaN/Inf and wrong list sizes are errors, never zeroed. `kind`: the column's
    kind when it plays another role too (schema.column_kinds); dense_kind(f) by default."""
    arr = _checked(col, kind or dense_kind(f), ctx)
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
    if f.norm == "log1p" and (values < 0).any():
        raise ctx.error(int(np.flatnonzero((values < 0).any(axis=1))[0]), "is negative but norm = 'log1p'")
    return normalise(values, f.norm, f.mean, f.std)


def normalise(values: np.ndarray, norm: str, mean: float, std: float) -> np.ndarray:
    """A dense or match feature's norm: "none", "log1p" (of values >= 0) or "standard" ((x - mean) / std)."""
    if norm == "log1p":
        return np.log1p(values)
    if norm == "standard":
        return ((values - mean) / std).astype(np.float32, copy=False)
    return values


def match_stats(candidate_lengths: np.ndarray, candidate_values: np.ndarray, event_lengths: np.ndarray,
                event_values: np.ndarray, *, window: int, order: str, stats: list[str]) -> np.ndarray:
    """(B, len(stats)) float32 target-match statistics (pipeline.data.features.MatchFeature) of B rows.

    Each row holds a set of candidate values (`candidate_lengths` of `candidate_values`: one for a scalar column)
    and a list of events (`event_lengths` of `event_values`, in `order`); only the row's `window` most recent events
    count. `count`: events equal to a candidate value; `share`: count / events counted (0 with none); `any`: count > 0.
    """
    kept, events = truncate_recent(event_lengths, event_values, window, order)  # order within a row is irrelevant
    rows = np.repeat(np.arange(len(kept)), kept)
    if (candidate_lengths == 1).all():  # one candidate value a row: compare event by event
        hit = events == np.repeat(candidate_values, kept)
    else:
        hit = _in_row_sets(rows, events, np.repeat(np.arange(len(kept)), candidate_lengths), candidate_values)
    count = np.bincount(rows[hit], minlength=len(kept)).astype(np.float32)
    columns = {"count": count, "share": count / np.maximum(kept, 1).astype(np.float32), "any": np.sign(count)}
    return np.stack([columns[s] for s in stats], axis=1) if stats else np.zeros((len(kept), 0), np.float32)


def _in_row_sets(event_rows: np.ndarray, event_values: np.ndarray, set_rows: np.ndarray,
                 set_values: np.ndarray) -> np.ndarray:
    """(N,) bool: whether each event's value is one of its row's set values. Values become dense codes (one sort),
    so that (row, code) packs into one int64 key for np.isin."""
    if not set_values.size or not event_values.size:
        return np.zeros(event_values.shape, dtype=bool)
    codes = np.unique(np.concatenate([set_values, event_values]), return_inverse=True)[1].reshape(-1)
    keys = np.concatenate([set_rows, event_rows]) * (int(codes.max()) + 1) + codes
    return np.isin(keys[set_values.size:], keys[:set_values.size])


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
