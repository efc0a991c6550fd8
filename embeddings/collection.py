"""The sparse arch: every embedding lookup of a ranking model, as TorchRec modules that DMP can shard.

    layout = EmbeddingLayout(tables=..., lookups=...)
    arch = SparseArch(layout, device=torch.device("meta"))   # DMP materialises and shards it
    out = arch(pooled_kjt, sequence_kjt)                       # SparseOutput

Legend: B batch rows, D embedding dim, N total events of a feature in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection, JaggedTensor, KeyedJaggedTensor

from embeddings.tables import EmbeddingLayout


@dataclass
class SparseOutput:
    """Embedded features: pooled vectors per feature, and per-event vectors for sequence features."""

    pooled: dict[str, torch.Tensor]  # feature -> (B, D)
    sequences: dict[str, JaggedTensor]  # feature -> values (N, D), lengths (B,)


class SparseArch(nn.Module):
    """EmbeddingBagCollection for pooled-only tables, EmbeddingCollection for tables read by sequences."""

    def __init__(self, layout: EmbeddingLayout, *, device: torch.device | None = None):
        super().__init__()
        self.layout = layout
        ebc_configs, ec_configs = layout.ebc_configs(), layout.ec_configs()
        self.ebc = EmbeddingBagCollection(tables=ebc_configs, device=device) if ebc_configs else None
        self.ec = EmbeddingCollection(tables=ec_configs, device=device) if ec_configs else None
        self._ec_pooled = [lk for lk in layout.lookups if lk.kind == "pooled" and lk.feature in layout.ec_features]

    def forward(self, pooled: KeyedJaggedTensor, sequence: KeyedJaggedTensor) -> SparseOutput:
        out_pooled: dict[str, torch.Tensor] = {}
        if self.ebc is not None:
            out_pooled.update(self.ebc(pooled).to_dict())
        seqs: dict[str, JaggedTensor] = self.ec(sequence) if self.ec is not None else {}
        for lk in self._ec_pooled:
            out_pooled[lk.feature] = pool_jagged(seqs[lk.feature], lk.pooling)
        sequences = {k: v for k, v in seqs.items() if self.layout.lookup(k).kind == "sequence"}
        return SparseOutput(pooled=out_pooled, sequences=sequences)


def pool_jagged(jt: JaggedTensor, mode: str) -> torch.Tensor:
    """Sum or mean of each row's vectors: (N, D) values with (B,) lengths -> (B, D); empty rows give zeros."""
    lengths = jt.lengths()
    values = jt.values()
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
    out = values.new_zeros(lengths.numel(), values.shape[-1]).index_add_(0, rows, values)
    if mode == "mean":
        out = out / lengths.clamp(min=1).unsqueeze(-1).to(out.dtype)
    return out
