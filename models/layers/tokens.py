"""Tokenisation shared by the token-based towers: blocks -> d-wide tokens, sequences -> per-event or pooled tokens.

Legend: B batch rows, M non-sequence tokens, S sequences, L padded length, N kept events, D token width,
D_b block width, D_s event width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hyrank.models.inputs import InputShape, SequenceInput, TowerInput

DENSE = "_dense"  # token group name of the dense features outside any block


@dataclass
class NonSeqTokens:
    tokens_BMD: torch.Tensor
    slices: dict[str, slice]  # block (or DENSE) -> its token positions in tokens_BMD


def block_token_slices(shape: InputShape, tokens_per_block: int = 1) -> dict[str, slice]:
    """Token positions of each block (and of the dense rest, DENSE, when present) in BlockTokenizer's output."""
    names = list(shape.blocks) + ([DENSE] if shape.dense_dim else [])
    return {name: slice(i * tokens_per_block, (i + 1) * tokens_per_block) for i, name in enumerate(names)}


class BlockTokenizer(nn.Module):
    """Each semantic block gets its own projection to `tokens_per_block` tokens of width D (semantic grouping).

    A wide block may be split into several tokens (tokens_per_block > 1). Dense features outside blocks form one
    more group when present. Projections are block-specific: block k's weights only ever see block k's features.
    """

    def __init__(self, shape: InputShape, dim: int, *, tokens_per_block: int = 1):
        super().__init__()
        widths = dict(shape.blocks) | ({DENSE: shape.dense_dim} if shape.dense_dim else {})
        self.dim, self.tokens_per_block = dim, tokens_per_block
        self.proj = nn.ModuleDict({name: nn.Linear(w, tokens_per_block * dim) for name, w in widths.items()})
        self.slices = block_token_slices(shape, tokens_per_block)

    @property
    def num_tokens(self) -> int:
        return len(self.proj) * self.tokens_per_block

    def forward(self, x: TowerInput) -> NonSeqTokens:
        parts = [self.proj[name](x.dense if name == DENSE else x.blocks[name]) for name in self.proj]
        tokens = torch.cat(parts, dim=-1).unflatten(-1, (self.num_tokens, self.dim))
        return NonSeqTokens(tokens_BMD=tokens, slices=self.slices)


class PooledSequenceTokens(nn.Module):
    """One token per sequence: its masked mean event, through a sequence-specific projection to D."""

    def __init__(self, shape: InputShape, dim: int):
        super().__init__()
        self.dim = dim
        self.proj = nn.ModuleDict({name: nn.Linear(s.dim, dim) for name, s in shape.sequences.items()})

    def forward(self, x: TowerInput) -> torch.Tensor:
        """(B, S, D); an empty sequence gives its projection's bias."""
        if not self.proj:
            return x.dense.new_zeros(x.batch_size, 0, self.dim)
        return torch.stack([p(x.sequences[name].mean_pool()) for name, p in self.proj.items()], dim=1)


@dataclass
class RecentIndex:
    index_BN: torch.Tensor  # positions of the kept events, ascending; 0 where a row ran out
    mask_BN: torch.Tensor  # True on kept (real) events


def recent_index(mask_BL: torch.Tensor, num: int) -> RecentIndex:
    """Positions of the last `num` real events of each row, oldest first; rows with fewer are padded (mask False).

    Works for any mask pattern (not only left-aligned) with no data-dependent shapes, so it runs on `meta`.
    """
    n = min(num, mask_BL.shape[1])
    from_end_BL = mask_BL.sum(1, keepdim=True) - mask_BL.long().cumsum(1)  # 0 on the most recent real event
    pos_BL = torch.arange(mask_BL.shape[1], device=mask_BL.device).expand_as(mask_BL)
    keyed_BL = torch.where(mask_BL & (from_end_BL < n), pos_BL, -1)
    top_BN = keyed_BL.topk(n, dim=1).values.flip(1)  # kept positions, ascending; -1 where a row ran out
    return RecentIndex(index_BN=top_BN.clamp(min=0), mask_BN=top_BN >= 0)


def gather_events(values_BLD: torch.Tensor, index_BN: torch.Tensor) -> torch.Tensor:
    """(B, N, D): the events at `index_BN` of each row."""
    return values_BLD.gather(1, index_BN.unsqueeze(-1).expand(-1, -1, values_BLD.shape[-1]))


def recent_events(seq: SequenceInput, num: int) -> SequenceInput:
    """The last `num` real events of each row, oldest first; rows with fewer are padded (mask False)."""
    kept = recent_index(seq.mask_BL, num)
    return SequenceInput(values_BLD=gather_events(seq.values_BLD, kept.index_BN), mask_BL=kept.mask_BN)


def concat_sequences(seqs: list[SequenceInput]) -> SequenceInput:
    """Merge same-width sequences along the event axis (the 'merge sequences' layout of MTGR/OneTrans)."""
    return SequenceInput(values_BLD=torch.cat([s.values_BLD for s in seqs], dim=1),
                         mask_BL=torch.cat([s.mask_BL for s in seqs], dim=1))
