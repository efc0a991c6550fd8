"""LONGER + RankMixer, the two-stage "BaseArch" HyFormer compares against (HyFormer Table 1, first row).

    model = build_model("longer_rankmixer", {"d_model": 48, "seq_layers": 2}, shape)

Stage 1, per sequence (own parameters): events -> width C; LONGER encoder with queries [global token, last L_H
events] (cross-attention over all L events, then self-attention over the short set); the global token's output,
projected to D, is that sequence's token. The global token is the candidate (target blocks) as in LONGER, or
with `global_query=True` an FFN over Global Info (Table 2's "BaseArch w/ Global Tokens").
Stage 2: RankMixer over [S sequence tokens, M non-sequence tokens]; head on the flattened tokens.
Information flows one way: the sequence encoders never see the mixer's output (late fusion).

Legend: B batch rows, S sequences, M non-sequence tokens, T = S + M, C sequence width, D token width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hyrank.models.config import at_least, divisible
from hyrank.models.hyformer import QueryGenerator
from hyrank.models.inputs import InputShape, TowerInput, TowerOutput
from hyrank.models.layers.longer import LongerEncoder
from hyrank.models.layers.mlp import mlp
from hyrank.models.layers.token_mixing import RankMixerBlock, mixer_width
from hyrank.models.layers.tokens import BlockTokenizer, block_token_slices
from hyrank.models.rankmixer import RankMixerConfig


@dataclass
class LongerRankMixerConfig(RankMixerConfig):
    """RankMixer's fields (num_layers: the stage-2 mixer layers) plus stage 1's LONGER encoders."""

    seq_dim: int = 32
    seq_layers: int = 2  # LONGER: 1 cross-attention layer + (seq_layers - 1) self-attention layers
    seq_num_heads: int = 2
    seq_ffn_mult: int = 2
    recent_len: int = 16
    target_blocks: list[str] = field(default_factory=lambda: ["item"])
    global_query: bool = False
    query_ffn_hidden: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least(self, 1, "seq_dim", "seq_layers", "seq_num_heads", "seq_ffn_mult", "recent_len", "query_ffn_hidden")
        divisible(self, "seq_dim", "seq_num_heads")


class LongerRankMixer(nn.Module):
    Config = LongerRankMixerConfig

    def __init__(self, config: LongerRankMixerConfig, shape: InputShape):
        super().__init__()
        cfg, c = config, config.seq_dim
        num_tokens = len(shape.sequences) + len(block_token_slices(shape)) * cfg.tokens_per_block
        self.d_model = d = mixer_width(cfg.d_model, num_tokens, model="longer_rankmixer")
        missing = [b for b in cfg.target_blocks if b not in shape.blocks]
        if missing or not cfg.target_blocks:
            raise ValueError(f"longer_rankmixer: target_blocks {cfg.target_blocks} must name blocks of the "
                             f"feature spec ({sorted(shape.blocks)})")
        self.cfg, self.seq_names = cfg, list(shape.sequences)
        self.ns = BlockTokenizer(shape, d, tokens_per_block=cfg.tokens_per_block)
        self.seq_proj = nn.ModuleDict({n: nn.Linear(s.dim, c) for n, s in shape.sequences.items()})
        num_streams = len(self.seq_names)
        target_dim = len(cfg.target_blocks) * cfg.tokens_per_block * d
        global_dim = self.ns.num_tokens * d + num_streams * c
        self.global_gen = (QueryGenerator(global_dim, num_streams, cfg.query_ffn_hidden, c) if cfg.global_query
                           else nn.ModuleDict({n: nn.Linear(target_dim, c) for n in self.seq_names}))
        self.encoders = nn.ModuleDict({n: LongerEncoder(c, cfg.seq_num_heads, num_layers=cfg.seq_layers,
                                                        recent_len=cfg.recent_len, ffn_mult=cfg.seq_ffn_mult)
                                       for n in self.seq_names})
        self.seq_out = nn.ModuleDict({n: nn.Linear(c, d) for n in self.seq_names})
        self.mixer = nn.Sequential(*(RankMixerBlock(num_tokens, d, ffn_mult=cfg.ffn_mult)
                                     for _ in range(cfg.num_layers)))
        self.head = mlp(num_tokens * d, cfg.head_hidden, 1)

    def forward(self, x: TowerInput) -> TowerOutput:
        ns = self.ns(x)
        projected = {n: self.seq_proj[n](x.sequences[n].values_BLD) for n in self.seq_names}
        globals_BSC = self._global_tokens(x, ns.tokens_BMD, ns.slices, projected)
        seq_tokens = []
        for i, n in enumerate(self.seq_names):
            seq = type(x.sequences[n])(values_BLD=projected[n], mask_BL=x.sequences[n].mask_BL)
            out = self.encoders[n](seq, globals_BSC[:, i:i + 1])
            seq_tokens.append(self.seq_out[n](out.values_BLD[:, 0]))
        tokens_BTD = torch.cat([torch.stack(seq_tokens, dim=1), ns.tokens_BMD], dim=1)
        return TowerOutput(logits=self.head(self.mixer(tokens_BTD).flatten(1)).squeeze(-1))

    def _global_tokens(self, x: TowerInput, ns_BMD: torch.Tensor, slices: dict[str, slice],
                       projected: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, S, C): one LONGER global token per sequence."""
        if self.cfg.global_query:
            pools = [type(x.sequences[n])(values_BLD=projected[n], mask_BL=x.sequences[n].mask_BL).mean_pool()
                     for n in self.seq_names]
            return self.global_gen(torch.cat([ns_BMD.flatten(1)] + pools, dim=-1))
        target = torch.cat([ns_BMD[:, slices[b]] for b in self.cfg.target_blocks], dim=1).flatten(1)
        return torch.stack([self.global_gen[n](target) for n in self.seq_names], dim=1)
