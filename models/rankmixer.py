"""RankMixer baseline (Zhu et al. 2025): token mixing + per-token FFN over the non-sequence tokens plus one
mean-pooled token per sequence.

    model = build_model("rankmixer", {"d_model": 48, "num_layers": 2}, shape)

Layer: S = LN(TokenMix(X) + X); X' = LN(PerTokenFFN(S) + S). Head: the T tokens flattened into an MLP.
Legend: B batch rows, T = M non-sequence tokens + S sequence tokens, D token width (divisible by T).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hyrank.models.config import at_least, widths
from hyrank.models.inputs import InputShape, TowerInput, TowerOutput
from hyrank.models.layers.mlp import mlp
from hyrank.models.layers.token_mixing import RankMixerBlock, mixer_width
from hyrank.models.layers.tokens import BlockTokenizer, PooledSequenceTokens, block_token_slices


@dataclass
class RankMixerConfig:
    d_model: int = 0  # token width; divisible by T; 0: smallest multiple of T >= 64
    num_layers: int = 2
    ffn_mult: int = 4
    tokens_per_block: int = 1
    head_hidden: list[int] = field(default_factory=lambda: [128, 64])

    def __post_init__(self) -> None:
        at_least(self, 0, "d_model")
        at_least(self, 1, "num_layers", "ffn_mult", "tokens_per_block")
        widths(self, "head_hidden")


class RankMixer(nn.Module):
    Config = RankMixerConfig

    def __init__(self, config: RankMixerConfig, shape: InputShape):
        super().__init__()
        num_tokens = len(block_token_slices(shape)) * config.tokens_per_block + len(shape.sequences)
        self.d_model = d = mixer_width(config.d_model, num_tokens, model="rankmixer")
        self.ns = BlockTokenizer(shape, d, tokens_per_block=config.tokens_per_block)
        self.seq_tokens = PooledSequenceTokens(shape, d)
        self.layers = nn.Sequential(*(RankMixerBlock(num_tokens, d, ffn_mult=config.ffn_mult)
                                      for _ in range(config.num_layers)))
        self.head = mlp(num_tokens * d, config.head_hidden, 1)

    def forward(self, x: TowerInput) -> TowerOutput:
        tokens_BTD = torch.cat([self.ns(x).tokens_BMD, self.seq_tokens(x)], dim=1)
        return TowerOutput(logits=self.head(self.layers(tokens_BTD).flatten(1)).squeeze(-1))
