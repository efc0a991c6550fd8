"""Feature spec: the data contract between a user's Parquet columns and the model.

Columns keep their names; the spec says what each one is:

    [features]
    label = "click"                 # 0/1 integer, bool or float column (pipeline/data/schema.py: types per kind)
    group = "query_id"              # optional: query-level AUC groups
    [[features.tables]]             # embedding tables; several features may share one
    name = "item"  num_embeddings = 100000  dim = 16
    [[features.sparse]]             # int64 or string ids, scalar or list (multi-hot), pooled
    name = "item_id"  table = "item"  oov = "hash"
    [[features.dense]]              # float scalar or fixed-size float list
    name = "user_activity"  norm = "log1p"
    [[features.sequences]]          # behaviour sequence: list<int64> ids + aligned side-info lists
    name = "long"  ids = "long_item_ids"  table = "item"  max_len = 1000
    side = [{ column = "long_item_cats", table = "category" }]
    [features.blocks]               # semantic token groups for HHFT / HyFormer tokenisation
    user = ["user_id", "user_activity"]  item = ["item_id"]

Sequence order: lists hold events oldest first (`order = "newest_last"`, the default) or newest first; truncation
to `max_len` always keeps the most recent events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from embeddings.tables import EmbeddingLayout, LookupDef, TableDef
from models.inputs import InputShape, SequenceShape

OOVPolicy = Literal["hash", "error"]


@dataclass
class TableSpec:
    """One embedding table."""

    name: str
    num_embeddings: int
    dim: int

    def __post_init__(self) -> None:
        if self.num_embeddings <= 0 or self.dim <= 0:
            raise ValueError(f"table {self.name!r}: num_embeddings and dim must be > 0")


@dataclass
class SparseFeature:
    """A categorical column: int64/string ids, scalar or list; pooled into one vector per row."""

    name: str  # the Parquet column
    table: str
    oov: OOVPolicy = "hash"  # an id outside [0, num_embeddings): hash it modulo the size, or fail the row
    pooling: Literal["sum", "mean"] = "sum"


@dataclass
class DenseFeature:
    """A float column: scalar, or a fixed-size list of `size` floats."""

    name: str
    size: int = 1
    norm: Literal["none", "log1p", "standard"] = "none"
    mean: float = 0.0  # used by norm = "standard"
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"dense feature {self.name!r}: size must be > 0")
        if self.norm == "standard" and self.std <= 0:
            raise ValueError(f"dense feature {self.name!r}: std must be > 0")


@dataclass
class SideInfo:
    """A list column aligned event by event with a sequence's id list."""

    column: str
    table: str
    oov: OOVPolicy = "hash"


@dataclass
class SequenceFeature:
    """A behaviour sequence: a list<int64> of item ids plus aligned side-info lists."""

    name: str  # logical name used by the model (e.g. "long")
    ids: str  # the list<int64> column of ids
    table: str
    max_len: int
    side: list[SideInfo] = field(default_factory=list)
    oov: OOVPolicy = "hash"
    order: Literal["newest_last", "newest_first"] = "newest_last"

    def __post_init__(self) -> None:
        if self.max_len <= 0:
            raise ValueError(f"sequence {self.name!r}: max_len must be > 0")

    @property
    def columns(self) -> list[str]:
        """The id column, then the side-info columns, in model order."""
        return [self.ids] + [s.column for s in self.side]

    def table_of(self, column: str) -> str:
        return self.table if column == self.ids else next(s.table for s in self.side if s.column == column)

    def oov_of(self, column: str) -> OOVPolicy:
        return self.oov if column == self.ids else next(s.oov for s in self.side if s.column == column)


