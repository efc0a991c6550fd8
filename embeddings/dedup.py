"""Deduplicated sequence lookup (HyFormer 3.8.1): look up each distinct id of a batch once, rebuild the events.

    host:   ids = arch.sequence_feed(sequence_kjt)                  # SparseArch(layout, dedup=True): SequenceIds
            batch carries ids.kjt (distinct ids, the EC's input) and ids.index (compact inverse) host -> device
    device: unique = ec(ids.kjt)                                    # dedup_key(table) -> JaggedTensor (U, D)
            seqs = expand_sequences(unique, ids.index, transforms)   # feature -> JaggedTensor (N, D')

Long behaviour sequences repeat items (~25% of tokens are distinct in the paper's logs), so the batch moves
U int64 ids + N int16/int32 inverse indices instead of N int64 ids, the lookup (and its all-to-all when sharded)
touches U rows, and a position-independent per-token transform (a projection of the item embedding) runs on U
rows instead of N. The expansion is an index_select whose backward is an index_add: the gradients of repeated
ids are summed into their unique row before they reach the table (tests/test_dedup.py checks this against the
plain lookup of every event).

The reference path is the plain lookup of every event: `SparseArch(layout, dedup=False)`, whose feed passes the
KJT through. `dedup_sequences` is the dedup step on its own (tests; bench/dedup.py times its core).

Legend: N events of one feature (or of all features of a table) in the batch, U distinct ids of a table,
B batch rows, F sequence features, T tables read by sequences, D embedding width, D' width after a transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Mapping

import torch

if TYPE_CHECKING:  # torchrec is imported lazily: bench/dedup.py runs the core ops with torch alone
    from torchrec import JaggedTensor, KeyedJaggedTensor

RowTransform = Callable[[torch.Tensor], torch.Tensor]  # (U, D) -> (U, D'), applied to each row on its own
ExpandImpl = Literal["auto", "torch", "fbgemm"]

DEDUP_SUFFIX = "@unique"


def dedup_key(table: str) -> str:
    """The EC feature (KJT key) that carries a table's distinct ids; '@' cannot clash with a Parquet column."""
    return f"{table}{DEDUP_SUFFIX}"


@dataclass
class DedupIndex:
    """How to rebuild every sequence feature from its table's unique rows.

    Features are in the EC's order (grouped by table), `inverse` is their events concatenated, each an index
    into its table's unique rows. Only the tensors travel to the device; the rest is static or host ints.
    """

    features: list[str]
    tables: list[str]  # table of each feature
    lengths: torch.Tensor  # (F*B,) int32 events per feature per row (feature-major, as in a KJT)
    inverse: torch.Tensor  # (sum N,) int16 when every table has <= 32768 unique ids, else int32
    num_ids: int  # total events N over all features
    num_unique: int  # total U over all tables

    @property
    def dedup_ratio(self) -> float:
        """Distinct ids / events (1.0 = nothing repeated; 0.25 = the paper's typical long sequence)."""
        return self.num_unique / self.num_ids if self.num_ids else 1.0

    def to(self, device: torch.device, non_blocking: bool = False) -> "DedupIndex":
        return DedupIndex(self.features, self.tables, self.lengths.to(device, non_blocking=non_blocking),
                          self.inverse.to(device, non_blocking=non_blocking), self.num_ids, self.num_unique)

    def pin_memory(self) -> "DedupIndex":
        return DedupIndex(self.features, self.tables, self.lengths.pin_memory(), self.inverse.pin_memory(),
                          self.num_ids, self.num_unique)

    def record_stream(self, stream: torch.Stream) -> None:
        self.lengths.record_stream(stream)
        self.inverse.record_stream(stream)

    @property
    def nbytes(self) -> int:
        return self.lengths.nbytes + self.inverse.nbytes


@dataclass
class DedupResult:
    unique: KeyedJaggedTensor  # keys dedup_key(table) in table order; stride 1: one "row" of U ids per table
    index: DedupIndex


@dataclass
class UniqueIds:
    """Distinct ids of each table, and where every event's id sits among them."""

    values: torch.Tensor  # (sum U,) int64, table after table, each table's ids sorted
    num_unique: list[int]  # U per table
    inverse: torch.Tensor  # (sum N,) int64: event -> row among its own table's unique ids


