"""The model as a checkpoint part, with its managed tables' remap state per slot, so that it reshards with the rows.

    part = ModelState(dmp)              # Checkpointer(tensors={"model": part, ...}) (pipeline/train/trainer.py)
    part.state_dict()                   # admits pending ids first: a checkpoint is an eviction point
    part.load_state_dict(state)         # then, once every part is loaded: part.after_load()

TorchRec keeps a managed table's remap as arrays in sorted-id order (embeddings/managed_lookup.py), each shard
mapping its ids to rows of its own range. Saved as they are, they would reshard by sorted position, not by row: on
another world size a shard would receive ids whose rows live on another rank. Checkpoints hold them per slot instead
(`<table prefix>.slot_ids` and `.slot_scores`, indexed like the table's rows), so DCP hands every rank the ids of
the rows it receives, with their optimizer state (TorchRec's own state dict would also refuse to grow: its saved
output segments must contain every new shard boundary).

After a load on another world size (or a warm start), an id may sit on a rank that does not own it (TorchRec routes
an id to the rank owning its part of the mixed id space: embeddings.managed.owner_rank), or in the slot that must
stay free for unknown ids. `after_load` moves each such id, with its row and optimizer state, to a free slot of its
owner (one all-to-all per table). A shard with more ids than slots keeps those with the highest eviction scores (the
most recently / frequently used) and drops the rest: counted, logged and returned, never silent.

A warm start of a resized managed table (`load_resized`) loads the checkpoint's ids and rows cut evenly across
the ranks at their old size and places every id the same way: all fit when the table grew, the best-scored ones
when it shrank; the optimizer state starts fresh, as for any warm start.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties

from hyrank.embeddings.managed import FREE, owner_rank
from hyrank.embeddings.managed_lookup import TableShard, flush_managed, table_shards

log = logging.getLogger(__name__)

MC = "._managed_collision_modules."
POSITIONAL = ("_mch_sorted_raw_ids", "_mch_remapped_ids_mapping", "_mch_last_access_iter", "_mch_counts",
              "_output_segments_tensor")  # TorchRec's buffers that the per-slot state replaces (or the load rebuilds)


class ModelState:
    """A DMP as a checkpoint part (Stateful), its managed tables' remap state saved per slot."""

    def __init__(self, dmp: torch.nn.Module):
        self.dmp = dmp
        self.dropped: dict[str, int] = {}  # ids the last load had no slot for, by table
        self.moved: dict[str, int] = {}  # ids the last after_load sent from this rank's slots (to their owners)

    def state_dict(self) -> dict[str, Any]:
        flush_managed(self.dmp)  # no pending history: a resumed run takes the steps an uninterrupted one takes
        state = self.dmp.state_dict()
        for shard in table_shards(self.dmp):
            prefix = _prefix(state, shard.name)
            like = state[prefix + "_mch_sorted_raw_ids"]
            for key in POSITIONAL:
                state.pop(prefix + key, None)
            state[prefix + "slot_ids"] = _with_local(like, shard.slot_ids())
            state[prefix + "slot_scores"] = _with_local(like, shard.slot_scores())
        return state

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        self.dropped = {}  # counted from here through load_resized and after_load
        state, keys = dict(state), list(self.dmp.state_dict(keep_vars=True))
        for shard in table_shards(self.dmp):
            prefix = _prefix(keys, shard.name)
            ids, scores = state.pop(prefix + "slot_ids", None), state.pop(prefix + "slot_scores", None)
            if ids is not None and scores is not None:
                shard.set_slots(_local(ids), _local(scores))
            shard.remap.restart()
        if not strict:  # a subset (a warm start): the rest stays as it is, given as itself (TorchRec's sharded EC
            # fails on a table left out of a state dict)
            state = {**{k: v for k, v in self.dmp.state_dict().items() if not _positional(k)}, **state}
        result = self.dmp.load_state_dict(state, strict=False)
        unexpected = list(result.unexpected_keys)
        missing = [k for k in result.missing_keys if not _positional(k)]
        if strict and (missing or unexpected):
            raise RuntimeError(f"model state: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def after_load(self) -> dict[str, int]:
        """Move every id to a free slot of the rank that owns it (collective; see the module's docstring)."""
        self.moved = {}
        for shard in table_shards(self.dmp):
            ids, scores = shard.slot_ids(), shard.slot_scores()
            last = torch.arange(ids.numel()) == ids.numel() - 1
            leave = (ids != FREE) & ((owner_rank(ids, _world_size()) != _rank()) | last)
            slots = leave.nonzero().flatten()
            self.moved[shard.name] = slots.numel()
            self._place(shard, ids, scores, slots, ids[slots], scores[slots], shard.row_payload(slots))
        _log_dropped(self.dropped, "after the load (moving to their owner ranks, or into a resized table)")
        return self.dropped

    # -- warm start of a resized table -------------------------------------------------------------------------

    def resized_template(self, saved: dict[str, Any], wanted: Callable[[str, bool], bool]) -> dict[str, Any]:
        """Targets for the checkpoint's ids, scores and rows of each managed table whose row count changed (and
        nothing else): at their saved size, cut evenly across this world's ranks. `saved`: DCP's metadata by key."""
        state = self.dmp.state_dict()
        out = {}
        for shard in table_shards(self.dmp):
            prefix = _prefix(state, shard.name)
            weight = _weight_key(state, shard.name)
            keys = (prefix + "slot_ids", prefix + "slot_scores", weight)
            if not all(k in saved for k in keys) or not wanted(weight, True):
                continue
            rows, width = saved[weight].size[0], tuple(saved[weight].size[1:])
            if rows == state[weight].size(0) or width != tuple(state[weight].size()[1:]):
                continue  # not resized (the plain path carries it), or of another width (nothing fits)
            out[keys[0]] = _row_split(rows, (), torch.int64)
            out[keys[1]] = _row_split(rows, (), torch.int64)
            out[keys[2]] = _row_split(rows, width, state[weight].dtype)
        return out

    def load_resized(self, loaded: dict[str, Any]) -> dict[str, int]:
        """Place the ids `resized_template`'s targets received into their tables, which start empty (collective);
        returns the ids dropped per table (a shard got more than its slots)."""
        state = self.dmp.state_dict()
        for shard in table_shards(self.dmp):
            prefix = _prefix(state, shard.name)
            if prefix + "slot_ids" not in loaded:
                continue
            ids, scores = _local(loaded[prefix + "slot_ids"]), _local(loaded[prefix + "slot_scores"])
            rows = _local(loaded[_weight_key(state, shard.name)]).float()
            take = (ids != FREE).nonzero().flatten()
            state_width = shard.row_payload(take[:0]).shape[1] - rows.shape[1]
            payload = torch.cat([rows[take], rows.new_zeros(take.numel(), state_width)], dim=1)  # fresh optimizer
            free_ids = torch.full((shard.num_slots,), FREE, dtype=torch.int64)
            shard.set_slots(free_ids, torch.zeros_like(free_ids))
            shard.remap.restart()
            self._place(shard, free_ids, torch.zeros_like(free_ids), torch.zeros(0, dtype=torch.int64), ids[take],
                        scores[take], payload)
        return self.dropped

    # -- the exchange ------------------------------------------------------------------------------------------

    def _place(self, shard: TableShard, ids: torch.Tensor, scores: torch.Tensor, vacate: torch.Tensor,
               out_ids: torch.Tensor, out_scores: torch.Tensor, out_rows: torch.Tensor) -> None:
        """Free local slots `vacate`, send (out_ids, out_scores, out_rows) to the ranks owning those ids, and
        write what this rank receives into free slots, keeping the best-scored ids when they do not all fit."""
        dest = owner_rank(out_ids, _world_size())
        order = torch.argsort(dest, stable=True)
        got_ids, got_rows = _all_to_all(torch.stack([out_ids, out_scores], dim=1)[order], out_rows[order],
                                         torch.bincount(dest, minlength=_world_size()))
        ids, scores = ids.clone(), scores.clone()
        ids[vacate], scores[vacate] = FREE, 0
        kept_local, keep = _best(ids, scores, got_ids[:, 0], got_ids[:, 1])
        offered = int((ids != FREE).sum()) + got_ids.shape[0]
        self.dropped[shard.name] = self.dropped.get(shard.name, 0) + offered - int(kept_local.sum() + keep.sum())
        lost = (ids != FREE) & ~kept_local  # local ids that gave way to better-scored incoming ones
        ids[lost], scores[lost] = FREE, 0
        slots = (ids == FREE).nonzero().flatten()[:-1][: int(keep.sum())]  # the last slot stays free
        ids[slots], scores[slots] = got_ids[keep, 0], got_ids[keep, 1]
        shard.write_payload(slots, got_rows[keep])
        shard.set_slots(ids, scores)


def _best(ids: torch.Tensor, scores: torch.Tensor, new_ids: torch.Tensor,
          new_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of a shard's ids (per slot, FREE: none) and the incoming ones fit in its slots but the last, best
    scores first (ties: the smaller id): (per slot: its id is kept, per incoming id: it is kept)."""
    held = ids != FREE
    all_ids, all_scores = torch.cat([ids[held], new_ids]), torch.cat([scores[held], new_scores])
    by_id = torch.argsort(all_ids, stable=True)
    order = by_id[torch.argsort(all_scores[by_id], descending=True, stable=True)]
    kept = torch.zeros(all_ids.numel(), dtype=torch.bool)
    kept[order[: ids.numel() - 1]] = True
    kept_local = torch.zeros_like(held)
    kept_local[held] = kept[: int(held.sum())]
    return kept_local, kept[int(held.sum()):]


def _all_to_all(ids_K2: torch.Tensor, rows_KP: torch.Tensor, counts: torch.Tensor):
    """Rows grouped by destination rank (`counts` per rank) -> the rows every rank sent here."""
    if _world_size() == 1:
        return ids_K2, rows_KP
    got_counts = torch.empty_like(counts)
    dist.all_to_all_single(got_counts, counts)
    sends, gets = counts.tolist(), got_counts.tolist()
    got_ids = ids_K2.new_empty(sum(gets), ids_K2.shape[1])
    got_rows = rows_KP.new_empty(sum(gets), rows_KP.shape[1])
    dist.all_to_all_single(got_ids, ids_K2.contiguous(), gets, sends)
    dist.all_to_all_single(got_rows, rows_KP.contiguous(), gets, sends)
    return got_ids, got_rows


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _positional(key: str) -> bool:
    """A TorchRec remap buffer that checkpoints replace by the per-slot state (or do not keep)."""
    return MC in key and key.rsplit(".", 1)[-1] in POSITIONAL


def _prefix(state, table: str) -> str:
    """`<module path>._managed_collision_modules.<table>.` among a state dict's keys."""
    marker = f"{MC}{table}."
    for key in state:
        if marker in key:
            return key[: key.index(marker) + len(marker)]
    raise KeyError(f"managed table {table!r} has no remap state in the model's state dict")


def _weight_key(state: dict[str, Any], table: str) -> str:
    return next(k for k in state if k.endswith((f"embedding_bags.{table}.weight", f"embeddings.{table}.weight"))
                and "_embedding_module" in k)


def _local(value: Any) -> torch.Tensor:
    return value.local_shards()[0].tensor if isinstance(value, ShardedTensor) else value


def _with_local(like: ShardedTensor, local: torch.Tensor) -> ShardedTensor:
    """A ShardedTensor of `like`'s layout holding `local` as this rank's shard (no collective)."""
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        [Shard(local, like.local_shards()[0].metadata)], like.metadata(), process_group=like._process_group)


def _row_split(rows: int, width: tuple[int, ...], dtype: torch.dtype) -> ShardedTensor:
    """An empty (rows, *width) tensor cut into equal row ranges over the ranks, this rank's range allocated."""
    ws, rank = _world_size(), _rank()
    step = -(-rows // ws)
    metas = [ShardMetadata([min(r * step, rows)] + [0] * len(width),
                           [max(0, min(step, rows - r * step))] + list(width), f"rank:{r}/cpu") for r in range(ws)]
    local = torch.empty([metas[rank].shard_sizes[0], *width], dtype=dtype)
    meta = ShardedTensorMetadata(metas, torch.Size([rows, *width]), TensorProperties(dtype=dtype))
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        [Shard(local, metas[rank])], meta, process_group=dist.GroupMember.WORLD if dist.is_initialized() else None)


def managed_stats(dmp: torch.nn.Module, comm) -> dict[str, dict[str, int]]:
    """Each managed table's counts since the last call, summed over the ranks (collective: `comm`, a Collectives):
    ids looked up and missed (no slot: not admitted yet, refused or the table full; they read zeros), ids admitted,
    evicted and refused admission (admit_after), and slots used of the slots there are."""
    per_table = {}
    for shard in table_shards(dmp):
        mine = shard.remap.take_stats()
        per_table[shard.name] = {k: per_table.get(shard.name, {}).get(k, 0) + v for k, v in mine.items()}
    names = sorted(per_table)
    keys = sorted(next(iter(per_table.values()), {}))
    total = comm.sum_ints([per_table[t][k] for t in names for k in keys]) if names else []
    return {t: dict(zip(keys, total[i * len(keys):(i + 1) * len(keys)])) for i, t in enumerate(names)}


def describe_stats(stats: dict[str, dict[str, int]]) -> str:
    """One line per managed table, for the day's log."""
    return "; ".join(f"table {t!r}: {s['missed']} of {s['looked_up']} ids without a slot (read as zeros), "
                     f"{s['admitted']} admitted, {s['evicted']} evicted, {s['refused']} refused, "
                     f"{s['slots_used']}/{s['slots']} slots used" for t, s in stats.items())


def _log_dropped(dropped: dict[str, int], when: str) -> None:
    for table, count in dropped.items():
        if count and _rank() == 0:
            log.warning("managed table %r: %d id(s) found no free slot %s (a rank's share of the table is full): "
                        "those with the lowest eviction scores were dropped", table, count, when)
