"""HyFormer (Huang et al. 2026, arXiv 2601.12681, sec. 3): alternating Query Decoding and Query Boosting.

    model = build_model("hyformer", {"d_model": 96, "num_layers": 2, "seq_encoder": "longer"}, shape)

Per layer l, for every sequence s (each with its own N queries and its own layer-wise K/V):
    H_l^s      = SeqEnc_l^s(H_{l-1}^s)                     full Transformer | LONGER cross-attn | SwiGLU
    Q~_l^s     = Q^s + CrossAttn(Q^s, H_l^s W^K_l, H_l^s W^V_l)   (masked multi-head; residual, see CrossAttentionLayer)
    [Q, NS]    = Q + PerTokenFFN(TokenMix([Q~^1 .. Q~^S, NS]))   Query Boosting, the only cross-sequence path
Layer-1 queries come from N FFNs over Global Info = concat(NS tokens, MeanPool of each sequence); later layers
reuse the boosted queries. The top layer's T = S*N + M tokens are flattened into an MLP head.

Ablations of Table 2: `query_source` ("nonseq": w/o seq pooling tokens; "target": target features only),
`global_tokens=False` (no query generation: the target tokens themselves query every sequence, as in LONGER),
`merge_sequences=True` (one merged sequence, one shared set of S*N queries, one encoder).

Counting (not in the paper): softmax attention returns a weighted average of the events, which cannot say how
many of them match a query. `decode_attention = "null_slot"` gives Query Decoding a learned "no match" key/value
per head, so the decoded query carries the matching mass (models/counting_attention.py); the default "softmax" is
the paper's. It counts what the decoder sees: with seq_encoder = "longer" those are the L_H compressed recent
events, not the whole sequence. An option, default off: on the default data the label depends on the share of
matching events, which the softmax average already carries, and null_slot's gain there is within seed noise
(docs/results.md, with the variants tried and not kept).

Explicit crosses (not in the paper): `cross_layers = L` runs DCN-V2 cross layers (models/layers/cross.py) over the
non-sequence input x0 = concat(blocks, dense) beside the token path, and the crossed vector joins the flattened
tokens into the head. Token mixing and per-token FFNs learn a product of several small categorical features
(user segment x item cluster x context in the default data) slowly from one day; a cross layer holds it in one
multiply. Default 0 (the paper's); hyformer.toml sets 3 (docs/results.md).

Legend: B batch rows, L padded length, M non-sequence tokens, N queries per sequence, S sequences,
T = S*N + M mixer tokens, D token width (d_model), C sequence width (seq_dim), G global-info width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from hyrank.models.config import at_least, choices, divisible, fraction, widths
from hyrank.models.counting_attention import NullSlotCrossAttentionLayer
from hyrank.models.inputs import InputShape, SequenceInput, TowerInput, TowerOutput
from hyrank.models.layers.attention import CrossAttentionLayer, TransformerLayer
from hyrank.models.layers.cross import CrossNetwork
from hyrank.models.layers.mlp import mlp
from hyrank.models.layers.swiglu import SwiGLULayer
from hyrank.models.layers.token_mixing import PerTokenLinear, QueryBoost, mixer_width
from hyrank.models.layers.tokens import BlockTokenizer, NonSeqTokens, block_token_slices, concat_sequences, recent_events

SeqEncoder = Literal["transformer", "longer", "swiglu"]
QuerySource = Literal["global", "nonseq", "target"]
DecodeAttention = Literal["softmax", "null_slot"]


@dataclass
class HyFormerConfig:
    d_model: int = 0  # token width D; divisible by the mixer token count T; 0: smallest multiple of T >= 64
    num_layers: int = 2
    num_heads: int = 4  # query-decoding heads
    num_queries: int = 1  # N per sequence
    tokens_per_block: int = 1
    ffn_mult: int = 4  # per-token FFN hidden = ffn_mult * D (Query Boosting)
    query_ffn_hidden: int = 128  # hidden width of each query-generation FFN
    seq_dim: int = 32  # C: width the events are projected to and encoded at
    seq_encoder: SeqEncoder = "longer"
    seq_num_heads: int = 2
    seq_ffn_mult: int = 2
    recent_len: int = 16  # L_H: recent events that query the full sequence (seq_encoder = "longer")
    query_source: QuerySource = "global"
    target_blocks: list[str] = field(default_factory=lambda: ["item"])  # for query_source="target" / no globals
    global_tokens: bool = True
    merge_sequences: bool = False
    decode_attention: DecodeAttention = "softmax"  # "null_slot": Query Decoding that can count matching events
    head_hidden: list[int] = field(default_factory=lambda: [256, 64])
    # after each hidden layer of the head; not in the paper: the head, which sees every feature's pooled token at
    # once, is where a small data set (MovieLens-100K) overfits first; it costs nothing on the default data
    # (docs/results.md)
    head_dropout: float = 0.2
    cross_layers: int = 0  # DCN-V2 cross layers over the non-sequence input, beside the tokens into the head
    cross_rank: int = 0  # 0: full-rank cross weights; r > 0: rank r

    def __post_init__(self) -> None:
        at_least(self, 0, "d_model", "cross_layers", "cross_rank")
        at_least(self, 1, "num_layers", "num_heads", "num_queries", "tokens_per_block", "ffn_mult", "query_ffn_hidden",
                 "seq_dim", "seq_num_heads", "seq_ffn_mult", "recent_len")
        choices(self)
        if self.d_model:  # 0 picks a width divisible by num_heads itself
            divisible(self, "d_model", "num_heads")
        if self.seq_encoder != "swiglu":  # the SwiGLU encoder has no attention heads
            divisible(self, "seq_dim", "seq_num_heads")
        widths(self, "head_hidden")
        fraction(self, "head_dropout")


@dataclass
class QueryState:
    """What flows between layers: mixer tokens (queries first, stream-major, then the non-sequence tokens) and
    each stream's current sequence representation H_l."""

    tokens_BTD: torch.Tensor
    num_queries: int  # N_eff per sequence stream
    seqs: list[SequenceInput]