def unique_per_table(values_N: torch.Tensor, events_per_table: list[int]) -> UniqueIds:
    """torch.unique over each table's contiguous slice of events (works on CPU and CUDA alike)."""
    uniques, inverses, start = [], [], 0
    for n in events_per_table:
        u, inv = torch.unique(values_N[start:start + n], sorted=True, return_inverse=True)
        uniques.append(u)
        inverses.append(inv.reshape(-1))
        start += n
    if not uniques:
        return UniqueIds(values_N.new_zeros(0), [], values_N.new_zeros(0))
    return UniqueIds(torch.cat(uniques), [u.numel() for u in uniques], torch.cat(inverses))


def compact_index_dtype(num_unique: list[int]) -> torch.dtype:
    """int16 while every table has <= 32768 distinct ids in the batch (halves the inverse), else int32."""
    return torch.int16 if max(num_unique, default=0) <= 2**15 else torch.int32


def dedup_sequences(kjt: "KeyedJaggedTensor", table_of: Mapping[str, str]) -> DedupResult:
    """Distinct ids per table across all features reading it, plus the inverse index (runs on the host)."""
    from torchrec import KeyedJaggedTensor

    features = list(kjt.keys())
    tables = [table_of[f] for f in features]
    order = list(dict.fromkeys(tables))
    if [t for i, t in enumerate(tables) if i == 0 or t != tables[i - 1]] != order:
        raise ValueError(f"sequence features must be grouped by table (EmbeddingLayout.ec_features), got {tables}")
    per_feature = kjt.length_per_key()
    events_per_table = [sum(c for ft, c in zip(tables, per_feature) if ft == t) for t in order]
    u = unique_per_table(kjt.values(), events_per_table)
    unique = KeyedJaggedTensor(keys=[dedup_key(t) for t in order], values=u.values,
                               lengths=torch.tensor(u.num_unique, dtype=torch.int32))
    index = DedupIndex(features, tables, kjt.lengths().to(torch.int32),
                       u.inverse.to(compact_index_dtype(u.num_unique)), int(kjt.values().numel()),
                       sum(u.num_unique))
    return DedupResult(unique=unique, index=index)


@dataclass
class SequenceIds:
    """A batch's sequence ids in the form its EC lookup reads."""

    kjt: KeyedJaggedTensor  # every event's id (plain), or each table's distinct ids, keys dedup_key(table)
    index: DedupIndex | None  # how to rebuild every event from the distinct ids; None on the plain path
    # the keys of managed tables (embeddings/managed.py), split off `kjt` for the managed-collision EC: raw ids, or
    # their distinct ones; None without managed sequence tables. `index` covers both
    managed_kjt: KeyedJaggedTensor | None = None


@dataclass(frozen=True)
class SequenceFeed:
    """The host-side step between a batch's sequence KJT and the EC lookup that reads it (runs in the loader).

    Plain: the KJT as it is. Dedup: each table's distinct ids and a DedupIndex (`dedup_sequences`). The lookup
    owns the choice, like torchrec's EmbeddingCollectionSharder(use_index_dedup=...): `SparseArch.sequence_feed`
    is the feed its EC was built for, and readers take it from the model. `EmbeddingLayout.sequence_feed` builds
    one without a model (tests, benchmarks).
    """

    table_of: dict[str, str]  # EC feature -> the table it reads (EmbeddingLayout.ec_table_of)
    dedup: bool
    # managed tables (their keys come last: EmbeddingLayout.ec_tables), split off into SequenceIds.managed_kjt
    managed: frozenset[str] = frozenset()

    def __call__(self, sequence: "KeyedJaggedTensor") -> SequenceIds:
        if not self.dedup:
            return self._split(SequenceIds(sequence, None))
        d = dedup_sequences(sequence, self.table_of)
        return self._split(SequenceIds(d.unique, d.index))

    def _split(self, ids: SequenceIds) -> SequenceIds:
        if not self.managed:
            return ids
        keys = ids.kjt.keys()
        tables = [k[: -len(DEDUP_SUFFIX)] if self.dedup else self.table_of[k] for k in keys]
        num_plain = sum(t not in self.managed for t in tables)
        if any(t in self.managed for t in tables[:num_plain]):
            raise ValueError(f"managed sequence tables must come last (EmbeddingLayout.ec_tables), got {tables}")
        plain, managed = ids.kjt.split([num_plain, len(keys) - num_plain])
        return SequenceIds(plain, ids.index, managed)