@dataclass
class FeatureSpec:
    """All features of a run, plus the label, the group column and the semantic blocks."""

    label: str
    tables: list[TableSpec]
    group: str | None = None
    oracle: str | None = None  # true click probability (synthetic data): evaluated against, never a feature
    sparse: list[SparseFeature] = field(default_factory=list)
    dense: list[DenseFeature] = field(default_factory=list)
    sequences: list[SequenceFeature] = field(default_factory=list)
    blocks: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_unique_names()
        tables = self.table_by_name
        for feat in self.sparse:
            _check_table(tables, feat.table, f"sparse feature {feat.name!r}")
        for seq in self.sequences:
            for column in seq.columns:
                _check_table(tables, seq.table_of(column), f"sequence {seq.name!r} column {column!r}")
        self._check_blocks()

    def _check_unique_names(self) -> None:
        for kind, names in (
            ("table", [t.name for t in self.tables]),
            ("sequence", [s.name for s in self.sequences]),
        ):
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"duplicate {kind} name(s): {sorted(dup)}")
        columns = self.columns()
        dup = {c for c in columns if columns.count(c) > 1}
        if dup:
            raise ValueError(f"column(s) {sorted(dup)} declared twice in the feature spec")

    def _check_blocks(self) -> None:
        non_seq = [f.name for f in self.sparse] + [f.name for f in self.dense]
        if not self.blocks:
            return
        where: dict[str, str] = {}
        for block, members in self.blocks.items():
            if not members:
                raise ValueError(f"block {block!r} is empty")
            for name in members:
                if name not in non_seq:
                    raise ValueError(f"block {block!r} names {name!r}, which is not a sparse or dense feature")
                if name in where:
                    raise ValueError(f"feature {name!r} is in two blocks: {where[name]!r} and {block!r}")
                where[name] = block
        sparse_missing = [f.name for f in self.sparse if f.name not in where]
        if sparse_missing:
            raise ValueError(f"sparse features not in any block: {sparse_missing} (every sparse feature needs one)")

    # -- derived views ---------------------------------------------------------------------------------------

    @property
    def table_by_name(self) -> dict[str, TableSpec]:
        return {t.name: t for t in self.tables}

    @property
    def dense_dim(self) -> int:
        return sum(f.size for f in self.dense)

    def columns(self) -> list[str]:
        """Every Parquet column the spec reads."""
        cols = [self.label] + [c for c in (self.group, self.oracle) if c]
        cols += [f.name for f in self.sparse] + [f.name for f in self.dense]
        return cols + [c for s in self.sequences for c in s.columns]

    @property
    def effective_blocks(self) -> dict[str, list[str]]:
        """The declared blocks, or one block "features" holding every sparse feature when none are declared."""
        return self.blocks or {"features": [f.name for f in self.sparse]}

    @property
    def dense_order(self) -> list[DenseFeature]:
        """Column order of Batch.dense: dense features of each block in block order, then the unblocked ones."""
        blocked = [self.dense_by_name[n] for members in self.effective_blocks.values() for n in members
                   if n in self.dense_by_name]
        return blocked + self.unblocked_dense

    @property
    def dense_by_name(self) -> dict[str, DenseFeature]:
        return {f.name: f for f in self.dense}

    @property
    def unblocked_dense(self) -> list[DenseFeature]:
        """Dense features in no block: the tower's separate dense input."""
        in_blocks = {n for members in self.effective_blocks.values() for n in members}
        return [f for f in self.dense if f.name not in in_blocks]

    def embedding_layout(self) -> EmbeddingLayout:
        """Tables and lookups for embeddings.SparseArch."""
        tables = tuple(TableDef(t.name, t.num_embeddings, t.dim) for t in self.tables)
        lookups = [LookupDef(f.name, f.table, "pooled", f.pooling) for f in self.sparse]
        lookups += [LookupDef(c, s.table_of(c), "sequence") for s in self.sequences for c in s.columns]
        return EmbeddingLayout(tables=tables, lookups=tuple(lookups))

    def input_shape(self) -> InputShape:
        """Widths of the tower's inputs (models.inputs.InputShape)."""
        tables = self.table_by_name
        width = {f.name: tables[f.table].dim for f in self.sparse} | {f.name: f.size for f in self.dense}
        blocks = {b: sum(width[n] for n in members) for b, members in self.effective_blocks.items()}
        sequences = {
            s.name: SequenceShape(dim=sum(tables[s.table_of(c)].dim for c in s.columns), max_len=s.max_len)
            for s in self.sequences
        }
        return InputShape(blocks=blocks, dense_dim=sum(f.size for f in self.unblocked_dense), sequences=sequences)


def _check_table(tables: dict[str, TableSpec], table: str, what: str) -> None:
    if table not in tables:
        raise ValueError(f"{what} uses unknown table {table!r} (tables: {sorted(tables)})")
