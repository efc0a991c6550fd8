"""Managed tables (embeddings/managed.py) in an artifact: the remap rebuilt whole, looked up in eval mode, unknown
ids counted.

    state = load_template(model)                    # export: what to DCP-load a checkpoint into, unsharded
    load_loaded(model, state, source)               # then: remaps rebuilt from their slots, free rows zeroed
    scoring = ManagedScoringModule(model, ...)      # inputs -> (logits, unknown ids per row and table, ids per ...)

The remap. A checkpoint keeps each managed table's remap per slot (`<table prefix>.slot_ids`, `.slot_scores`, indexed
like the table's rows: pipeline/distributed/managed_state.py), whatever the number of ranks that wrote it. Export
reads the whole table's slots and rebuilds the unsharded remap from them (TorchRec's sorted (mixed) ids and the row
of each); the program applies the same `mix_ids` to a request's raw ids (TorchRec's input_hash_func of the
module), so an id reads the row it had in training. The program runs the remap in eval mode: TorchRec's MCH module
neither records history nor admits nor evicts then, so a lookup never changes the artifact.

The fallback row. An id that holds no slot (never seen, not admitted yet, or evicted) reads the table's last row:
the last slot of the last shard, which training keeps free and zeroes before each lookup. Export zeroes every row
no id holds (that one, the other shards' miss rows, free slots), so an unknown id reads a zero vector exactly as
in training, and rows no request can reach carry nothing. Eviction scores are training state: an artifact carries
none (zeros), so that deltas (pipeline/serving/delta.py) never ship them.

Counting. The program returns, beside the logits, per row and managed table the ids looked up and those that found
no slot; the server sums them per request into /metrics (hyrank_managed_ids_total, hyrank_unknown_ids_total).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from hyrank.embeddings.managed import FREE, ManagedRemap, remaps_of

SLOT_STATE = ("slot_ids", "slot_scores")  # what a checkpoint keeps of a remap, per slot
# TorchRec's positional buffers, rebuilt from the slots (or, for the output segments, the unsharded module's own)
REBUILT = ("_mch_sorted_raw_ids", "_mch_remapped_ids_mapping", "_mch_last_access_iter", "_mch_counts",
           "_output_segments_tensor")
FALLBACK = "zero"  # what an id without a slot reads: the manifest says it, the README explains it


def load_template(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state to DCP-load a checkpoint into for the unsharded `model`: its own, each managed remap's positional
    buffers replaced by the checkpoint's per-slot state (whole tables: the unsharded remap's size)."""
    state = model.state_dict()
    for path, remap in remaps_of(model).items():
        for key in REBUILT:
            state.pop(f"{path}.{key}", None)
        for key in SLOT_STATE:
            state[f"{path}.{key}"] = torch.empty(remap._zch_size, dtype=torch.int64)
    return state


def load_loaded(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, int]:
    """Make `state` (load_template's, filled by DCP from `source`) the model's: managed remaps rebuilt from their
    slots and every row no id holds zeroed; returns the slots used per managed table (empty without one)."""
    remaps = remaps_of(model)
    state, used = dict(state), {}
    for path, remap in remaps.items():
        ids, _ = (state.pop(f"{path}.{key}") for key in SLOT_STATE)
        if int(ids[-1]) != FREE:
            raise ValueError(f"{source}: managed table {remap._name!r}: its last slot (the row unknown ids read) "
                             "holds an id: not a checkpoint of hyrank's managed tables")
        remap.set_slots(ids, torch.zeros_like(ids))
        remap.restart()
        used[remap._name] = int((ids != FREE).sum())
    if not remaps:
        model.load_state_dict(state)
        return used
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k.rsplit(".", 1)[-1] not in REBUILT]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{source}: model state: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    with torch.no_grad():
        for name, weight in managed_weights(model).items():
            remap = next(r for r in remaps.values() if r._name == name)
            weight[remap.slot_ids() == FREE] = 0  # the fallback row (the last) and every row no id can reach
    return used


