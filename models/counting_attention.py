"""Cross-attention whose output can say *how many* keys match a query, not only what they look like.

    layer = NullSlotCrossAttentionLayer(dim=64, num_heads=4, kv_dim=32)
    decoded_BQD = layer(queries_BQD, SequenceInput(values_BLC, mask_BL))

Softmax attention returns a weighted *average* of values: a sequence of k copies of one event decodes exactly as
one copy does, so a model reading it cannot tell one matching event from fifty. Here every head also gets one
learned key/value pair that is always present, a "no match" sink (the null/sentinel key of attention with a
default slot). softmax over [null, events] puts k e^s / (k e^s + e^b + rest) of the mass on k matching events of
score s against a null score b, which grows with k (count-like while e^b dominates the rest, share-like while the
other events do: the null score is q.k_null, so each head learns its own threshold through the query). The output
is (1 - p_null) * softmax-average(event values) + p_null * v_null, so the decoded query carries the matching
mass. The null value starts at zero: at initialisation the output is the plain average, scaled down by how little
of the sequence matched. It keeps the fused SDPA kernel (one key more) and adds 2 * D parameters per layer (a
key and a value of width E for each of the H heads).

Padding masks are respected exactly: a padded event gets weight zero whatever its values, and a row with no real
event attends to the null slot alone (output v_null, never NaN).

Legend: B batch rows, H heads, Q query positions, L key positions, D model width, C key/value input width,
E head width (D / H).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hyrank.models.inputs import SequenceInput
from hyrank.models.layers.attention import MultiHeadAttention


def attend_null_slot(q_BHQE: torch.Tensor, k_BHLE: torch.Tensor, v_BHLE: torch.Tensor, mask_BL: torch.Tensor | None,
                     null_k_HE: torch.Tensor, null_v_HE: torch.Tensor) -> torch.Tensor:
    """softmax(QK^T / sqrt(E)) V over the real keys plus one always-present null key/value per head; (B, H, Q, E)."""
    b, h, _, e = k_BHLE.shape
    k = torch.cat([null_k_HE[None, :, None, :].expand(b, h, 1, e), k_BHLE], dim=2)
    v = torch.cat([null_v_HE[None, :, None, :].expand(b, h, 1, e), v_BHLE], dim=2)
    if mask_BL is None:
        return F.scaled_dot_product_attention(q_BHQE, k, v)
    allowed_BL = torch.cat([mask_BL.new_ones(b, 1), mask_BL], dim=1)  # the null key is never padding: no NaN rows
    return F.scaled_dot_product_attention(q_BHQE, k, v, attn_mask=allowed_BL[:, None, None, :])


def attend_null_slot_reference(q_BHQE: torch.Tensor, k_BHLE: torch.Tensor, v_BHLE: torch.Tensor,
                               mask_BL: torch.Tensor | None, null_k_HE: torch.Tensor,
                               null_v_HE: torch.Tensor) -> torch.Tensor:
    """The same written out: p_null = e^{q.k_null} / (e^{q.k_null} + sum_real e^{q.k_l}), scaled by 1/sqrt(E)."""
    scale = q_BHQE.shape[-1] ** -0.5
    null_BHQ1 = (q_BHQE * null_k_HE[None, :, None, :]).sum(-1, keepdim=True) * scale
    scores_BHQL = q_BHQE @ k_BHLE.transpose(-1, -2) * scale
    if mask_BL is not None:
        scores_BHQL = scores_BHQL.masked_fill(~mask_BL[:, None, None, :], float("-inf"))
    probs = torch.cat([null_BHQ1, scores_BHQL], dim=-1).softmax(-1)
    return probs[..., :1] * null_v_HE[None, :, None, :] + probs[..., 1:] @ v_BHLE


class NullSlotAttention(MultiHeadAttention):
    """MultiHeadAttention (same Q/K/V/O projections and parameter names) plus a null key/value per head."""

    def __init__(self, dim: int, num_heads: int, *, kv_dim: int | None = None):
        super().__init__(dim, num_heads, kv_dim=kv_dim)
        head_dim = dim // num_heads
        # A random null key of norm ~1: each head starts with its own "no match" threshold and moves it through the
        # query (and the key itself); a zero null value adds nothing at first.
        self.null_k_HE = nn.Parameter(torch.randn(num_heads, head_dim) / head_dim ** 0.5)
        self.null_v_HE = nn.Parameter(torch.zeros(num_heads, head_dim))

    def forward(self, x_BQD: torch.Tensor, kv_BLC: torch.Tensor, mask_BL: torch.Tensor | None = None) -> torch.Tensor:
        out_BHQE = attend_null_slot(*self.project(x_BQD, kv_BLC), mask_BL, self.null_k_HE, self.null_v_HE)
        return self.o(out_BHQE.transpose(1, 2).flatten(2))


class NullSlotCrossAttentionLayer(nn.Module):
    """Pre-LN residual cross-attention of queries over a padded sequence with a null slot per head: HyFormer's
    decoder (CrossAttentionLayer without FFN, same parameter names) that can count."""

    def __init__(self, dim: int, num_heads: int, *, kv_dim: int | None = None):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(kv_dim or dim)
        self.attn = NullSlotAttention(dim, num_heads, kv_dim=kv_dim)

    def forward(self, q_BQD: torch.Tensor, kv: SequenceInput) -> torch.Tensor:
        return q_BQD + self.attn(self.norm_q(q_BQD), self.norm_kv(kv.values_BLD), kv.mask_BL)
