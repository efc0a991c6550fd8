"""DLRM baselines: the MLP over concatenated features (`dlrm_mlp`'s default), or the DLRM paper's pairwise dot
products (`interaction = "dot"`, arXiv 1906.00091; TorchRec's `torchrec.models.dlrm.DLRM`).

concat: every non-sequence feature and the mean of each sequence, concatenated, through an MLP. The simplest tower
        the papers compare against; sequences contribute only their mean-pooled event vector.
dot:    the dense features outside any block go through the bottom MLP (ReLU after every layer) to a vector of
        width D = bottom[-1]; every block (and each sequence's mean) is cut into consecutive D-wide feature vectors
        (a block of 26 single-id features of dim 64 gives 26 vectors, in the spec's order); the pairwise dot
        products of the dense vector and all feature vectors (upper triangle, no diagonal) join the dense vector
        into the top MLP. Same arithmetic as TorchRec's DenseArch / InteractionArch / OverArch
        (tests/test_bench_torchrec.py copies weights across and compares logits), so `hyrank bench torchrec`
        compares the two pipelines on one model.
Legend: B batch rows, F feature vectors, D their width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from hyrank.models.config import choices, fraction, widths
from hyrank.models.inputs import InputShape, TowerInput, TowerOutput
from hyrank.models.layers.mlp import mlp

Interaction = Literal["concat", "dot"]


@dataclass
class DLRMConfig:
    hidden: list[int] = field(default_factory=lambda: [256, 128, 64])  # the top MLP
    dropout: float = 0.0
    interaction: Interaction = "concat"
    bottom: list[int] = field(default_factory=lambda: [512, 256, 64])  # "dot" only: dense MLP; bottom[-1] = D

    def __post_init__(self) -> None:
        widths(self, "hidden", "bottom")
        fraction(self, "dropout")
        choices(self)
        if self.interaction == "dot" and not self.bottom:
            raise ValueError("interaction 'dot' needs a bottom MLP: its last width is the feature vector width D")


class DLRM(nn.Module):
    Config = DLRMConfig

    def __init__(self, config: DLRMConfig, shape: InputShape):
        super().__init__()
        self.block_names = list(shape.blocks)
        self.seq_names = list(shape.sequences)
        self.dot = config.interaction == "dot"
        if not self.dot:
            in_dim = shape.non_seq_dim + sum(s.dim for s in shape.sequences.values())
            self.net = mlp(in_dim, config.hidden, 1, dropout=config.dropout)
            return
        dim = config.bottom[-1]
        vector_widths = {**{f"block {b}": w for b, w in shape.blocks.items()},
                   **{f"sequence {s}": q.dim for s, q in shape.sequences.items()}}
        bad = {k: w for k, w in vector_widths.items() if w % dim}
        if bad:
            raise ValueError(f"interaction 'dot' cuts blocks and sequences into vectors of bottom[-1] = {dim}; "
                             f"these widths are not multiples of it: {bad}")
        if shape.dense_dim == 0:
            raise ValueError("interaction 'dot' needs dense features outside every block for its bottom MLP")
        num_vectors = sum(vector_widths.values()) // dim
        self.dim = dim
        self.bottom = mlp(shape.dense_dim, config.bottom)  # ReLU after every layer, as TorchRec's DenseArch
        self.register_buffer("triu", torch.triu_indices(num_vectors + 1, num_vectors + 1, offset=1), persistent=False)
        self.net = mlp(dim + num_vectors * (num_vectors + 1) // 2, config.hidden, 1, dropout=config.dropout)

    def forward(self, x: TowerInput) -> TowerOutput:
        parts = [x.blocks[b] for b in self.block_names]
        pooled = [x.sequences[s].mean_pool() for s in self.seq_names]
        if not self.dot:
            return TowerOutput(logits=self.net(torch.cat(parts + [x.dense] + pooled, dim=-1)).squeeze(-1))
        dense_BD = self.bottom(x.dense)
        vectors = parts + pooled
        vectors_BFD = (vectors[0] if len(vectors) == 1 else torch.cat(vectors, dim=-1)).unflatten(-1, (-1, self.dim))
        all_BFD = torch.cat([dense_BD.unsqueeze(1), vectors_BFD], dim=1)
        dots_BFF = torch.bmm(all_BFD, all_BFD.transpose(1, 2))
        features = torch.cat([dense_BD, dots_BFF[:, self.triu[0], self.triu[1]]], dim=-1)
        return TowerOutput(logits=self.net(features).squeeze(-1))
