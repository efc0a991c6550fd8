"""OneTrans / MTGR-style unified Transformer: the UniArch baselines of HyFormer's Table 1. Sequence events and
non-sequence (NS) tokens go through ONE stack of Transformer blocks with mixed parameterisation.

    model = build_model("onetrans", {"d_model": 64, "seq_dim": 32, "num_layers": 3, "first_layer": "longer"}, shape)

Tokens (OneTrans, Zhang et al. 2025, arXiv 2510.26104): every event of every sequence, through its sequence's own
projection to width C, the sequences concatenated in spec order, oldest first (the timestamp-agnostic merge; each
projection's bias tells sequences apart, as OneTrans's [SEP] tokens do); then the M NS tokens (block projections
to width D) last, so that under causal attention every NS token sees every event.
Unified block: S-tokens share ONE set of Q/K/V/O and FFN weights; each NS token has its OWN Q/K/V/O and FFN
(PerTokenLinear); one multi-head attention runs over all tokens (padding keys masked, causal by default). This is
where the parameters sit: M token-specific sets at width D, against one shared set at width C.
Pyramid: layer l's queries are the K_l most recent real S-tokens plus every NS token; keys/values are every token
the layer below produced; only the queries' outputs go on. K_1 is every event (`first_layer="full"`, "w/ Full
Transformer") or the `recent_len` most recent (`"longer"`: LONGER's compression inside the unified block, "w/
LONGER"); `pyramid=True` then shrinks K linearly, `False` keeps K_1. The last layer is always NS-only: the head
reads only the NS tokens, so sequence outputs there would be dead compute (and dead parameters).

Widths: OneTrans uses one width for all tokens. Here the NS tokens may be wider (D = d_model) than the S-tokens
(C = seq_dim); attention runs at C, each NS token mapping D -> C for Q/K/V and C -> D for O with its own weights.
That keeps the ~3000 events as cheap as the other models' sequence side while the 13-16 NS tokens carry most of
the parameters, as in the paper's 406M / 450M baselines. With d_model == seq_dim it is OneTrans's block.

Legend: B batch rows, L S-tokens a layer reads, N S-tokens it keeps as queries (K_l), M NS tokens,
Q = N + M queries, K = L + M keys, D NS-token width, C S-token and attention width, H heads, E = C / H.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from hyrank.models.config import at_least, choices, divisible, widths
from hyrank.models.inputs import InputShape, SequenceInput, TowerInput, TowerOutput
from hyrank.models.layers.attention import ffn
from hyrank.models.layers.mlp import mlp
from hyrank.models.layers.token_mixing import PerTokenLinear, TokenFFN
from hyrank.models.layers.tokens import BlockTokenizer, RecentIndex, concat_sequences, gather_events, recent_index

FirstLayer = Literal["full", "longer"]


@dataclass
class OneTransConfig:
    d_model: int = 64  # D: width of each NS token (token-specific weights)
    seq_dim: int = 32  # C: width of the S-tokens (shared weights) and of the attention
    num_heads: int = 2
    num_layers: int = 2
    ffn_mult: int = 4  # NS per-token FFN hidden = ffn_mult * D
    seq_ffn_mult: int = 2  # shared S-token FFN hidden = seq_ffn_mult * C
    tokens_per_block: int = 1
    first_layer: FirstLayer = "full"  # layer-1 S-queries: every event, or the recent_len most recent (LONGER)
    recent_len: int = 16
    pyramid: bool = True
    seq_queries: list[int] = field(default_factory=list)  # explicit K_1..K_{n-1} (-1: all events); overrides both
    causal: bool = True
    head_hidden: list[int] = field(default_factory=lambda: [128, 64])

    def __post_init__(self) -> None:
        at_least(self, 1, "d_model", "seq_dim", "num_heads", "num_layers", "ffn_mult", "seq_ffn_mult",
                 "tokens_per_block", "recent_len")
        divisible(self, "seq_dim", "num_heads")  # attention runs at width C for every token
        choices(self)
        if self.seq_queries and (len(self.seq_queries) != self.num_layers - 1
                                 or any(k < 1 and k != -1 for k in self.seq_queries)):
            raise ValueError(f"seq_queries needs num_layers - 1 = {self.num_layers - 1} entries, each >= 1 or -1 "
                             f"(the last layer is always NS-only), got {self.seq_queries}")
        widths(self, "head_hidden")


def query_schedule(cfg: OneTransConfig, num_events: int) -> list[int]:
    """K_l, the S-token queries of each layer: never more than the layer below kept, and 0 in the last layer."""
    n = cfg.num_layers
    if cfg.seq_queries:
        wanted = [num_events if k == -1 else k for k in cfg.seq_queries]
    else:
        first = num_events if cfg.first_layer == "full" else min(cfg.recent_len, num_events)
        wanted = [-(-first * (n - 1 - l) // (n - 1)) if cfg.pyramid else first for l in range(n - 1)]
    return list(itertools.accumulate(wanted, min, initial=num_events))[1:] + [0]


@dataclass
class OneTransState:
    """What flows between layers: the S-tokens still alive (B, L, C) and the NS tokens (B, M, D)."""

    seq: SequenceInput
    ns_BMD: torch.Tensor


class OneTransLayer(nn.Module):
    """One unified block: shared S-token weights, token-specific NS weights, one attention over all tokens.

    S-side weights exist only where used: K/V when the layer reads S-tokens, Q/O/FFN when it keeps some as queries.
    """

    def __init__(self, cfg: OneTransConfig, num_ns: int, *, seq_keys: bool, seq_queries: bool):
        super().__init__()
        c, d = cfg.seq_dim, cfg.d_model
        self.num_heads, self.causal = cfg.num_heads, cfg.causal
        self.seq_norm = nn.LayerNorm(c) if seq_keys else None
        self.seq_k, self.seq_v = (nn.Linear(c, c), nn.Linear(c, c)) if seq_keys else (None, None)
        self.seq_q, self.seq_o = (nn.Linear(c, c), nn.Linear(c, c)) if seq_queries else (None, None)
        self.seq_ffn_norm = nn.LayerNorm(c) if seq_queries else None
        self.seq_ffn = ffn(c, cfg.seq_ffn_mult * c) if seq_queries else None
        self.ns_norm, self.ns_ffn_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ns_q, self.ns_k, self.ns_v = (PerTokenLinear(num_ns, d, c) for _ in range(3))
        self.ns_o = PerTokenLinear(num_ns, c, d)
        self.ns_ffn = TokenFFN(num_ns, d, cfg.ffn_mult * d)

    def forward(self, state: OneTransState, num_queries: int) -> OneTransState:
        seq, ns_BMD = state.seq, state.ns_BMD
        kept = _kept(seq.mask_BL, num_queries)
        h_ns = self.ns_norm(ns_BMD)
        q, k, v = [self.ns_q(h_ns)], [self.ns_k(h_ns)], [self.ns_v(h_ns)]
        if self.seq_norm is not None:
            h_seq = self.seq_norm(seq.values_BLD)
            k, v = [self.seq_k(h_seq)] + k, [self.seq_v(h_seq)] + v
            if num_queries:
                q = [self.seq_q(_take(h_seq, kept))] + q
        allowed_BQK = self._allowed(seq.mask_BL, kept, ns_BMD.shape[1])
        out_BQC = self._attend(torch.cat(q, 1), torch.cat(k, 1), torch.cat(v, 1), allowed_BQK)
        n = kept.index_BN.shape[1]
        ns = ns_BMD + self.ns_o(out_BQC[:, n:])
        ns = ns + self.ns_ffn(self.ns_ffn_norm(ns))
        if not num_queries:
            return OneTransState(seq=SequenceInput(values_BLD=seq.values_BLD[:, :0], mask_BL=kept.mask_BN), ns_BMD=ns)
        x = _take(seq.values_BLD, kept) + self.seq_o(out_BQC[:, :n])
        x = x + self.seq_ffn(self.seq_ffn_norm(x))
        return OneTransState(seq=SequenceInput(values_BLD=x, mask_BL=kept.mask_BN), ns_BMD=ns)

    def _allowed(self, mask_BL: torch.Tensor, kept: RecentIndex, num_ns: int) -> torch.Tensor:
        """(B, Q, K) True where query may attend key: real keys (causal: not later ones) and always itself.

        Attending to itself keeps every row non-empty (a padded S-query would otherwise softmax over nothing:
        NaN, which would leak through 0 * NaN). Real queries always see themselves anyway; padded queries' outputs
        are never keys or kept queries later, so what they see does not matter.
        """
        b, seq_len = mask_BL.shape
        ns_pos = torch.arange(seq_len, seq_len + num_ns, device=mask_BL.device).expand(b, -1)
        q_pos_BQ = torch.cat([kept.index_BN, ns_pos], dim=1)
        k_pos_K = torch.arange(seq_len + num_ns, device=mask_BL.device)
        key_mask_BK = torch.cat([mask_BL, mask_BL.new_ones(b, num_ns)], dim=1)
        allowed = key_mask_BK[:, None, :]
        if self.causal:
            allowed = allowed & (k_pos_K <= q_pos_BQ[..., None])
        return allowed | (k_pos_K == q_pos_BQ[..., None])

    def _attend(self, q_BQC: torch.Tensor, k_BKC: torch.Tensor, v_BKC: torch.Tensor,
                allowed_BQK: torch.Tensor) -> torch.Tensor:
        heads = [t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q_BQC, k_BKC, v_BKC)]
        return F.scaled_dot_product_attention(*heads, attn_mask=allowed_BQK[:, None]).transpose(1, 2).flatten(2)


def _kept(mask_BL: torch.Tensor, num: int) -> RecentIndex:
    """The `num` most recent real S-tokens; all of them, in place, when `num` covers the layer's length."""
    if num >= mask_BL.shape[1]:
        return RecentIndex(index_BN=torch.arange(mask_BL.shape[1], device=mask_BL.device).expand_as(mask_BL),
                           mask_BN=mask_BL)
    return recent_index(mask_BL, num)


