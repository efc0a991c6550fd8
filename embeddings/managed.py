"""Managed-collision tables (TorchRec MCH): raw ids of any size get rows of their own while the table has room.

    layout = EmbeddingLayout(tables=(TableDef("item", 200_000, 16, ManagedTable("lru", 100)), ...), ...)
    mc_ebc = managed_collection(layout.ebc_configs(managed=True), layout.tables, bagged=True, device=..., num_buckets=2)
    SparseArch(layout, ...)              # the MC-EBC / MC-EC of a layout's managed tables (embeddings/collection.py)
    shards = table_shards(dmp)           # each managed table's shard on this rank (embeddings/managed_lookup.py)

How an id gets a row. Raw int64 ids (strings are hashed first: pipeline/data/convert.py stable_hash) reach the remap
unmodified, and `mix_ids`, a bijection of [0, 2**63), scrambles them before TorchRec routes them: row-wise sharding
sends an id to the rank that owns its part of the id space, so unmixed small integers would all land on rank 0.
Each rank's shard of the table then holds a sorted array of the (mixed) ids that own one of its slots
(TorchRec's MCHManagedCollisionModule). An id found there reads its own row; any other id reads the shard's last
slot, which is kept free and zero (embeddings/managed_lookup.py), and is counted as a miss. Every
`eviction_interval_steps` training steps the ids seen since the last time are admitted into free slots; when
there are none, the least recently (LRU) or least frequently (LFU) used ids give up theirs, TorchRec's eviction
policies deciding which. An admitted id's slot starts from fresh weights and zero optimizer state. With
`embeddings.dedup` a sequence table's remap sees each distinct id of a batch once, so LFU counts the batches an id
appears in rather than its events.

What hyrank changes in TorchRec's module (ManagedRemap): `admit_after` (a new id needs more than that many
occurrences in one interval; ids that already hold a slot are always refreshed, which TorchRec's experimental
threshold filter does not do), a history buffer that grows instead of silently dropping the ids of a batch
larger than the first one, counters of what was looked up, missed, admitted, evicted and refused, and `flush`:
admission on demand, so that a checkpoint is an eviction point and holds no pending history (a resumed run then
takes the same steps as one that never stopped).

Legend: N slots of a table's shard on this rank, U distinct ids of an interval.
"""

from __future__ import annotations

import zlib
from typing import Any, Mapping, Sequence

import torch
from torchrec.modules.mc_modules import LFU_EvictionPolicy, LRU_EvictionPolicy, MCHManagedCollisionModule

from hyrank.embeddings.tables import ManagedTable, TableDef

INPUT_HASH_SIZE = (1 << 63) - 1  # ids are routed by their mixed value in [0, INPUT_HASH_SIZE)
FREE = torch.iinfo(torch.int64).max  # TorchRec's marker of a free slot in the sorted id array
_MASK63 = (1 << 63) - 1
# splitmix64's multipliers, as the int64 they wrap to: int64 multiplication wraps modulo 2**64, and masking to 63
# bits makes it multiplication modulo 2**63 by an odd number, a bijection
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)


def mix_ids(ids: torch.Tensor, input_hash_size: int = INPUT_HASH_SIZE) -> torch.Tensor:
    """splitmix64's finaliser on 63 bits: a bijection of [0, 2**63), so distinct ids stay distinct; then modulo
    `input_hash_size` (2**63 - 1: the one id that mixes to 2**63 - 1 shares 0's slot). TorchRec's input_hash_func."""
    x = ids & _MASK63
    x = x ^ (x >> 31)
    x = (x * _M1) & _MASK63
    x = x ^ (x >> 29)
    x = (x * _M2) & _MASK63
    x = x ^ (x >> 32)
    return torch.remainder(x, input_hash_size)


def mix_ids_reference(value: int, input_hash_size: int = INPUT_HASH_SIZE) -> int:
    """`mix_ids` of one id in Python integers (no wrap-around to trust): what tests compare it with."""
    x = value & _MASK63
    x ^= x >> 31
    x = (x * (_M1 % (1 << 64))) & _MASK63
    x ^= x >> 29
    x = (x * (_M2 % (1 << 64))) & _MASK63
    x ^= x >> 32
    return x % input_hash_size


