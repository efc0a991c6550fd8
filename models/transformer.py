"""Vanilla Transformer baseline: one set of shared parameters over all tokens (HHFT's "basic Transformer").
The MTGR/OneTrans unified baselines of HyFormer's Table 1 are `onetrans` (mixed parameterisation, pyramid).

    model = build_model("transformer", {"d_model": 32, "num_layers": 2, "sequence_tokens": "events"}, shape)

Tokens: block tokens (block projections) and, per sequence, either every event (projected to D, plus a learned
sequence-type embedding) or its mean-pooled event. Full self-attention with the padding mask; the head reads the
non-sequence tokens (the candidate side), flattened.
Legend: B batch rows, M non-sequence tokens, L total event tokens, D width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from hyrank.models.config import AttentionTowerConfig
from hyrank.models.inputs import InputShape, SequenceInput, TowerInput, TowerOutput
from hyrank.models.layers.attention import TransformerLayer
from hyrank.models.layers.mlp import mlp
from hyrank.models.layers.tokens import BlockTokenizer, PooledSequenceTokens


@dataclass
class TransformerConfig(AttentionTowerConfig):
    sequence_tokens: Literal["events", "pooled"] = "events"


class Transformer(nn.Module):
    Config = TransformerConfig

    def __init__(self, config: TransformerConfig, shape: InputShape):
        super().__init__()
        self.d_model = d = config.d_model
        self.cfg = config
        self.ns = BlockTokenizer(shape, d)
        self.seq_names = list(shape.sequences)
        if config.sequence_tokens == "events":
            self.event_proj = nn.ModuleDict({n: nn.Linear(s.dim, d) for n, s in shape.sequences.items()})
            self.seq_type = nn.Parameter(torch.randn(len(self.seq_names), d) * 0.02)
        else:
            self.pooled = PooledSequenceTokens(shape, d)
        self.layers = nn.ModuleList(TransformerLayer(d, config.num_heads, ffn_mult=config.ffn_mult)
                                    for _ in range(config.num_layers))
        self.head = mlp(self.ns.num_tokens * d, config.head_hidden, 1)

    def forward(self, x: TowerInput) -> TowerOutput:
        ns_BMD = self.ns(x).tokens_BMD
        h = self.token_list(x, ns_BMD)
        for layer in self.layers:
            h = layer(h)
        return TowerOutput(logits=self.head(h.values_BLD[:, :ns_BMD.shape[1]].flatten(1)).squeeze(-1))

    def token_list(self, x: TowerInput, ns_BMD: torch.Tensor) -> SequenceInput:
        """[non-sequence tokens, sequence tokens] with a mask that is True on every real token."""
        if self.cfg.sequence_tokens == "pooled":
            seq_BSD = self.pooled(x)
            tokens = torch.cat([ns_BMD, seq_BSD], dim=1)
            return SequenceInput(values_BLD=tokens, mask_BL=tokens.new_ones(tokens.shape[:2], dtype=torch.bool))
        values = [ns_BMD] + [self.event_proj[n](x.sequences[n].values_BLD) + self.seq_type[i]
                             for i, n in enumerate(self.seq_names)]
        masks = [ns_BMD.new_ones(ns_BMD.shape[:2], dtype=torch.bool)] + [x.sequences[n].mask_BL
                                                                         for n in self.seq_names]
        return SequenceInput(values_BLD=torch.cat(values, dim=1), mask_BL=torch.cat(masks, dim=1))
