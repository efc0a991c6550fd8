"""What every dense tower eats and returns.

Legend: B batch rows, L sequence length (padded), D_b width of block b, D_s width of sequence s's event vector.
Towers are pure single-device PyTorch: they see embedded tensors, never ids, KJTs or process groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceShape:
    dim: int  # event vector width (id embedding and side-info embeddings concatenated)
    max_len: int


@dataclass(frozen=True)
class InputShape:
    """Static widths of a tower's inputs, fixed by the feature spec; each model's constructor takes one."""

    blocks: dict[str, int]  # semantic block -> width of its concatenated features
    dense_dim: int  # dense features outside any block
    sequences: dict[str, SequenceShape]

    @property
    def non_seq_dim(self) -> int:
        return sum(self.blocks.values()) + self.dense_dim


@dataclass
class SequenceInput:
    """One behaviour sequence, padded: values (B, L, D_s), mask (B, L) True on real events.

    Events are oldest first and left-aligned: row b holds its events in [0, length_b).
    """

    values_BLD: torch.Tensor
    mask_BL: torch.Tensor

    def mean_pool(self) -> torch.Tensor:
        """(B, D_s) mean over real events; zeros for an empty sequence."""
        m = self.mask_BL.unsqueeze(-1).to(self.values_BLD.dtype)
        return (self.values_BLD * m).sum(1) / m.sum(1).clamp(min=1.0)


@dataclass
class TowerInput:
    blocks: dict[str, torch.Tensor]  # block -> (B, D_b)
    dense: torch.Tensor  # (B, dense_dim), may have 0 columns
    sequences: dict[str, SequenceInput]

    @property
    def batch_size(self) -> int:
        return self.dense.shape[0]


@dataclass
class TowerOutput:
    logits: torch.Tensor  # (B,)