def expand_rows(unique_UD: torch.Tensor, inverse_N: torch.Tensor, *, impl: ExpandImpl = "auto") -> torch.Tensor:
    """(N, D) = unique_UD[inverse_N]; backward sums the N event gradients into the U unique rows.

    "torch" is index_select (backward: index_add, atomics on GPU). "fbgemm" is fbgemm's index_select_dim0,
    whose backward sorts the indices and reduces segments (deterministic, fewer atomics on GPU). "auto" takes
    fbgemm on CUDA when it is installed, else torch; both are tested against plain indexing (fbgemm on CUDA
    only: its CPU build has no autograd kernel for this op).
    """
    index = inverse_N.to(torch.int64) if inverse_N.dtype == torch.int16 else inverse_N
    if impl == "auto":
        impl = "fbgemm" if unique_UD.is_cuda and _has_fbgemm_index_select() else "torch"
    if impl == "fbgemm":
        if not unique_UD.is_cuda:
            # fbgemm registers no CPU autograd kernel for it (torch warns "silently incorrect" on backward)
            raise ValueError("expand_rows(impl='fbgemm') needs CUDA; use impl='torch' on CPU")
        return torch.ops.fbgemm.index_select_dim0(unique_UD, index.to(torch.int64))
    return torch.index_select(unique_UD, 0, index)


def _has_fbgemm_index_select() -> bool:
    try:
        import fbgemm_gpu  # noqa: F401 - registers torch.ops.fbgemm
    except Exception:  # noqa: BLE001 - absent or not loadable with this torch: use the torch path
        return False
    return hasattr(torch.ops.fbgemm, "index_select_dim0")


def expand_sequences(unique: Mapping[str, "JaggedTensor"], index: DedupIndex,
                     transforms: Mapping[str, RowTransform] | None = None,
                     *, impl: ExpandImpl = "auto") -> dict[str, "JaggedTensor"]:
    """Rebuild each feature's per-event vectors from its table's unique rows (after its optional transform)."""
    from torchrec import JaggedTensor

    transforms = transforms or {}
    lengths_FB = index.lengths.view(len(index.features), -1)
    counts = lengths_FB.sum(dim=1).tolist()  # host ints; on CUDA one sync per batch for all features
    out: dict[str, JaggedTensor] = {}
    start = 0
    for i, (feature, table) in enumerate(zip(index.features, index.tables)):
        unique_UD = unique[dedup_key(table)].values()
        if feature in transforms:
            unique_UD = transforms[feature](unique_UD)  # U rows instead of N: where dedup saves compute
        inverse_N = index.inverse[start:start + counts[i]]
        out[feature] = JaggedTensor(values=expand_rows(unique_UD, inverse_N, impl=impl),
                                    lengths=lengths_FB[i].to(torch.int64))
        start += counts[i]
    return out


def lookup_reference(weight_by_table: Mapping[str, torch.Tensor], kjt: "KeyedJaggedTensor",
                     table_of: Mapping[str, str],
                     transforms: Mapping[str, RowTransform] | None = None) -> dict[str, "JaggedTensor"]:
    """The plain path: every event looked up on its own, the transform applied to all N rows."""
    from torchrec import JaggedTensor

    transforms = transforms or {}
    out = {}
    for feature, jt in kjt.to_dict().items():
        rows_ND = torch.nn.functional.embedding(jt.values(), weight_by_table[table_of[feature]])
        if feature in transforms:
            rows_ND = transforms[feature](rows_ND)
        out[feature] = JaggedTensor(values=rows_ND, lengths=jt.lengths())
    return out


def lookup_dedup(weight_by_table: Mapping[str, torch.Tensor], kjt: "KeyedJaggedTensor",
                 table_of: Mapping[str, str], transforms: Mapping[str, RowTransform] | None = None,
                 *, impl: ExpandImpl = "auto") -> dict[str, "JaggedTensor"]:
    """The dedup path with plain tables in place of an EC (what the tests compare with lookup_reference)."""
    from torchrec import JaggedTensor

    d = dedup_sequences(kjt, table_of)
    unique = {}
    for key, jt in d.unique.to_dict().items():
        weight = weight_by_table[key[: -len(DEDUP_SUFFIX)]]
        unique[key] = JaggedTensor(values=torch.nn.functional.embedding(jt.values(), weight), lengths=jt.lengths())
    return expand_sequences(unique, d.index.to(kjt.values().device), transforms, impl=impl)
