"""The sharded side of managed tables: TorchRec's sharded MC-EBC / MC-EC with hyrank's eviction, miss row and state.

    sharders = managed_sharders(ebc_sharder, ec_sharder)   # embeddings/sharding.py make_sharders appends them
    for shard in table_shards(dmp):                         # each managed table's slots on this rank
        ids_N, scores_N = shard.slot_ids(), shard.slot_scores()

What TorchRec 1.8 does on eviction, and why hyrank replaces it (`_evict`): it resets an evicted slot's optimizer
state through fbgemm's `reset_weight_momentum`, which has no CPU kernel (the first eviction fails on CPU under
row-wise Adagrad) and is skipped for every other optimizer (plain Adagrad keeps the evicted id's accumulator);
hyrank resets the rows of the fused table (weights from the table's init range, seeded by table, shard and step)
and zeroes every optimizer state of those rows, on any device, for any fused optimizer.

The miss row. Every id without a slot reads the last slot of its shard; TorchRec trains that row like any other.
hyrank zeroes it before each lookup, so an unknown id is a zero vector: the same on every rank and after a
change of world size (a trained miss row per shard would differ between shards, and the same data would score
differently on another number of ranks).

Slot state. A shard keeps (mixed id, score) per sorted position; `slot_ids` / `slot_scores` are the same per slot
(row of the shard), which is how checkpoints store them: indexed like the table's rows, they reshard with them
(pipeline/distributed/managed_state.py). `set_slots` writes them back in TorchRec's sorted form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchrec.distributed.mc_embedding import (ManagedCollisionEmbeddingCollectionSharder,
                                               ShardedManagedCollisionEmbeddingCollection)
from torchrec.distributed.mc_embeddingbag import (ManagedCollisionEmbeddingBagCollectionSharder,
                                                  ShardedManagedCollisionEmbeddingBagCollection)

from hyrank.embeddings.managed import ManagedRemap, reset_seed


@dataclass
class TableShard:
    """One managed table's slots on this rank: its remap, and its rows and optimizer state in the fused table."""

    name: str
    remap: ManagedRemap
    tbe: Any  # fbgemm's SplitTableBatchedEmbeddingBagsCodegen holding the rows
    index: int  # the table's position in that TBE
    init_range: tuple[float, float]

    @property
    def first_slot(self) -> int:
        """The global row of this shard's first slot."""
        return self.remap._output_global_offset

    @property
    def num_slots(self) -> int:
        return self.remap._zch_size

    def weights(self) -> torch.Tensor:
        """(N, D) a view of the rows in the fused table: writes land there."""
        return self.tbe.split_embedding_weights()[self.index]

    def optimizer_states(self) -> list[torch.Tensor]:
        """Views of the fused optimizer's state of these rows ((N,) or (N, D) each; none for SGD)."""
        states = self.tbe.get_optimizer_state()
        return list(states[self.index].values()) if states else []

    @torch.no_grad()
    def zero_miss_row(self) -> None:
        self.weights()[self.num_slots - 1] = 0

    @torch.no_grad()
    def reset_rows(self, rows: torch.Tensor) -> None:
        """Fresh weights (uniform in the table's init range, seeded) and zero optimizer state for local `rows`."""
        weights = self.weights()
        gen = torch.Generator().manual_seed(reset_seed(self.name, self.first_slot, self.remap._current_iter))
        fresh = torch.empty(rows.numel(), weights.shape[1]).uniform_(*self.init_range, generator=gen)
        weights[rows.to(weights.device)] = fresh.to(weights.dtype).to(weights.device)
        for state in self.optimizer_states():
            state[rows.to(state.device)] = 0

    # -- slot state: per slot, as checkpoints keep it -------------------------------------------------------------

    def slot_ids(self) -> torch.Tensor:
        """(N,) the mixed id holding each slot, FREE for a free one (the last slot always)."""
        return self.remap.slot_ids()

    def slot_scores(self) -> torch.Tensor:
        """(N,) each slot's eviction score (last access step for LRU, count for LFU: higher stays longer)."""
        return self.remap.slot_scores()

    def set_slots(self, ids: torch.Tensor, scores: torch.Tensor) -> None:
        """Make (N,) ids and scores per slot the remap's state (ManagedRemap.set_slots)."""
        self.remap.set_slots(ids, scores)

    def row_payload(self, slots: torch.Tensor) -> torch.Tensor:
        """(k, D + state widths) float: the weights and optimizer state of local `slots`, side by side."""
        parts = [self.weights()[slots]] + [s[slots].reshape(slots.numel(), s[0].numel())
                                           for s in self.optimizer_states()]
        return torch.cat([p.float() for p in parts], dim=1)

    @torch.no_grad()
    def write_payload(self, slots: torch.Tensor, payload: torch.Tensor) -> None:
        """Write `row_payload`'s layout back into local `slots`."""
        start = 0
        for target in [self.weights()] + self.optimizer_states():
            width = target[0].numel()
            target[slots] = payload[:, start:start + width].reshape((slots.numel(),) + target.shape[1:]).to(target)
            start += width


