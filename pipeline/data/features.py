"""Feature spec: the data contract between a user's Parquet columns and the model.

Columns keep their names; the spec says what each one is:

    [features]
    label = "click"                 # 0/1 integer, bool or float column (pipeline/data/schema.py: types per kind)
    group = "query_id"              # optional: query-level AUC groups (may also be a sparse or dense feature)
    [[features.tables]]             # embedding tables; several features may share one
    name = "item"  num_embeddings = 100000  dim = 16
    managed = { eviction = "lru", eviction_interval_steps = 100, admit_after = 0 }   # optional: raw ids, see below
    [[features.sparse]]             # int64 or string ids, scalar or list (multi-hot), pooled
    name = "item_id"  table = "item"  oov = "hash"
    [[features.dense]]              # float scalar or fixed-size float list
    name = "user_activity"  norm = "log1p"
    [[features.sequences]]          # behaviour sequence: list<int64> ids + aligned side-info lists
    name = "long"  ids = "long_item_ids"  table = "item"  max_len = 1000
    side = [{ column = "long_item_cats", table = "category" }]
    [[features.match]]              # target-match statistics: the candidate's value against a sequence's events
    name = "long_cat_match"  candidate = "item_category"  sequence = "long"  side = "long_item_cats"
    stats = ["count", "share", "any"]  last_k = 0  norm = "log1p"
    [features.blocks]               # semantic token groups for HHFT / HyFormer tokenisation
    user = ["user_id", "user_activity"]  item = ["item_id", "long_cat_match"]

Sequence order: lists hold events oldest first (`order = "newest_last"`, the default) or newest first; truncation
to `max_len` always keeps the most recent events.

Match features (SIM-style target-aware statistics; MatchFeature) are floats computed by the converter
(pipeline/data/convert.py), placed like dense features: in a block when `[features.blocks]` names them, else in the
tower's separate dense input. Batch.dense holds every dense and match feature in `dense_order`.

A managed table (`managed = {...}`, embeddings/managed.py) takes any id >= 0, raw int64 or a hashed string: each id
gets a row of its own while the table has room, and when it is full the least recently (`lru`) or least frequently
(`lfu`) used ids give theirs up; an id without a row reads zeros, and is counted. Every feature reading the table
goes through its one remap. `oov` does not apply to its features (no id is out of range).

A column is read once. It may play two roles only as the group column and a sparse or dense feature, the oracle
and a dense feature, or a match candidate and a sparse feature; any other repeat is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from hyrank.embeddings.tables import EmbeddingLayout, LookupDef, ManagedTable, TableDef
from hyrank.models.inputs import InputShape, SequenceShape

OOVPolicy = Literal["hash", "error"]
Norm = Literal["none", "log1p", "standard"]
MatchStat = Literal["count", "share", "any"]
MATCH_STATS = ("count", "share", "any")

# What a column does in the spec (FeatureSpec.column_roles), and the pairs of roles one column may play at once.
LABEL, GROUP, ORACLE, SPARSE, DENSE, SEQUENCE, CANDIDATE = (
    "label", "group", "oracle", "sparse", "dense", "sequence", "match candidate")
_SHARED_ROLES = ({GROUP, SPARSE}, {GROUP, DENSE}, {ORACLE, DENSE}, {SPARSE, CANDIDATE})


@dataclass
class TableSpec:
    """One embedding table."""

    name: str
    num_embeddings: int
    dim: int
    managed: ManagedTable | None = None  # a managed-collision table (raw ids; embeddings/managed.py)

    def __post_init__(self) -> None:
        if self.num_embeddings <= 0 or self.dim <= 0:
            raise ValueError(f"table {self.name!r}: num_embeddings and dim must be > 0")
        if self.managed is not None:
            self.managed.check(self.name, self.num_embeddings)


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
    norm: Norm = "none"
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
class MatchFeature:
    """Target-match statistics: how much of a behaviour sequence equals the candidate's value, as `len(stats)` floats.

    Compared per event: the candidate column's value against the sequence's id column (`side` absent) or one of its
    side-info columns. Ids are compared as the values they are, before any table mapping (no hash-collision
    matches); string ids on either side are hashed first with the converter's `stable_hash`. A list candidate
    (multi-hot) matches an event equal to any of its values; an empty list matches none.

    The statistics see what the model sees: the sequence after `max_len` truncation to its most recent events, and
    with `last_k` > 0 only the `last_k` most recent of those (`order` says which end is recent). Over those events:
    `count` (events equal to the candidate), `share` (count / events, 0 when there are none), `any` (1 if count > 0).
    `norm` applies to each statistic as to a dense feature's values.
    """

    name: str  # names the feature in [features.blocks]; no sparse/dense feature or other match may share it
    candidate: str  # the column of the candidate's value: integer or string ids, scalar or list
    sequence: str  # a sequence's name (SequenceFeature.name)
    side: str | None = None  # a column of that sequence; absent: its id column
    stats: list[MatchStat] = field(default_factory=lambda: list(MATCH_STATS))
    last_k: int = 0  # > 0: only the last_k most recent events (of the max_len the model sees)
    norm: Norm = "none"
    mean: float = 0.0  # used by norm = "standard"
    std: float = 1.0

    def __post_init__(self) -> None:
        what = f"match feature {self.name!r}"
        unknown = [s for s in self.stats if s not in MATCH_STATS]
        if unknown:
            raise ValueError(f"{what}: unknown statistic(s) {unknown} (stats may hold {list(MATCH_STATS)})")
        if not self.stats or len(set(self.stats)) != len(self.stats):
            raise ValueError(f"{what}: stats must name each statistic at most once and at least one, got {self.stats}")
        if self.last_k < 0:
            raise ValueError(f"{what}: last_k must be >= 0 (0: every event the model sees), got {self.last_k}")
        if self.norm == "standard" and self.std <= 0:
            raise ValueError(f"{what}: std must be > 0")

    @property
    def size(self) -> int:
        """Floats this feature adds to Batch.dense: one per statistic."""
        return len(self.stats)


DenseInput = Union[DenseFeature, MatchFeature]  # a float input of the tower: a column's values or match statistics


@dataclass
class FeatureSpec:
    """All features of a run, plus the label, the group column and the semantic blocks."""

    label: str
    tables: list[TableSpec]
    group: str | None = None
    oracle: str | None = None  # true click probability (synthetic data): evaluated against
    sparse: list[SparseFeature] = field(default_factory=list)
    dense: list[DenseFeature] = field(default_factory=list)
    sequences: list[SequenceFeature] = field(default_factory=list)
    match: list[MatchFeature] = field(default_factory=list)
    blocks: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_column_names()
        self._check_unique_names()
        tables = self.table_by_name
        for feat in self.sparse:
            _check_table(tables, feat.table, f"sparse feature {feat.name!r}", feat.oov)
        for seq in self.sequences:
            for column in seq.columns:
                _check_table(tables, seq.table_of(column), f"sequence {seq.name!r} column {column!r}",
                             seq.oov_of(column))
        self._check_match()
        self._check_blocks()

    def _check_column_names(self) -> None:
        """An empty or blank column name would pass loading and fail at the first read with Arrow's KeyError."""
        for key in ("group", "oracle"):
            value = getattr(self, key)
            if value is not None and not value.strip():
                raise ValueError(f"features.{key} = {value!r} names no column: leave the key out for none (a key "
                                 f"inherited through `extends` is removed with unset = [\"features.{key}\"] at the "
                                 "top of the extending config)")
        named = [("features.label", self.label)]
        named += [(f"features.sparse[{i}].name", f.name) for i, f in enumerate(self.sparse)]
        named += [(f"features.dense[{i}].name", f.name) for i, f in enumerate(self.dense)]
        for i, s in enumerate(self.sequences):
            named += [(f"features.sequences[{i}].name", s.name), (f"features.sequences[{i}].ids", s.ids)]
            named += [(f"features.sequences[{i}].side[{j}].column", c.column) for j, c in enumerate(s.side)]
        for i, m in enumerate(self.match):
            named += [(f"features.match[{i}].name", m.name), (f"features.match[{i}].candidate", m.candidate)]
            if m.side is not None:
                named.append((f"features.match[{i}].side", m.side))
        for key, value in named:
            if not value.strip():
                raise ValueError(f"{key} = {value!r} names no column (an empty or blank name)")

    def _check_unique_names(self) -> None:
        for column, roles in self.column_roles().items():
            distinct = set(roles)
            repeated = len(roles) - roles.count(CANDIDATE) != len(distinct - {CANDIDATE})  # candidates may repeat
            if repeated or (len(distinct) > 1 and distinct not in _SHARED_ROLES):
                raise ValueError(
                    f"column {column!r} declared twice in the feature spec (as {' and '.join(roles)}): a column may "
                    "play two roles only as the group column and a sparse or dense feature, the oracle and a dense "
                    "feature, or a match candidate and a sparse feature")
        for kind, names in (
            ("table", [t.name for t in self.tables]),
            ("sequence", [s.name for s in self.sequences]),
            ("sparse/dense/match feature", [f.name for f in self.non_sequence_inputs]),  # what blocks name
        ):
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"duplicate {kind} name(s): {sorted(dup)}")

    def _check_match(self) -> None:
        sequences = {s.name: s for s in self.sequences}
        for i, m in enumerate(self.match):
            where = f"features.match[{i}] ({m.name!r})"
            seq = sequences.get(m.sequence)
            if seq is None:
                raise ValueError(f"{where}: unknown sequence {m.sequence!r} (sequences: {sorted(sequences)})")
            if m.side is not None and m.side not in seq.columns:
                raise ValueError(f"{where}: side {m.side!r} is not a column of sequence {seq.name!r} (its columns: "
                                 f"{seq.columns}; leave side out to compare against its ids {seq.ids!r})")

    def _check_blocks(self) -> None:
        non_seq = [f.name for f in self.non_sequence_inputs]
        if not self.blocks:
            return
        where: dict[str, str] = {}
        for block, members in self.blocks.items():
            if not members:
                raise ValueError(f"block {block!r} is empty")
            for name in members:
                if name not in non_seq:
                    raise ValueError(f"block {block!r} names {name!r}, which is not a sparse, dense or match feature")
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
    def non_sequence_inputs(self) -> list[SparseFeature | DenseInput]:
        """Every feature a block may name: sparse, dense and match features."""
        return [*self.sparse, *self.dense, *self.match]

    @property
    def dense_dim(self) -> int:
        """Width of Batch.dense: every dense and match feature."""
        return sum(f.size for f in self.dense_order)

    def column_roles(self) -> dict[str, list[str]]:
        """Every Parquet column the spec reads -> what it is, in reading order (a shared column lists each role)."""
        roles: dict[str, list[str]] = {}
        named = [(self.label, LABEL), (self.group, GROUP), (self.oracle, ORACLE)]
        named += [(f.name, SPARSE) for f in self.sparse] + [(f.name, DENSE) for f in self.dense]
        named += [(c, SEQUENCE) for s in self.sequences for c in s.columns]
        named += [(m.candidate, CANDIDATE) for m in self.match]
        for column, role in named:
            if column is not None:
                roles.setdefault(column, []).append(role)
        return roles

    def columns(self) -> list[str]:
        """Every Parquet column the spec reads, each once."""
        return list(self.column_roles())

    def input_columns(self) -> list[str]:
        """The columns the model reads (what a request to a served model carries): every column but the label,
        the group and the oracle, unless one of those is also a feature."""
        return [c for c, roles in self.column_roles().items() if set(roles) - {LABEL, GROUP, ORACLE}]

    @property
    def effective_blocks(self) -> dict[str, list[str]]:
        """The declared blocks, or one block "features" holding every sparse feature when none are declared."""
        return self.blocks or {"features": [f.name for f in self.sparse]}

    @property
    def dense_order(self) -> list[DenseInput]:
        """Column order of Batch.dense: dense and match features of each block in block order, then the unblocked
        ones (dense, then match)."""
        by_name = {f.name: f for f in (*self.dense, *self.match)}
        blocked = [by_name[n] for members in self.effective_blocks.values() for n in members if n in by_name]
        return blocked + self.unblocked_dense

    @property
    def dense_by_name(self) -> dict[str, DenseFeature]:
        return {f.name: f for f in self.dense}

    @property
    def unblocked_dense(self) -> list[DenseInput]:
        """Dense and match features in no block: the tower's separate dense input."""
        in_blocks = {n for members in self.effective_blocks.values() for n in members}
        return [f for f in (*self.dense, *self.match) if f.name not in in_blocks]

    def embedding_layout(self, *, init_scale: float = 0.0) -> EmbeddingLayout:
        """Tables and lookups for embeddings.collection.SparseArch; `init_scale`: embeddings.init_scale of the run
        config."""
        tables = tuple(TableDef(t.name, t.num_embeddings, t.dim, t.managed) for t in self.tables)
        lookups = [LookupDef(f.name, f.table, "pooled", f.pooling) for f in self.sparse]
        lookups += [LookupDef(c, s.table_of(c), "sequence") for s in self.sequences for c in s.columns]
        return EmbeddingLayout(tables=tables, lookups=tuple(lookups), init_scale=init_scale)

    def input_shape(self) -> InputShape:
        """Widths of the tower's inputs (models.inputs.InputShape)."""
        tables = self.table_by_name
        width = {f.name: tables[f.table].dim for f in self.sparse} | {f.name: f.size for f in self.dense_order}
        blocks = {b: sum(width[n] for n in members) for b, members in self.effective_blocks.items()}
        sequences = {
            s.name: SequenceShape(dim=sum(tables[s.table_of(c)].dim for c in s.columns), max_len=s.max_len)
            for s in self.sequences
        }
        return InputShape(blocks=blocks, dense_dim=sum(f.size for f in self.unblocked_dense), sequences=sequences)


def _check_table(tables: dict[str, TableSpec], table: str, what: str, oov: str) -> None:
    if table not in tables:
        raise ValueError(f"{what} uses unknown table {table!r} (tables: {sorted(tables)})")
    if tables[table].managed is not None and oov == "error":
        raise ValueError(f"{what} reads managed table {table!r} with oov = 'error': a managed table takes any id "
                         ">= 0 (it has no out-of-range ids to refuse); leave oov out")
