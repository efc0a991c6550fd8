"""RankMixer-style token mixing and per-token (heterogeneous) linear maps.

Legend: B batch rows, T tokens, D token width, I/O input/output widths, H hidden width.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def token_mix(x_BTD: torch.Tensor) -> torch.Tensor:
    """Split each of the T tokens into T channel subspaces of D/T and regroup: new token h = [x_1^(h) .. x_T^(h)].

    Parameter-free: every output token sees one slice of every input token, which is how RankMixer (and HyFormer's
    Query Boosting) mixes heterogeneous tokens without quadratic attention.
    """
    b, t, d = x_BTD.shape
    if d % t:
        raise ValueError(f"token mixing needs the token width ({d}) divisible by the token count ({t})")
    return x_BTD.view(b, t, t, d // t).transpose(1, 2).reshape(b, t, d)


class PerTokenLinear(nn.Module):
    """An independent Linear(I, O) for each of T tokens (one batched matmul); `tokens` restricts to a subset."""

    def __init__(self, num_tokens: int, in_dim: int, out_dim: int, *, bias: bool = True):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default init, per token
        self.weight_TIO = nn.Parameter(torch.empty(num_tokens, in_dim, out_dim).uniform_(-bound, bound))
        self.bias_TO = nn.Parameter(torch.empty(num_tokens, out_dim).uniform_(-bound, bound)) if bias else None

    def forward(self, x_BTI: torch.Tensor, tokens: slice = slice(None)) -> torch.Tensor:
        out = torch.einsum("bti,tio->bto", x_BTI, self.weight_TIO[tokens])
        return out if self.bias_TO is None else out + self.bias_TO[tokens]


class TokenLinear(nn.Module):
    """Linear map over each token: per-token weights (heterogeneous) or one weight for all tokens (shared)."""

    def __init__(self, num_tokens: int, in_dim: int, out_dim: int, *, shared: bool = False):
        super().__init__()
        self.shared = nn.Linear(in_dim, out_dim) if shared else None
        self.per_token = None if shared else PerTokenLinear(num_tokens, in_dim, out_dim)

    def forward(self, x_BTI: torch.Tensor, tokens: slice = slice(None)) -> torch.Tensor:
        return self.shared(x_BTI) if self.shared is not None else self.per_token(x_BTI, tokens)


class TokenFFN(nn.Module):
    """TokenLinear -> GELU -> TokenLinear: RankMixer's per-token FFN when not shared."""

    def __init__(self, num_tokens: int, dim: int, hidden: int, *, shared: bool = False):
        super().__init__()
        self.up = TokenLinear(num_tokens, dim, hidden, shared=shared)
        self.down = TokenLinear(num_tokens, hidden, dim, shared=shared)

    def forward(self, x_BTD: torch.Tensor, tokens: slice = slice(None)) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x_BTD, tokens)), tokens)


class RankMixerBlock(nn.Module):
    """RankMixer layer (Zhu et al. 2025): S = LN(mix(X) + X); X' = LN(PFFN(S) + S)."""

    def __init__(self, num_tokens: int, dim: int, *, ffn_mult: int = 4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = TokenFFN(num_tokens, dim, ffn_mult * dim)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        s = self.norm1(token_mix(x_BTD) + x_BTD)
        return self.norm2(self.ffn(s) + s)


class QueryBoost(nn.Module):
    """HyFormer Query Boosting (sec. 3.5): Q_boost = Q + PerTokenFFN(mix(Q)).

    A LayerNorm sits before the FFN (pre-LN) so stacked layers stay well scaled; the paper's residual is kept.
    """

    def __init__(self, num_tokens: int, dim: int, *, ffn_mult: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ffn = TokenFFN(num_tokens, dim, ffn_mult * dim)

    def forward(self, q_BTD: torch.Tensor) -> torch.Tensor:
        return q_BTD + self.ffn(self.norm(token_mix(q_BTD)))


AUTO_MIN_WIDTH = 64


def mixer_width(requested: int, num_tokens: int, *, model: str, num_heads: int = 1) -> int:
    """Token width for a T-token mixer: `requested`, which must divide by T, or for 0 the smallest multiple of
    lcm(T, num_heads) that is >= 64 (so `options = {}` works whatever the feature spec's token count)."""
    if requested == 0:
        unit = math.lcm(num_tokens, num_heads)
        return unit * -(-AUTO_MIN_WIDTH // unit)
    if requested % num_tokens:
        raise ValueError(f"{model}: d_model={requested} must be divisible by the mixer token count {num_tokens} "
                         f"(or 0 for automatic)")
    return requested