def _take(values_BLC: torch.Tensor, kept: RecentIndex) -> torch.Tensor:
    same = kept.index_BN.shape[1] == values_BLC.shape[1]  # _kept's "all, in place": skip the gather
    return values_BLC if same else gather_events(values_BLC, kept.index_BN)


class OneTrans(nn.Module):
    Config = OneTransConfig

    def __init__(self, config: OneTransConfig, shape: InputShape):
        super().__init__()
        cfg = self.cfg = config
        self.seq_names = list(shape.sequences)
        num_events = sum(s.max_len for s in shape.sequences.values())
        self.schedule = query_schedule(cfg, num_events)
        self.ns = BlockTokenizer(shape, cfg.d_model, tokens_per_block=cfg.tokens_per_block)
        self.seq_proj = nn.ModuleDict({n: nn.Linear(s.dim, cfg.seq_dim) for n, s in shape.sequences.items()})
        reads = [num_events] + self.schedule[:-1]
        self.layers = nn.ModuleList(OneTransLayer(cfg, self.ns.num_tokens, seq_keys=r > 0, seq_queries=k > 0)
                                    for r, k in zip(reads, self.schedule))
        self.head = mlp(self.ns.num_tokens * cfg.d_model, cfg.head_hidden, 1)

    def forward(self, x: TowerInput) -> TowerOutput:
        state = OneTransState(seq=self.sequence_tokens(x), ns_BMD=self.ns(x).tokens_BMD)
        for layer, num_queries in zip(self.layers, self.schedule):
            state = layer(state, num_queries)
        return TowerOutput(logits=self.head(state.ns_BMD.flatten(1)).squeeze(-1))

    def sequence_tokens(self, x: TowerInput) -> SequenceInput:
        """Every event of every sequence at width C, merged into one stream (spec order, each oldest first)."""
        if not self.seq_names:
            return SequenceInput(values_BLD=x.dense.new_zeros(x.batch_size, 0, self.cfg.seq_dim),
                                 mask_BL=x.dense.new_zeros(x.batch_size, 0, dtype=torch.bool))
        return concat_sequences([SequenceInput(values_BLD=self.seq_proj[n](x.sequences[n].values_BLD),
                                               mask_BL=x.sequences[n].mask_BL) for n in self.seq_names])
