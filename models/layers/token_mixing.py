"""RankMixer-style token mixing and per-token (heterogeneous) linear maps.

Legend: B batch rows, T tokens, D token width, I/O input/output widths, H hidden width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from hyrank.models.layers.fastpath import fast
from hyrank.models.layers.mlp import linears


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
        bias = None if self.bias_TO is None else self.bias_TO[tokens]
        if not fast():  # the plain reference: what the einsum says
            out = torch.einsum("bti,tio->bto", x_BTI, self.weight_TIO[tokens])
            return out if bias is None else out + bias
        return per_token_matmul(x_BTI, self.weight_TIO[tokens], bias)


def per_token_matmul(x_BTI: torch.Tensor, w_TIO: torch.Tensor, b_TO: torch.Tensor | None) -> torch.Tensor:
    """out[:, t] = x[:, t] @ w[t] + b[t]: one bmm over tokens, the bias added inside it (baddbmm)."""
    x_TBI = x_BTI.transpose(0, 1)
    out_TBO = torch.bmm(x_TBI, w_TIO) if b_TO is None else torch.baddbmm(b_TO.unsqueeze(1), x_TBI, w_TIO)
    return out_TBO.transpose(0, 1)


class TokenLinear(nn.Module):
    """Linear map over each token: per-token weights (heterogeneous) or one weight for all tokens (shared)."""

    def __init__(self, num_tokens: int, in_dim: int, out_dim: int, *, shared: bool = False):
        super().__init__()
        self.shared = nn.Linear(in_dim, out_dim) if shared else None
        self.per_token = None if shared else PerTokenLinear(num_tokens, in_dim, out_dim)

    def forward(self, x_BTI: torch.Tensor, tokens: slice = slice(None)) -> torch.Tensor:
        return self.shared(x_BTI) if self.shared is not None else self.per_token(x_BTI, tokens)


def token_linears(x_BTI: torch.Tensor, layers: Sequence[TokenLinear], tokens: slice = slice(None)
                  ) -> list[torch.Tensor]:
    """[layer(x, tokens) for layer in layers] in one matmul: their weights joined along the output width.

    The small per-block projections of an attention layer (Q, K, V of every token) become one GEMM/bmm; the
    weights stay separate parameters (same names, same init), concatenated per call (a few KiB).
    """
    if len(layers) == 1 or not fast():
        return [layer(x_BTI, tokens) for layer in layers]
    if all(layer.shared is not None for layer in layers):
        return list(linears(x_BTI, [layer.shared for layer in layers]))
    if any(layer.shared is not None for layer in layers):
        raise ValueError("token_linears joins either shared or per-token layers, not both")
    per = [layer.per_token for layer in layers]
    w = torch.cat([p.weight_TIO[tokens] for p in per], dim=-1)
    b = None if any(p.bias_TO is None for p in per) else torch.cat([p.bias_TO[tokens] for p in per], dim=-1)
    if b is None and any(p.bias_TO is not None for p in per):
        raise ValueError("token_linears joins layers that all have a bias or none")
    return list(per_token_matmul(x_BTI, w, b).split([p.weight_TIO.shape[-1] for p in per], dim=-1))


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
