"""DLRM-MLP baseline: every non-sequence feature and the mean of each sequence, concatenated, through an MLP.

The simplest tower the papers compare against; sequences contribute only their mean-pooled event vector.
Legend: B batch rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from models.config import fraction, widths
from models.inputs import InputShape, TowerInput, TowerOutput
from models.layers.mlp import mlp


@dataclass
class DLRMConfig:
    hidden: list[int] = field(default_factory=lambda: [256, 128, 64])
    dropout: float = 0.0

    def __post_init__(self) -> None:
        widths(self, "hidden")
        fraction(self, "dropout")


class DLRM(nn.Module):
    Config = DLRMConfig

    def __init__(self, config: DLRMConfig, shape: InputShape):
        super().__init__()
        in_dim = shape.non_seq_dim + sum(s.dim for s in shape.sequences.values())
        self.block_names = list(shape.blocks)
        self.seq_names = list(shape.sequences)
        self.net = mlp(in_dim, config.hidden, 1, dropout=config.dropout)

    def forward(self, x: TowerInput) -> TowerOutput:
        parts = [x.blocks[b] for b in self.block_names] + [x.dense]
        parts += [x.sequences[s].mean_pool() for s in self.seq_names]
        return TowerOutput(logits=self.net(torch.cat(parts, dim=-1)).squeeze(-1))