def _encoder_layer(cfg: HyFormerConfig, layer: int) -> nn.Module:
    if cfg.seq_encoder == "transformer":
        return TransformerLayer(cfg.seq_dim, cfg.seq_num_heads, ffn_mult=cfg.seq_ffn_mult)
    if cfg.seq_encoder == "swiglu":
        return SwiGLULayer(cfg.seq_dim, ffn_mult=cfg.seq_ffn_mult)
    # LONGER: the first layer compresses L events to the L_H recent ones; later layers self-attend over those.
    return (LongerCompress(cfg) if layer == 0 else
            TransformerLayer(cfg.seq_dim, cfg.seq_num_heads, ffn_mult=cfg.seq_ffn_mult))


def _decoder(cfg: HyFormerConfig, dim: int) -> nn.Module:
    """Query Decoding's cross-attention: queries (width D) over this layer's H_l (width C)."""
    if cfg.decode_attention == "null_slot":
        return NullSlotCrossAttentionLayer(dim, cfg.num_heads, kv_dim=cfg.seq_dim)
    return CrossAttentionLayer(dim, cfg.num_heads, kv_dim=cfg.seq_dim)


class LongerCompress(nn.Module):
    """H = CrossAttn(S_short, S, S): the last L_H real events query the whole sequence, O(L_H * L)."""

    def __init__(self, cfg: HyFormerConfig):
        super().__init__()
        self.recent_len = cfg.recent_len
        self.cross = CrossAttentionLayer(cfg.seq_dim, cfg.seq_num_heads, ffn_mult=cfg.seq_ffn_mult)

    def forward(self, seq: SequenceInput) -> SequenceInput:
        short = recent_events(seq, self.recent_len)
        return SequenceInput(values_BLD=self.cross(short.values_BLD, seq), mask_BL=short.mask_BL)


class HyFormerLayer(nn.Module):
    """One Query Decoding block per sequence stream, then one Query Boosting block over all T tokens."""

    def __init__(self, cfg: HyFormerConfig, dim: int, layer: int, num_streams: int, num_tokens: int):
        super().__init__()
        self.encoders = nn.ModuleList(_encoder_layer(cfg, layer) for _ in range(num_streams))
        # Layer-wise K/V: each decoder owns W^K_l, W^V_l mapping this layer's H_l (width C) to D.
        self.decoders = nn.ModuleList(_decoder(cfg, dim) for _ in range(num_streams))
        self.boost = QueryBoost(num_tokens, dim, ffn_mult=cfg.ffn_mult)

    def forward(self, state: QueryState) -> QueryState:
        n = state.num_queries
        seqs = [enc(s) for enc, s in zip(self.encoders, state.seqs)]
        decoded = [dec(state.tokens_BTD[:, i * n:(i + 1) * n], s)
                   for i, (dec, s) in enumerate(zip(self.decoders, seqs))]
        tokens = torch.cat(decoded + [state.tokens_BTD[:, len(seqs) * n:]], dim=1)
        return QueryState(tokens_BTD=self.boost(tokens), num_queries=n, seqs=seqs)


class QueryGenerator(nn.Module):
    """Q = [FFN_1(Global Info), ..., FFN_K(Global Info)]: K = streams * N independent two-layer FFNs.

    The first layers of all K FFNs are stacked into one Linear (same math, one matmul); the second layers are
    per-query weights.
    """

    def __init__(self, in_dim: int, num_queries: int, hidden: int, dim: int):
        super().__init__()
        self.num_queries, self.hidden = num_queries, hidden
        self.up = nn.Linear(in_dim, num_queries * hidden)
        self.down = PerTokenLinear(num_queries, hidden, dim)

    def forward(self, info_BG: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.up(info_BG)).unflatten(-1, (self.num_queries, self.hidden))
        return self.down(h)


