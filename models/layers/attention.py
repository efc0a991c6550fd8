"""Multi-head attention with key padding masks, plus the Transformer layers built from it.

Legend: B batch rows, H heads, Q query positions, L key positions, D model width, C key/value input width,
E head width (D / H).

Masks are True on real keys. A row whose keys are all padding (an empty sequence) attends to nothing: its output
is exactly zero, never NaN, and never depends on the padded values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hyrank.models.inputs import SequenceInput
from hyrank.models.layers.mlp import linears


def attend(q_BHQE: torch.Tensor, k_BHLE: torch.Tensor, v_BHLE: torch.Tensor,
           mask_BL: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention over the real keys only; (B, H, Q, E). Fast path (fused SDPA kernels)."""
    if mask_BL is None:
        return F.scaled_dot_product_attention(q_BHQE, k_BHLE, v_BHLE)
    has_key_B = mask_BL.any(dim=-1)
    # A row with no real key would softmax over an empty set (NaN): let it see every key, then zero its output.
    allowed_BL = mask_BL | ~has_key_B.unsqueeze(-1)
    out = F.scaled_dot_product_attention(q_BHQE, k_BHLE, v_BHLE, attn_mask=allowed_BL[:, None, None, :])
    return out * has_key_B[:, None, None, None].to(out.dtype)


def attend_reference(q_BHQE: torch.Tensor, k_BHLE: torch.Tensor, v_BHLE: torch.Tensor,
                     mask_BL: torch.Tensor | None = None) -> torch.Tensor:
    """Plain softmax(QK^T/sqrt(E)) V with masked keys weighted zero; the reference `attend` is tested against."""
    scores_BHQL = q_BHQE @ k_BHLE.transpose(-1, -2) / q_BHQE.shape[-1] ** 0.5
    if mask_BL is None:
        return scores_BHQL.softmax(-1) @ v_BHLE
    keep = mask_BL[:, None, None, :]
    probs = scores_BHQL.masked_fill(~keep, torch.finfo(scores_BHQL.dtype).min).softmax(-1) * keep
    return probs @ v_BHLE


class MultiHeadAttention(nn.Module):
    """Q from `x`, K/V from `kv` (self-attention when they are the same tensor), output projection back to D."""

    def __init__(self, dim: int, num_heads: int, *, kv_dim: int | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim or dim, dim)
        self.v = nn.Linear(kv_dim or dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x_BQD: torch.Tensor, kv_BLC: torch.Tensor, mask_BL: torch.Tensor | None = None) -> torch.Tensor:
        return self.o(attend(*self.project(x_BQD, kv_BLC), mask_BL).transpose(1, 2).flatten(2))

    def project(self, x_BQD: torch.Tensor, kv_BLC: torch.Tensor) -> list[torch.Tensor]:
        """Q, K, V split into heads, (B, H, *, E): one GEMM for all three in self-attention (x is kv), one for K
        and V in cross-attention (`linears`; the three Linears one by one under models.layers.fastpath's
        reference_paths)."""
        if x_BQD is kv_BLC:
            return [self._heads(t) for t in linears(x_BQD, [self.q, self.k, self.v])]
        return [self._heads(self.q(x_BQD)), *(self._heads(t) for t in linears(kv_BLC, [self.k, self.v]))]

    def _heads(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return x_BLD.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)


def ffn(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class TransformerLayer(nn.Module):
    """Pre-LN self-attention + FFN over a padded token list; padded positions are never attended to."""

    def __init__(self, dim: int, num_heads: int, *, ffn_mult: int = 4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.ffn = ffn(dim, ffn_mult * dim)

    def forward(self, seq: SequenceInput) -> SequenceInput:
        h = self.norm1(seq.values_BLD)
        x = seq.values_BLD + self.attn(h, h, seq.mask_BL)
        return SequenceInput(values_BLD=x + self.ffn(self.norm2(x)), mask_BL=seq.mask_BL)


class CrossAttentionLayer(nn.Module):
    """Pre-LN cross-attention of queries over a padded key/value list, optionally followed by an FFN."""

    def __init__(self, dim: int, num_heads: int, *, kv_dim: int | None = None, ffn_mult: int = 0):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(kv_dim or dim)
        self.attn = MultiHeadAttention(dim, num_heads, kv_dim=kv_dim)
        self.norm_ffn = nn.LayerNorm(dim) if ffn_mult else None
        self.ffn = ffn(dim, ffn_mult * dim) if ffn_mult else None

    def forward(self, q_BQD: torch.Tensor, kv: SequenceInput) -> torch.Tensor:
        # The residual keeps a query's own content when its sequence is empty (attention output is then zero).
        x = q_BQD + self.attn(self.norm_q(q_BQD), self.norm_kv(kv.values_BLD), kv.mask_BL)
        return x if self.ffn is None else x + self.ffn(self.norm_ffn(x))
