"""The sparse arch: every embedding lookup of a ranking model, as TorchRec modules that DMP can shard.

    layout = EmbeddingLayout(tables=..., lookups=...)
    arch = SparseArch(layout, device=torch.device("meta"))   # DMP materialises and shards it
    ids = arch.sequence_feed(sequence_kjt)                     # on the host (the reader's converter): SequenceIds
    out = arch(pooled_kjt, ids.kjt, ids.index)                 # SparseOutput

    arch = SparseArch(layout, device=..., dedup=True)          # embeddings.dedup: look up distinct ids once; its
    ids = arch.sequence_feed(sequence_kjt)                     # feed yields distinct ids and a DedupIndex, and
    out = arch(pooled_kjt, ids.kjt, ids.index)                 # out is the same, with out.dedup_ratio set

`dedup` is a switch of this module alone: the EC's keys and the feed that fills them come from it, and batch
producers take `sequence_feed` from the model instead of a setting of their own, so they cannot disagree.

Managed tables (embeddings/managed.py) live in `mc_ebc` / `mc_ec`, TorchRec's managed-collision twins of the EBC
and EC, fed raw ids: `out = arch(pooled_kjt, ids.kjt, ids.index, managed_pooled_kjt, ids.managed_kjt)`. The sequence
feed splits their keys off (SequenceIds.managed_kjt), deduplicated or not like the others.

Legend: B batch rows, D embedding dim, N total events of a feature in the batch, U distinct ids of a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection, JaggedTensor, KeyedJaggedTensor, KeyedTensor

from hyrank.embeddings.dedup import DedupIndex, SequenceFeed, dedup_key, expand_sequences
from hyrank.embeddings.managed import managed_collection
from hyrank.embeddings.tables import EmbeddingLayout


@dataclass
class SparseOutput:
    """Embedded features: pooled vectors per feature, and per-event vectors for sequence features."""

    pooled: dict[str, torch.Tensor]  # feature -> (B, D)
    sequences: dict[str, JaggedTensor]  # feature -> values (N, D), lengths (B,)
    dedup_ratio: float | None = None  # distinct ids / events of the sequence lookup; None on the plain path
    # (B, sum of D) the EBC's output; pooled[f] of an EBC feature is its columns pooled_columns[f] = (start, stop),
    # so features adjacent there can be read as one slice without a copy (the sharded EBC's key order is its own,
    # not the layout's). None without an EBC
    pooled_values: torch.Tensor | None = None
    pooled_columns: dict[str, tuple[int, int]] | None = None


class SparseArch(nn.Module):
    """EmbeddingBagCollection for pooled-only tables, EmbeddingCollection for tables read by sequences.

    `dedup=True` builds the EC over one key of distinct ids per table (embeddings.dedup); the batch then
    carries those ids and a DedupIndex, made on the host by `sequence_feed`, and the output is rebuilt event by
    event, identical to the plain path.
    `transforms` (sequence feature -> position-independent module, e.g. a projection of the item embedding)
    run on the looked-up rows of that feature: on U distinct rows with dedup, on all N events without.
    """

    def __init__(self, layout: EmbeddingLayout, *, device: torch.device | None = None, dedup: bool = False,
                 transforms: Mapping[str, nn.Module] | None = None, num_buckets: int = 1):
        """`num_buckets`: the world size the managed tables will be sharded over (1 unsharded)."""
        super().__init__()
        # One switch feeds both sides: the host step batches go through, and the EC keys it fills.
        self.sequence_feed: SequenceFeed = layout.sequence_feed(dedup=dedup)
        self.dedup = self.sequence_feed.dedup
        ebc_configs, ec_configs = layout.ebc_configs(), layout.ec_configs(dedup=self.dedup)
        self.ebc = EmbeddingBagCollection(tables=ebc_configs, device=device) if ebc_configs else None
        self.ec = EmbeddingCollection(tables=ec_configs, device=device) if ec_configs else None
        mc_ebc_configs = layout.ebc_configs(managed=True)
        mc_ec_configs = layout.ec_configs(dedup=self.dedup, managed=True)
        self.mc_ebc = managed_collection(mc_ebc_configs, layout.tables, bagged=True, device=device,
                                         num_buckets=num_buckets) if mc_ebc_configs else None
        self.mc_ec = managed_collection(mc_ec_configs, layout.tables, bagged=False, device=device,
                                        num_buckets=num_buckets) if mc_ec_configs else None
        self.assemble = _Assemble(layout, self.dedup, transforms)

    def forward(self, pooled: KeyedJaggedTensor, sequence: KeyedJaggedTensor,
                sequence_index: DedupIndex | None = None, managed_pooled: KeyedJaggedTensor | None = None,
                managed_sequence: KeyedJaggedTensor | None = None) -> SparseOutput:
        # Only the lookups and a call to a module without tables: TorchRec's TrainPipelineSparseDist
        # FX-traces this forward to find the sharded modules' inputs, and treats `assemble` as an opaque leaf.
        if self.dedup:
            _require_index(sequence_index)
        else:
            _refuse_index(sequence_index)
        ebc_out = self.ebc(pooled) if self.ebc is not None else None
        ec_out = self.ec(sequence) if self.ec is not None else None
        # (embeddings, remapped ids: None) tuples; the assembly reads the embeddings
        mc_ebc_out = self.mc_ebc(managed_pooled) if self.mc_ebc is not None else None
        mc_ec_out = self.mc_ec(managed_sequence) if self.mc_ec is not None else None
        return self.assemble(ebc_out, ec_out, sequence_index, mc_ebc_out, mc_ec_out)


class _Assemble(nn.Module):
    """Lookup results -> SparseOutput: rebuild deduplicated sequences, apply transforms, pool shared features."""

    def __init__(self, layout: EmbeddingLayout, dedup: bool, transforms: Mapping[str, nn.Module] | None):
        super().__init__()
        self.layout, self.dedup = layout, dedup
        # the EC's and the MC-EC's output keys: features, or one key of distinct ids per table
        self._ec_keys = [dedup_key(t.name) for t in layout.plain_ec_tables] if dedup \
            else layout.features_of(layout.plain_ec_tables)
        self._mc_ec_keys = [dedup_key(t.name) for t in layout.mc_ec_tables] if dedup \
            else layout.features_of(layout.mc_ec_tables)
        self._ec_pooled = [lk for lk in layout.lookups if lk.kind == "pooled" and lk.feature in layout.ec_features]
        self._sequence_features = [f for f in layout.ec_features if layout.lookup(f).kind == "sequence"]
        unknown = sorted(set(transforms or {}) - set(self._sequence_features))
        if unknown:
            raise ValueError(f"transforms name {unknown}, which are not sequence features {self._sequence_features}")
        self.transforms = nn.ModuleDict(dict(transforms or {}))

    def forward(self, ebc_out: KeyedTensor | None, ec_out: dict[str, JaggedTensor] | None,
                index: DedupIndex | None, mc_ebc_out: tuple | None = None,
                mc_ec_out: tuple | None = None) -> SparseOutput:
        out_pooled: dict[str, torch.Tensor] = ebc_out.to_dict() if ebc_out is not None else {}
        if mc_ebc_out is not None:
            out_pooled.update(mc_ebc_out[0].to_dict())
        if mc_ec_out is not None:  # one dict of every sequence lookup, plain and managed
            looked_up = mc_ec_out[0]
            ec_out = {**{k: ec_out[k] for k in self._ec_keys}, **{k: looked_up[k] for k in self._mc_ec_keys}}
        seqs = self._sequences(ec_out, index) if ec_out is not None else {}
        for lk in self._ec_pooled:
            out_pooled[lk.feature] = pool_jagged(seqs[lk.feature], lk.pooling)
        sequences = {k: seqs[k] for k in self._sequence_features}
        ratio = index.dedup_ratio if index is not None else None
        if ebc_out is None:
            return SparseOutput(pooled=out_pooled, sequences=sequences, dedup_ratio=ratio)
        offsets = ebc_out.offset_per_key()
        columns = {k: (offsets[i], offsets[i + 1]) for i, k in enumerate(ebc_out.keys())}
        return SparseOutput(pooled=out_pooled, sequences=sequences, dedup_ratio=ratio,
                            pooled_values=ebc_out.values(), pooled_columns=columns)

    def _sequences(self, ec_out: dict[str, JaggedTensor], index: DedupIndex | None) -> dict[str, JaggedTensor]:
        if self.dedup:
            return expand_sequences(ec_out, index, dict(self.transforms.items()))
        seqs = {f: ec_out[f] for f in self.layout.ec_features}
        for feature, transform in self.transforms.items():
            seqs[feature] = JaggedTensor(values=transform(seqs[feature].values()), lengths=seqs[feature].lengths())
        return seqs


_NOT_FED = ("it was not made with this model's sequence_feed (embeddings.dedup is a switch of the model alone: "
            "pass sequence_feed=model.sequence_feed to the BatchConverter or DayReader)")


def _require_index(index: DedupIndex | None) -> DedupIndex:
    if index is None:
        raise ValueError(f"SparseArch(dedup=True) got a batch without a dedup index: {_NOT_FED}")
    return index


def _refuse_index(index: DedupIndex | None) -> None:
    if index is not None:
        raise ValueError(f"SparseArch(dedup=False) got a deduplicated batch: {_NOT_FED}")


# Opaque to TrainPipelineSparseDist's FX trace: they branch on None.
torch.fx.wrap("_require_index")
torch.fx.wrap("_refuse_index")


def pool_jagged(jt: JaggedTensor, mode: str) -> torch.Tensor:
    """Sum or mean of each row's vectors: (N, D) values with (B,) lengths -> (B, D); empty rows give zeros."""
    lengths = jt.lengths()
    values = jt.values()
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
    out = values.new_zeros(lengths.numel(), values.shape[-1]).index_add_(0, rows, values)
    if mode == "mean":
        out = out / lengths.clamp(min=1).unsqueeze(-1).to(out.dtype)
    return out
