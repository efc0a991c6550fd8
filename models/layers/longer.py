"""LONGER-style sequence encoder (Chai et al. 2025): a short query set cross-attends to the full sequence once,
then self-attention runs over the short set only, so cost is O(L_H * L) instead of O(L^2).

Legend: B batch rows, L padded length, G global tokens, R recent events kept (L_H), D width.
"""

from __future__ import annotations

import torch
from torch import nn

from hyrank.models.inputs import SequenceInput
from hyrank.models.layers.attention import CrossAttentionLayer, TransformerLayer
from hyrank.models.layers.tokens import recent_events


class LongerEncoder(nn.Module):
    """Queries = [global tokens, last R real events]; layer 1 cross-attends over all L events, layers 2.. are
    self-attention over the G + R queries. Returns the G + R outputs (global tokens first)."""

    def __init__(self, dim: int, num_heads: int, *, num_layers: int, recent_len: int, ffn_mult: int = 4):
        super().__init__()
        self.recent_len = recent_len
        self.cross = CrossAttentionLayer(dim, num_heads, ffn_mult=ffn_mult)
        self.self_layers = nn.ModuleList(TransformerLayer(dim, num_heads, ffn_mult=ffn_mult)
                                         for _ in range(num_layers - 1))

    def forward(self, seq: SequenceInput, global_BGD: torch.Tensor | None = None) -> SequenceInput:
        recent = recent_events(seq, self.recent_len)
        q_BQD, mask_BQ = recent.values_BLD, recent.mask_BL
        if global_BGD is not None:
            q_BQD = torch.cat([global_BGD, q_BQD], dim=1)
            mask_BQ = torch.cat([mask_BQ.new_ones(global_BGD.shape[:2]), mask_BQ], dim=1)
        out = SequenceInput(values_BLD=self.cross(q_BQD, seq), mask_BL=mask_BQ)
        for layer in self.self_layers:
            out = layer(out)
        return out
