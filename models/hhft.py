"""HHFT (Yu et al. 2025, arXiv 2511.20235): Hierarchical Heterogeneous Feature Transformer.

    model = build_model("hhft", {"d_model": 32, "num_layers": 2}, shape)

Features are partitioned into K semantic blocks (TowerInput.blocks; the dense rest and each behaviour sequence
are blocks too). Pipeline:
    block-specific projection to a common D  ->  K tokens
    n1 x Heterogeneous Transformer Encoder layer (block-specific Q/K/V/O and FFN, shared attention)
    nh x Hiformer layer (composite K/V projection over all K tokens: high-order interactions)
    concat of the K tokens -> MLP head
`heterogeneous=False` is the paper's ablation: one set of Q/K/V/O/FFN weights shared by all blocks.
A sequence block is its masked mean event (the paper folds behaviour sequences in as one block).

Legend: B batch rows, K blocks (= tokens), D token width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hyrank.models.config import AttentionTowerConfig, at_least
from hyrank.models.inputs import InputShape, TowerInput, TowerOutput
from hyrank.models.layers.hetero import HeteroTransformerLayer, HiformerLayer
from hyrank.models.layers.mlp import mlp
from hyrank.models.layers.tokens import BlockTokenizer, PooledSequenceTokens


@dataclass
class HHFTConfig(AttentionTowerConfig):
    # num_layers is n1, the heterogeneous encoder layers
    num_hiformer_layers: int = 1  # nh; 0: encoder layers only
    ffn_mult: int = 2
    hiformer_rank: int = 0  # 0: full composite projection; r > 0: rank-r factorisation
    heterogeneous: bool = True  # False: parameters shared across blocks (the paper's ablation)

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least(self, 0, "num_hiformer_layers", "hiformer_rank")


class HHFT(nn.Module):
    Config = HHFTConfig

    def __init__(self, config: HHFTConfig, shape: InputShape):
        super().__init__()
        d = config.d_model
        self.ns = BlockTokenizer(shape, d)
        self.seq_tokens = PooledSequenceTokens(shape, d)
        num_tokens = self.ns.num_tokens + len(shape.sequences)
        self.encoder = nn.ModuleList(
            HeteroTransformerLayer(num_tokens, d, config.num_heads, ffn_mult=config.ffn_mult,
                                   shared=not config.heterogeneous) for _ in range(config.num_layers))
        self.hiformer = nn.ModuleList(
            HiformerLayer(num_tokens, d, config.num_heads, ffn_mult=config.ffn_mult, rank=config.hiformer_rank)
            for _ in range(config.num_hiformer_layers))
        self.head = mlp(num_tokens * d, config.head_hidden, 1)

    def forward(self, x: TowerInput) -> TowerOutput:
        h_BKD = self.tokens(x)
        for layer in [*self.encoder, *self.hiformer]:
            h_BKD = layer(h_BKD)
        return TowerOutput(logits=self.head(h_BKD.flatten(1)).squeeze(-1))

    def tokens(self, x: TowerInput) -> torch.Tensor:
        """(B, K, D): one block-specific projection per block, then one per sequence."""
        return torch.cat([self.ns(x).tokens_BMD, self.seq_tokens(x)], dim=1)