def managed_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each managed table's weight (rows) in the unsharded model, by table."""
    out = {}
    for mc in (model.sparse.mc_ebc, model.sparse.mc_ec):
        if mc is not None:
            tables = getattr(mc._embedding_module, "embedding_bags", None) or mc._embedding_module.embeddings
            out.update({name: module.weight for name, module in tables.items()})
    return out


def managed_tables(model: nn.Module) -> list[str]:
    """The managed tables in the order of the program's count columns (MC-EBC's, then MC-EC's)."""
    return [name for mc in (model.sparse.mc_ebc, model.sparse.mc_ec) if mc is not None
            for name in mc._managed_collision_collection._managed_collision_modules]


class ManagedScoringModule(nn.Module):
    """pipeline/serving/export.py's ScoringModule for a model with managed tables: two more inputs, the managed
    features' raw ids and lengths (the batch's managed pooled keys, then its managed sequence keys), and two more
    outputs, (B, T) ids looked up and ids without a slot per row and managed table (`managed_tables` order).

    The sparse arch's forward, with each managed collection's remap called on its own so that its output (the
    rows the ids read) is counted: TorchRec's MC collection forward is that remap, then the lookup."""

    def __init__(self, model: nn.Module, pooled_keys: list[str], sequence_keys: list[str],
                 managed_pooled_keys: list[str], managed_sequence_keys: list[str]):
        super().__init__()
        self.model, self.pooled_keys, self.sequence_keys = model, pooled_keys, sequence_keys
        self.managed_keys = list(managed_pooled_keys) + list(managed_sequence_keys)
        self.managed_splits = [len(managed_pooled_keys), len(managed_sequence_keys)]

    def forward(self, pooled_values: torch.Tensor, pooled_lengths: torch.Tensor, sequence_values: torch.Tensor,
                sequence_lengths: torch.Tensor, dense: torch.Tensor, managed_values: torch.Tensor,
                managed_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sparse, rows = self.model.sparse, dense.shape[0]
        pooled = KeyedJaggedTensor(keys=self.pooled_keys, values=pooled_values, lengths=pooled_lengths)
        sequence = KeyedJaggedTensor(keys=self.sequence_keys, values=sequence_values, lengths=sequence_lengths)
        managed = KeyedJaggedTensor(keys=self.managed_keys, values=managed_values, lengths=managed_lengths)
        ebc_out = sparse.ebc(pooled) if sparse.ebc is not None else None
        ec_out = sparse.ec(sequence) if sparse.ec is not None else None
        looked_up, unknown, outs = [], [], []
        for mc, kjt in zip((sparse.mc_ebc, sparse.mc_ec), managed.split(self.managed_splits)):
            if mc is None:
                outs.append(None)
                continue
            mcc = mc._managed_collision_collection
            remapped = mcc(kjt)  # eval mode: no history, no admission, no eviction
            outs.append((mc._embedding_module(remapped), None))
            for remap, part in zip(mcc._managed_collision_modules.values(), remapped.split(mcc._table_feature_splits)):
                ids, missed = _per_row(remap, part, rows)
                looked_up.append(ids)
                unknown.append(missed)
        embedded = sparse.assemble(ebc_out, ec_out, None, outs[0], outs[1])
        logits = self.model.tower(self.model.tokens(embedded, dense)).logits
        return logits, torch.stack(looked_up, dim=1), torch.stack(unknown, dim=1)


def _per_row(remap: ManagedRemap, kjt: KeyedJaggedTensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) ids of one table's features in each row, and those that read the fallback row (no slot)."""
    missed = (kjt.values() == remap.miss_slot).to(torch.int64)
    running = torch.cat([missed.new_zeros(1), missed.cumsum(0)])
    offsets = kjt.offsets()
    keys = len(kjt.keys())
    per_key_row = running[offsets[1:]] - running[offsets[:-1]]
    return kjt.lengths().view(keys, rows).sum(0), per_key_row.view(keys, rows).sum(0)
