"""The training batch: what the reader yields and the ranking model eats.

Legend: B batch rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from hyrank.embeddings.dedup import DedupIndex


@dataclass
class Batch(Pipelineable):
    """One batch of rows on one rank.

    `pooled` feeds the EmbeddingBagCollection and `sequence` the EmbeddingCollection (keys in the order of
    embeddings.tables.EmbeddingLayout); sequences are truncated to their max length, oldest event first.
    With `embeddings.dedup` on, `sequence` holds each table's distinct ids instead (keys dedup_key(table)) and
    `sequence_index` says how to rebuild every event from them (embeddings/dedup.py). The features of managed tables
    (embeddings/managed.py) come in `managed_pooled` and `managed_sequence` (raw ids, for the managed-collision
    collections), None when the spec has none.
    """

    pooled: KeyedJaggedTensor
    sequence: KeyedJaggedTensor
    dense: torch.Tensor  # (B, dense_dim) float32, normalised
    labels: torch.Tensor  # (B,) float32 in {0, 1}
    group_ids: torch.Tensor  # (B,) int64 query-level AUC group; zeros when the spec has no group column
    oracle_p: torch.Tensor | None = None  # (B,) true click probability, only for synthetic data
    sequence_index: DedupIndex | None = None  # set when the sequences are deduplicated
    # (B,) float32: 1 for real rows, 0 for the filler rows that keep every rank's batch full (pipeline/data/reader.py);
    # None when every row is real
    weights: torch.Tensor | None = None
    managed_pooled: KeyedJaggedTensor | None = None
    managed_sequence: KeyedJaggedTensor | None = None

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]

    @property
    def num_real(self) -> int:
        """Rows that are data, not filler."""
        return self.batch_size if self.weights is None else int(self.weights.sum().item())

    @property
    def dedup_ratio(self) -> float | None:
        """Distinct sequence ids / sequence events of this batch; None when not deduplicated."""
        return None if self.sequence_index is None else self.sequence_index.dedup_ratio

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            pooled=self.pooled.to(device=device, non_blocking=non_blocking),
            sequence=self.sequence.to(device=device, non_blocking=non_blocking),
            dense=self.dense.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            group_ids=self.group_ids.to(device=device, non_blocking=non_blocking),
            oracle_p=None if self.oracle_p is None else self.oracle_p.to(device=device, non_blocking=non_blocking),
            sequence_index=None if self.sequence_index is None
            else self.sequence_index.to(device=device, non_blocking=non_blocking),
            weights=None if self.weights is None else self.weights.to(device=device, non_blocking=non_blocking),
            managed_pooled=None if self.managed_pooled is None
            else self.managed_pooled.to(device=device, non_blocking=non_blocking),
            managed_sequence=None if self.managed_sequence is None
            else self.managed_sequence.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.pooled.record_stream(stream)
        self.sequence.record_stream(stream)
        for t in (self.dense, self.labels, self.group_ids, self.oracle_p, self.sequence_index, self.weights,
                  self.managed_pooled, self.managed_sequence):
            if t is not None:
                t.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            pooled=self.pooled.pin_memory(),
            sequence=self.sequence.pin_memory(),
            dense=self.dense.pin_memory(),
            labels=self.labels.pin_memory(),
            group_ids=self.group_ids.pin_memory(),
            oracle_p=None if self.oracle_p is None else self.oracle_p.pin_memory(),
            sequence_index=None if self.sequence_index is None else self.sequence_index.pin_memory(),
            weights=None if self.weights is None else self.weights.pin_memory(),
            managed_pooled=None if self.managed_pooled is None else self.managed_pooled.pin_memory(),
            managed_sequence=None if self.managed_sequence is None else self.managed_sequence.pin_memory(),
        )
