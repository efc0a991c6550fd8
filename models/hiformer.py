"""Hiformer (Gui et al. 2023, arXiv 2311.05884): heterogeneous feature interactions with a task token.

    model = build_model("hiformer", {"d_model": 32, "num_layers": 2, "rank": 0}, shape)

Tokens: a learned task token first, then one token per feature block (feature-specific projections), the dense
rest, and one mean-pooled token per sequence. Each layer: feature-specific queries, composite keys/values
(the concatenated token list through one (T*D x T*D) projection, optionally rank-r factorised), feature-specific
output projection and FFN. `prune_last_layer` runs the last layer for the task token only (task-to-feature
attention); the MLP head reads the task token. Full rank + pruning is a pure re-arrangement of the full model
(tested: identical outputs with copied weights).

Legend: B batch rows, T tokens (1 task + features), D token width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hyrank.models.config import AttentionTowerConfig, at_least
from hyrank.models.inputs import InputShape, TowerInput, TowerOutput
from hyrank.models.layers.hetero import HiformerLayer
from hyrank.models.layers.mlp import mlp
from hyrank.models.layers.tokens import BlockTokenizer, PooledSequenceTokens


@dataclass
class HiformerConfig(AttentionTowerConfig):
    ffn_mult: int = 2
    rank: int = 0  # composite K/V projection rank; 0 = full (T*D)
    composite: bool = True  # False: heterogeneous attention only (feature-specific K/V)
    prune_last_layer: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least(self, 0, "rank")


class Hiformer(nn.Module):
    Config = HiformerConfig

    def __init__(self, config: HiformerConfig, shape: InputShape):
        super().__init__()
        self.cfg, d = config, config.d_model
        self.d_model = d  # token width (bench paper widens it for latency)
        self.task_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.ns = BlockTokenizer(shape, d)
        self.seq_tokens = PooledSequenceTokens(shape, d)
        num_tokens = 1 + self.ns.num_tokens + len(shape.sequences)
        self.layers = nn.ModuleList(
            HiformerLayer(num_tokens, d, config.num_heads, ffn_mult=config.ffn_mult, rank=config.rank,
                          composite=config.composite) for _ in range(config.num_layers))
        self.head = mlp(d, config.head_hidden, 1)

    def forward(self, x: TowerInput) -> TowerOutput:
        h_BTD = self.tokens(x)
        for i, layer in enumerate(self.layers):
            h_BTD = layer(h_BTD, task_only=self.cfg.prune_last_layer and i == len(self.layers) - 1)
        return TowerOutput(logits=self.head(h_BTD[:, 0]).squeeze(-1))

    def tokens(self, x: TowerInput) -> torch.Tensor:
        task_B1D = self.task_token.expand(x.batch_size, -1, -1)
        return torch.cat([task_B1D, self.ns(x).tokens_BMD, self.seq_tokens(x)], dim=1)
