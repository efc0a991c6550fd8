"""Embedding tables and lookups: which feature reads which table, and which TorchRec module serves it.

A table read by any sequence column lives in the `EmbeddingCollection` (one vector per event); a pooled feature
that shares such a table (the target `item_id` sharing the `item` table with the behaviour sequence, so that
target and history live in one space) is looked up there too and pooled here. Every other table lives in the
`EmbeddingBagCollection`, pooled by fbgemm.

A managed table (`TableDef.managed`, embeddings/managed.py) lives in a managed-collision twin of its collection
(TorchRec's MC-EBC / MC-EC): a TorchRec MC collection holds managed tables only, so a layout has up to four
modules. Every feature of a managed table goes through the table's one remap, sequences and pooled alike.

This module knows nothing of Parquet or the feature spec: pipeline/data/features.py translates a spec into
`TableDef`s and `LookupDef`s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from hyrank.embeddings.dedup import SequenceFeed


EVICTIONS = ("lru", "lfu")


@dataclass(frozen=True)
class ManagedTable:
    """How a managed-collision table gives its rows to raw ids (embeddings/managed.py).

    An id without a slot is looked up as a zero vector (and counted) until the next admission, every
    `eviction_interval_steps` training steps: the ids seen since then get free slots, and when none are left, the
    least recently (`lru`) or least frequently (`lfu`) used ids give theirs up (rows and optimizer state reset).
    `admit_after` > 0: a new id needs more than that many occurrences within one interval to get a slot.
    """

    eviction: str = "lru"
    eviction_interval_steps: int = 100
    admit_after: int = 0

    def check(self, table: str, num_embeddings: int) -> None:
        """ValueError naming the table for a setting that cannot work."""
        where = f"table {table!r}: managed"
        if self.eviction not in EVICTIONS:
            raise ValueError(f"{where}.eviction must be one of {list(EVICTIONS)}, got {self.eviction!r}")
        if not self.eviction_interval_steps >= 1:
            raise ValueError(f"{where}.eviction_interval_steps must be >= 1, got {self.eviction_interval_steps}")
        if not self.admit_after >= 0:
            raise ValueError(f"{where}.admit_after must be >= 0 (0: admit at first sight), got {self.admit_after}")
        if num_embeddings < 2:  # one slot of each shard is kept free: the zero row of the ids without a slot
            raise ValueError(f"{where} needs num_embeddings >= 2, got {num_embeddings}")


@dataclass(frozen=True)
class TableDef:
    name: str
    num_embeddings: int
    dim: int
    managed: ManagedTable | None = None  # None: ids index rows directly


@dataclass(frozen=True)
class LookupDef:
    """One input feature (a KJT key): the table it reads, and whether it is pooled or kept per event."""

    feature: str
    table: str
    kind: Literal["pooled", "sequence"]
    pooling: Literal["sum", "mean"] = "sum"  # for kind == "pooled"


@dataclass(frozen=True)
class EmbeddingLayout:
    """Tables and lookups, split between the EBC and the EC."""

    tables: tuple[TableDef, ...]
    lookups: tuple[LookupDef, ...]
    # initial table weights: 0 for TorchRec's uniform +-sqrt(1 / num_embeddings) (tiny for a large table, so the
    # sparse learning rate has to make up for it), else uniform +-init_scale for every table whatever its size
    init_scale: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.init_scale < float("inf"):
            raise ValueError(f"init_scale must be >= 0 and finite (0: TorchRec's default), got {self.init_scale}")
        names = {t.name for t in self.tables}
        for lk in self.lookups:
            if lk.table not in names:
                raise ValueError(f"lookup {lk.feature!r} reads unknown table {lk.table!r}")
        dims = {t.name: t.dim for t in self.ec_tables}
        if len(set(dims.values())) > 1:
            # TorchRec's EmbeddingCollection holds tables of one width only.
            raise ValueError(f"tables read by sequences must share one dim (TorchRec EmbeddingCollection), got {dims}")

    @property
    def ec_tables(self) -> list[TableDef]:
        """Tables read by sequences, plain ones first, then managed ones (one KJT splits between EC and MC-EC)."""
        seq = {lk.table for lk in self.lookups if lk.kind == "sequence"}
        read = [t for t in self.tables if t.name in seq]
        return [t for t in read if t.managed is None] + [t for t in read if t.managed is not None]

    @property
    def plain_ec_tables(self) -> list[TableDef]:
        return [t for t in self.ec_tables if t.managed is None]

    @property
    def mc_ec_tables(self) -> list[TableDef]:
        return [t for t in self.ec_tables if t.managed is not None]

    @property
    def ebc_tables(self) -> list[TableDef]:
        """Plain pooled-only tables (the EmbeddingBagCollection)."""
        return [t for t in self._pooled_tables if t.managed is None]

    @property
    def mc_ebc_tables(self) -> list[TableDef]:
        """Managed pooled-only tables (the managed-collision EmbeddingBagCollection)."""
        return [t for t in self._pooled_tables if t.managed is not None]

    @property
    def _pooled_tables(self) -> list[TableDef]:
        ec = {t.name for t in self.ec_tables}
        used = {lk.table for lk in self.lookups}
        return [t for t in self.tables if t.name not in ec and t.name in used]

    @property
    def managed_tables(self) -> list[TableDef]:
        return [t for t in self.tables if t.managed is not None]

    @property
    def ebc_features(self) -> list[str]:
        """KJT keys of the pooled batch, in the order the EBC expects them."""
        return self.features_of(self.ebc_tables)

    @property
    def mc_ebc_features(self) -> list[str]:
        """KJT keys of the managed pooled batch (raw ids), in the order the MC-EBC expects them."""
        return self.features_of(self.mc_ebc_tables)

    @property
    def ec_features(self) -> list[str]:
        """KJT keys of the sequence batch, in the order the EC and then the MC-EC expect them."""
        return self.features_of(self.ec_tables)

    def features_of(self, tables: list[TableDef]) -> list[str]:
        return [lk.feature for t in tables for lk in self.lookups if lk.table == t.name]

    def lookup(self, feature: str) -> LookupDef:
        return next(lk for lk in self.lookups if lk.feature == feature)

    def dim_of(self, feature: str) -> int:
        table = self.lookup(feature).table
        return next(t.dim for t in self.tables if t.name == table)

    def ebc_configs(self, *, managed: bool = False) -> list:
        """torchrec EmbeddingBagConfigs of the plain (or the `managed`) pooled tables (torchrec is imported here,
        not at module import: it takes seconds)."""
        from torchrec import EmbeddingBagConfig, PoolingType

        return [
            EmbeddingBagConfig(
                name=t.name,
                num_embeddings=t.num_embeddings,
                embedding_dim=t.dim,
                feature_names=[lk.feature for lk in self.lookups if lk.table == t.name],
                pooling=PoolingType.MEAN if self._pooling_of(t.name) == "mean" else PoolingType.SUM,
                **self._init(),
            )
            for t in (self.mc_ebc_tables if managed else self.ebc_tables)
        ]

    @property
    def ec_table_of(self) -> dict[str, str]:
        """EC feature -> the table it reads (what embeddings.dedup groups distinct ids by)."""
        return {f: self.lookup(f).table for f in self.ec_features}

    def sequence_feed(self, *, dedup: bool) -> "SequenceFeed":
        """The host-side step that prepares sequence KJTs for an EC built with `ec_configs(dedup=...)`.

        With no table read by sequences there is nothing to deduplicate: the feed is plain whatever `dedup` says.
        """
        from hyrank.embeddings.dedup import SequenceFeed

        return SequenceFeed(self.ec_table_of, dedup=dedup and bool(self.ec_tables),
                            managed=frozenset(t.name for t in self.mc_ec_tables))

    def ec_configs(self, *, dedup: bool = False, managed: bool = False) -> list:
        """torchrec EmbeddingConfigs of the plain (or the `managed`) sequence tables; with `dedup` each table reads
        one key, dedup_key(table), of distinct ids.

        Table names (hence parameter names and checkpoints) are the same either way.
        """
        from torchrec import EmbeddingConfig

        from hyrank.embeddings.dedup import dedup_key

        return [
            EmbeddingConfig(
                name=t.name,
                num_embeddings=t.num_embeddings,
                embedding_dim=t.dim,
                feature_names=[dedup_key(t.name)] if dedup
                else [lk.feature for lk in self.lookups if lk.table == t.name],
                **self._init(),
            )
            for t in (self.mc_ec_tables if managed else self.plain_ec_tables)
        ]

    def _init(self) -> dict:
        """The table configs' init range: TorchRec's default unless init_scale is set."""
        return {"weight_init_min": -self.init_scale, "weight_init_max": self.init_scale} if self.init_scale else {}

    def _pooling_of(self, table: str) -> str:
        # An EBC table has one pooling mode; features sharing a pooled table must agree.
        modes = {lk.pooling for lk in self.lookups if lk.table == table}
        if len(modes) > 1:
            raise ValueError(f"features sharing table {table!r} ask for different poolings {sorted(modes)}")
        return modes.pop()