def owner_rank(mixed_ids: torch.Tensor, world_size: int) -> torch.Tensor:
    """The rank TorchRec's row-wise input distribution sends each mixed id to (buckets = world size): the id space
    cut into `world_size` equal blocks, in order."""
    block = -(-INPUT_HASH_SIZE // world_size)
    return torch.div(mixed_ids, block, rounding_mode="floor")


def eviction_policy(name: str):
    """TorchRec's policy for ManagedTable.eviction."""
    return {"lru": LRU_EvictionPolicy, "lfu": LFU_EvictionPolicy}[name]()


class ManagedRemap(MCHManagedCollisionModule):
    """TorchRec's MCH remap of one table (shard), with `admit_after`, a growing history, counters and `flush`."""

    def __init__(self, *, admit_after: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self._admit_after = admit_after
        # (ids looked up, ids that found no slot) since take_stats, on the device: no sync per step
        self.register_buffer("_looked_up", torch.zeros(2, dtype=torch.int64, device=self.device), persistent=False)
        self.admitted = self.evicted = self.refused = 0

    @property
    def score_name(self) -> str:
        """The per-slot metadata the policy ranks ids by (higher keeps the slot): last access or count."""
        return next(iter(self._mch_metadata))

    @property
    def miss_slot(self) -> int:
        """The global row every id without a slot reads (the shard's last)."""
        return self._output_global_offset + self._zch_size - 1

    def remap(self, features, mutate_miss_lengths: bool = True, write_weights=None):
        out = super().remap(features, mutate_miss_lengths, write_weights)
        if self.training:
            for jt in out.values():
                values = jt.values()
                self._looked_up[0] += values.numel()
                self._looked_up[1] += (values == self.miss_slot).sum()
        return out

    def profile(self, features):
        if self.training and self._input_history_buffer_size != -1:
            # TorchRec sizes the history from the first batch and drops what does not fit later: grow it instead
            need = self._current_history_buffer_offset + sum(int(f.values().numel()) for f in features.values())
            if need > self._input_history_buffer_size:
                self._grow_history(need)
        return super().profile(features)

    def _grow_history(self, need: int) -> None:
        size, used = max(need, 2 * self._input_history_buffer_size), self._current_history_buffer_offset
        grown = torch.empty(size, dtype=torch.int64, device=self.device)
        grown[:used] = self._history_accumulator[:used]
        self._history_accumulator = grown
        for name, old in list(self._history_metadata.items()):
            new = torch.zeros(size, dtype=old.dtype, device=self.device)
            new[:used] = old[:used]
            setattr(self, "_history_" + name, new)  # a registered buffer: this replaces it
            self._history_metadata[name] = new
        self._input_history_buffer_size = size

    @torch.no_grad()
    def _coalesce_history(self) -> None:
        """TorchRec's admission of the interval's ids, with `admit_after` applied to new ids only, and counted."""
        used = self._current_history_buffer_offset
        uniq_U, inverse, counts_U = torch.unique(self._history_accumulator[:used], return_inverse=True,
                                                 return_counts=True)
        history = {name: buf[:used] for name, buf in self._history_metadata.items()}
        meta_U = self._eviction_policy.coalesce_history_metadata(self._current_iter, history, counts_U, inverse)
        if self._admit_after:
            known_U = self._match_indices(self._mch_sorted_raw_ids, uniq_U)[0]
            keep_U = known_U | (counts_U > self._admit_after)
            self.refused += int((~keep_U).sum())
            uniq_U, counts_U = uniq_U[keep_U], counts_U[keep_U]
            meta_U = {name: value[keep_U] for name, value in meta_U.items()}
        before = self._mch_sorted_raw_ids.clone()
        self._update_and_evict(uniq_U, counts_U, meta_U)
        after = self._mch_sorted_raw_ids
        self.admitted += int(((after != FREE) & ~torch.isin(after, before)).sum())
        self.evicted += int(((before != FREE) & ~torch.isin(before, after)).sum())
        self._current_history_buffer_offset = 0

    @torch.no_grad()
    def flush(self) -> None:
        """Admit (and evict for) the ids seen since the last admission now, and start the next interval here; the
        slots it frees or fills wait in `evict()` for their rows to be reset."""
        if self._current_iter < 0:  # no training step since this module was built or loaded
            return
        if self._current_history_buffer_offset:
            self._coalesce_history()
        self._last_eviction_iter = self._current_iter

    def restart(self) -> None:
        """After a load: the step count comes from the loaded buffer, the history starts empty."""
        self._current_iter, self._last_eviction_iter = -1, -1
        self._current_history_buffer_offset, self._evicted = 0, False

    # -- slot state: per slot (row of this remap's range), as checkpoints and artifacts keep it ------------------

    def slot_ids(self) -> torch.Tensor:
        """(N,) the mixed id holding each slot, FREE for a free one (the last slot always)."""
        return by_slot(self._mch_sorted_raw_ids, self._mch_remapped_ids_mapping, self._output_global_offset)

    def slot_scores(self) -> torch.Tensor:
        """(N,) each slot's eviction score (last access step for LRU, count for LFU: higher stays longer)."""
        return by_slot(self._mch_metadata[self.score_name], self._mch_remapped_ids_mapping,
                       self._output_global_offset)

    @torch.no_grad()
    def set_slots(self, ids: torch.Tensor, scores: torch.Tensor) -> None:
        """Make (N,) ids and scores per slot the remap's state: TorchRec's arrays sorted by id. The last slot must be
        free: sorting is stable, so the last of the free slots (the miss row TorchRec reads for unknown ids) ends
        last."""
        assert int(ids[-1]) == FREE, f"table {self._name!r}: the last slot of a shard must stay free"
        order = torch.argsort(ids, stable=True)
        self._mch_sorted_raw_ids.copy_(ids[order])
        self._mch_remapped_ids_mapping.copy_(order + self._output_global_offset)
        for name, buf in self._mch_metadata.items():
            buf.copy_(scores[order] if name == self.score_name else torch.zeros_like(buf))

    def take_stats(self) -> dict[str, int]:
        """Counts since the last call (then reset), and the slots in use now."""
        looked_up, missed = (int(v) for v in self._looked_up.tolist())
        self._looked_up.zero_()
        used = int((self._mch_sorted_raw_ids != FREE).sum())
        out = {"looked_up": looked_up, "missed": missed, "admitted": self.admitted, "evicted": self.evicted,
               "refused": self.refused, "slots_used": used, "slots": self._zch_size - 1}
        self.admitted = self.evicted = self.refused = 0
        return out

    def rebuild_with_output_id_range(self, output_id_range, output_segments, device=None) -> "ManagedRemap":
        """The shard of one rank (TorchRec's row-wise sharding calls this), keeping `admit_after`."""
        return type(self)(admit_after=self._admit_after, name=self._name,
                          zch_size=output_id_range[1] - output_id_range[0], device=device or self.device,
                          eviction_policy=self._eviction_policy, eviction_interval=self._eviction_interval,
                          input_hash_size=self._input_hash_size, input_hash_func=self._input_hash_func,
                          output_global_offset=output_id_range[0], output_segments=output_segments,
                          buckets=len(output_segments) - 1)


def by_slot(sorted_values: torch.Tensor, mapping: torch.Tensor, first_slot: int = 0) -> torch.Tensor:
    """TorchRec's arrays in sorted-id order (`mapping`: the global row of each position) -> the same per slot."""
    out = torch.empty_like(sorted_values)
    out[mapping - first_slot] = sorted_values
    return out


def remap_bytes_per_rank(tables: Sequence[TableDef], world_size: int) -> int:
    """What the managed tables' remaps hold on one rank besides their rows: TorchRec's MCH keeps three int64 per slot
    (the sorted raw ids, their slots, the last access) and 1,025 int64 output segments and a step counter per table
    (`hyrank plan` counts it; tests/test_plan.py checks it against the ranks)."""
    return sum(-(-t.num_embeddings // world_size) * 3 * 8 + (1025 + 1) * 8 for t in tables if t.managed is not None)


def remap_of(table: TableDef, *, device: torch.device, num_buckets: int) -> ManagedRemap:
    """The remap module of one managed table; `num_buckets`: the world size it will be sharded over (TorchRec's
    planner wants one bucket per rank or a multiple)."""
    m: ManagedTable = table.managed
    return ManagedRemap(admit_after=m.admit_after, name=table.name, zch_size=table.num_embeddings, device=device,
                        eviction_policy=eviction_policy(m.eviction), eviction_interval=m.eviction_interval_steps,
                        input_hash_size=INPUT_HASH_SIZE, input_hash_func=mix_ids, buckets=num_buckets)


def managed_collection(configs: list, tables: tuple[TableDef, ...] | list[TableDef], *, bagged: bool,
                       device: torch.device | None, num_buckets: int = 1):
    """TorchRec's ManagedCollisionEmbeddingBagCollection (`bagged`) or ManagedCollisionEmbeddingCollection over
    `configs` (EmbeddingBagConfigs / EmbeddingConfigs of managed tables only), one ManagedRemap per table."""
    from torchrec import EmbeddingBagCollection, EmbeddingCollection
    from torchrec.modules.mc_embedding_modules import (ManagedCollisionEmbeddingBagCollection,
                                                       ManagedCollisionEmbeddingCollection)
    from torchrec.modules.mc_modules import ManagedCollisionCollection

    by_name = {t.name: t for t in tables}
    device = device or torch.device("cpu")
    remaps = {c.name: remap_of(by_name[c.name], device=device, num_buckets=num_buckets) for c in configs}
    mcc = ManagedCollisionCollection(remaps, configs)
    if bagged:
        return ManagedCollisionEmbeddingBagCollection(EmbeddingBagCollection(tables=configs, device=device), mcc)
    return ManagedCollisionEmbeddingCollection(EmbeddingCollection(tables=configs, device=device), mcc)


def remaps_of(module: torch.nn.Module) -> Mapping[str, ManagedRemap]:
    """Every ManagedRemap under `module` (sharded or not), by its module path."""
    return {name: m for name, m in module.named_modules() if isinstance(m, ManagedRemap)}


def reset_seed(table: str, first_slot: int, step: int) -> int:
    """The seed of the fresh weights a shard's slots get at one step: the same in a run that never stopped."""
    return (zlib.crc32(table.encode()) * 1_000_003 + first_slot * 7919 + step) % (1 << 62)