class HyFormer(nn.Module):
    Config = HyFormerConfig

    def __init__(self, config: HyFormerConfig, shape: InputShape):
        super().__init__()
        cfg = self.cfg = config
        if not shape.sequences:
            raise ValueError("hyformer needs at least one sequence in the feature spec")
        self.seq_names = list(shape.sequences)
        self.block_names = list(shape.blocks)
        slices = block_token_slices(shape, cfg.tokens_per_block)
        self.target = self._target_slices(shape, slices)
        num_streams = 1 if cfg.merge_sequences else len(self.seq_names)
        queries_per_stream = self._queries_per_stream(num_streams)
        num_ns = len(slices) * cfg.tokens_per_block
        num_tokens = num_streams * queries_per_stream + num_ns
        self.d_model = d = mixer_width(cfg.d_model, num_tokens, model="hyformer", num_heads=cfg.num_heads)
        self.ns = BlockTokenizer(shape, d, tokens_per_block=cfg.tokens_per_block)
        self.seq_proj = nn.ModuleDict({n: nn.Linear(s.dim, cfg.seq_dim) for n, s in shape.sequences.items()})
        self.query_gen = self._query_generator(num_streams * queries_per_stream, num_ns) if cfg.global_tokens else None
        self.layers = nn.ModuleList(HyFormerLayer(cfg, d, i, num_streams, num_tokens) for i in range(cfg.num_layers))
        self.cross = CrossNetwork(shape.non_seq_dim, cfg.cross_layers, cfg.cross_rank) if cfg.cross_layers else None
        self.head = mlp(num_tokens * d + (shape.non_seq_dim if self.cross is not None else 0), cfg.head_hidden, 1,
                        dropout=cfg.head_dropout)

    def _target_slices(self, shape: InputShape, slices: dict[str, slice]) -> list[slice]:
        needs_target = self.cfg.query_source == "target" or not self.cfg.global_tokens
        missing = [b for b in self.cfg.target_blocks if b not in shape.blocks]
        if needs_target and (missing or not self.cfg.target_blocks):
            raise ValueError(f"hyformer: target_blocks {self.cfg.target_blocks} must name blocks of the feature "
                             f"spec ({sorted(shape.blocks)})")
        return [slices[b] for b in self.cfg.target_blocks if b in shape.blocks]

    def _queries_per_stream(self, num_streams: int) -> int:
        if not self.cfg.global_tokens:
            return len(self.target) * self.cfg.tokens_per_block  # the target tokens themselves
        # Merged sequences share one query set, kept as large as the per-sequence sets together (same T).
        return self.cfg.num_queries * (len(self.seq_names) if self.cfg.merge_sequences else 1)

    def _query_generator(self, num_queries: int, num_ns: int) -> QueryGenerator:
        cfg, d = self.cfg, self.d_model
        in_dim = {"global": num_ns * d + len(self.seq_names) * cfg.seq_dim,
                  "nonseq": num_ns * d,
                  "target": len(self.target) * cfg.tokens_per_block * d}[cfg.query_source]
        return QueryGenerator(in_dim, num_queries, cfg.query_ffn_hidden, d)

    def forward(self, x: TowerInput) -> TowerOutput:
        ns = self.ns(x)
        seqs = self.project_sequences(x)
        state = QueryState(tokens_BTD=torch.cat([self.initial_queries(ns, seqs), ns.tokens_BMD], dim=1),
                           num_queries=self._queries_per_stream(len(seqs)),
                           seqs=[concat_sequences(seqs)] if self.cfg.merge_sequences else seqs)
        for layer in self.layers:
            state = layer(state)
        head_in = state.tokens_BTD.flatten(1)
        if self.cross is not None:
            x0 = torch.cat([x.blocks[b] for b in self.block_names] + [x.dense], dim=-1)
            head_in = torch.cat([head_in, self.cross(x0)], dim=-1)
        return TowerOutput(logits=self.head(head_in).squeeze(-1))

    def project_sequences(self, x: TowerInput) -> list[SequenceInput]:
        """Each sequence's events projected to width C by its own projection (H_0)."""
        return [SequenceInput(values_BLD=self.seq_proj[n](x.sequences[n].values_BLD), mask_BL=x.sequences[n].mask_BL)
                for n in self.seq_names]

    def initial_queries(self, ns: NonSeqTokens, seqs: list[SequenceInput]) -> torch.Tensor:
        """Layer-1 queries, (B, streams * N, D), from the configured Global Info (sec. 3.3.2)."""
        target_BKD = torch.cat([ns.tokens_BMD[:, s] for s in self.target], dim=1) if self.target else None
        if self.query_gen is None:
            return target_BKD.repeat(1, 1 if self.cfg.merge_sequences else len(seqs), 1)
        source = self.cfg.query_source
        parts = [target_BKD.flatten(1)] if source == "target" else [ns.tokens_BMD.flatten(1)]
        if source == "global":
            parts += [s.mean_pool() for s in seqs]
        return self.query_gen(torch.cat(parts, dim=-1))