class _ManagedLookup:
    """hyrank's eviction and miss row in TorchRec's sharded MC-EBC and MC-EC (the first base of both below)."""

    def table_shards(self) -> list[TableShard]:
        mcc = self._managed_collision_collection
        configs = self._embedding_module._table_name_to_config
        shards = []
        for name, remap in mcc._managed_collision_modules.items():
            tbe, index = self._table_to_tbe_and_index[name]
            cfg = configs[name]
            shards.append(TableShard(name, remap, tbe, int(index),
                                     (cfg.get_weight_init_min(), cfg.get_weight_init_max())))
        return shards

    def _evict(self, evictions_per_table: dict[str, torch.Tensor | None]) -> None:
        for shard in self.table_shards():
            rows = evictions_per_table.get(shard.name)
            if rows is not None and rows.numel():
                shard.reset_rows(rows.long())

    def compute(self, ctx, dist_input):
        for shard in self.table_shards():
            shard.zero_miss_row()  # trained by the last backward; unknown ids must read zeros
        return super().compute(ctx, dist_input)

    def flush(self) -> None:
        """Admit the pending history of every table now and reset the rows it gives away (a checkpoint's
        eviction point)."""
        for shard in self.table_shards():
            shard.remap.flush()
        self._evict(self._managed_collision_collection.evict())


class ShardedManagedEBC(_ManagedLookup, ShardedManagedCollisionEmbeddingBagCollection):
    pass


class ShardedManagedEC(_ManagedLookup, ShardedManagedCollisionEmbeddingCollection):
    pass


class ManagedEBCSharder(ManagedCollisionEmbeddingBagCollectionSharder):
    """TorchRec's MC-EBC sharder, making hyrank's sharded module."""

    def shard(self, module, params, env, device=None, module_fqn=None) -> ShardedManagedEBC:
        return ShardedManagedEBC(module, params, ebc_sharder=self._e_sharder, mc_sharder=self._mc_sharder, env=env,
                                 device=device or torch.device("cuda"))


class ManagedECSharder(ManagedCollisionEmbeddingCollectionSharder):
    """TorchRec's MC-EC sharder, making hyrank's sharded module."""

    def shard(self, module, params, env, device=None, module_fqn=None) -> ShardedManagedEC:
        return ShardedManagedEC(module, params, ec_sharder=self._e_sharder, mc_sharder=self._mc_sharder, env=env,
                                device=device or torch.device("cuda"))


def managed_sharders(ebc_sharder, ec_sharder) -> list:
    """Sharders of the managed collections, over the plain collections' sharders (row-wise only: TorchRec's MC
    sharding supports nothing else)."""
    return [ManagedEBCSharder(ebc_sharder=ebc_sharder), ManagedECSharder(ec_sharder=ec_sharder)]


def managed_lookups(module: nn.Module) -> dict[str, _ManagedLookup]:
    """The sharded managed collections under `module` (a DMP), by module path."""
    return {name: m for name, m in module.named_modules() if isinstance(m, _ManagedLookup)}


def table_shards(module: nn.Module) -> list[TableShard]:
    """Every managed table's shard on this rank, in module order."""
    return [s for lookup in managed_lookups(module).values() for s in lookup.table_shards()]


def flush_managed(module: nn.Module) -> None:
    """Admit every managed table's pending ids now (before a checkpoint; no collective)."""
    for lookup in managed_lookups(module).values():
        lookup.flush()
