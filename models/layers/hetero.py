"""Heterogeneous attention layers: token-specific projections (HHFT, Hiformer) and Hiformer's composite projection.

Legend: B batch rows, T tokens, Q query tokens (T, or 1 when pruned to the task token), D token width,
H heads, E head width (D / H), R low rank.
"""

from __future__ import annotations

import torch
from torch import nn

from hyrank.models.layers.attention import attend
from hyrank.models.layers.fastpath import fast
from hyrank.models.layers.mlp import linears
from hyrank.models.layers.token_mixing import TokenFFN, TokenLinear, token_linears


def _heads(x_BTD: torch.Tensor, num_heads: int) -> torch.Tensor:
    return x_BTD.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def _merge_heads(x_BHTE: torch.Tensor) -> torch.Tensor:
    return x_BHTE.transpose(1, 2).flatten(2)


class HeteroTransformerLayer(nn.Module):
    """HHFT's Heterogeneous Transformer Encoder layer: token(block)-specific Q/K/V/O projections and FFNs around
    one shared attention computation. `shared=True` is the vanilla Transformer of the paper's ablation."""

    def __init__(self, num_tokens: int, dim: int, num_heads: int, *, ffn_mult: int = 4, shared: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"token width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (TokenLinear(num_tokens, dim, dim, shared=shared) for _ in range(4))
        self.ffn = TokenFFN(num_tokens, dim, ffn_mult * dim, shared=shared)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x_BTD)
        q, k, v = (_heads(t, self.num_heads) for t in token_linears(h, [self.q, self.k, self.v]))
        x = x_BTD + self.o(_merge_heads(attend(q, k, v)))
        return x + self.ffn(self.norm2(x))


class CompositeProjection(nn.Module):
    """Hiformer's composite projection: the concatenated token list (T*D) -> T*D, mixing all tokens at once.

    rank > 0 factorises the (T*D x T*D) matrix as up(down(x)) with an R-wide bottleneck (Hiformer sec. low-rank);
    with R = T*D the factorised form can represent the full matrix exactly.
    """

    def __init__(self, num_tokens: int, dim: int, *, rank: int = 0):
        super().__init__()
        width = num_tokens * dim
        self.down = nn.Linear(width, rank, bias=False) if rank else None
        self.up = nn.Linear(rank or width, width)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        flat = x_BTD.flatten(1)
        return self.up(flat if self.down is None else self.down(flat)).view_as(x_BTD)


def composite_pair(x_BTD: torch.Tensor, k: CompositeProjection, v: CompositeProjection
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(k(x), v(x)) with each stage of the two projections in one GEMM (weights joined along the output)."""
    if not fast():
        return k(x_BTD), v(x_BTD)
    flat = x_BTD.flatten(1)
    if k.down is not None:
        kd, vd = linears(flat, [k.down, v.down])
        return k.up(kd).view_as(x_BTD), v.up(vd).view_as(x_BTD)
    kf, vf = linears(flat, [k.up, v.up])
    return kf.view_as(x_BTD), vf.view_as(x_BTD)


class HiformerLayer(nn.Module):
    """Hiformer layer: token-specific queries, composite keys/values over all tokens, token-specific output and FFN.

    `task_only=True` is the paper's last-layer pruning: only the task token (position 0) queries, so the output is
    that token alone, (B, 1, D); it equals position 0 of the unpruned output with the same weights.
    `composite=False` gives plain heterogeneous attention (token-specific K/V instead of composite ones).
    """

    def __init__(self, num_tokens: int, dim: int, num_heads: int, *, ffn_mult: int = 4, rank: int = 0,
                 composite: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"token width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.composite = num_heads, composite
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.o = TokenLinear(num_tokens, dim, dim), TokenLinear(num_tokens, dim, dim)
        if composite:
            self.k, self.v = CompositeProjection(num_tokens, dim, rank=rank), CompositeProjection(num_tokens, dim,
                                                                                                    rank=rank)
        else:
            self.k, self.v = TokenLinear(num_tokens, dim, dim), TokenLinear(num_tokens, dim, dim)
        self.ffn = TokenFFN(num_tokens, dim, ffn_mult * dim)

    def forward(self, x_BTD: torch.Tensor, *, task_only: bool = False) -> torch.Tensor:
        rows = slice(0, 1) if task_only else slice(None)
        h = self.norm1(x_BTD)
        q = _heads(self.q(h[:, rows], rows), self.num_heads)
        kv = composite_pair(h, self.k, self.v) if self.composite else token_linears(h, [self.k, self.v])
        k, v = (_heads(t, self.num_heads) for t in kv)
        x = x_BTD[:, rows] + self.o(_merge_heads(attend(q, k, v)), rows)
        return x + self.ffn(self.norm2(x), rows)
