"""DCN-V2 baseline (Wang et al. 2021): cross network v2 followed by (stacked) or beside (parallel) a deep MLP.

    model = build_model("dcnv2", {"num_cross_layers": 3, "rank": 0, "hidden": [256, 128]}, shape)

Input x0 = concat(every block, dense rest, masked mean of each sequence), width F, through the cross network
(models/layers/cross.py: x_{l+1} = x0 * (W x_l + b) + x_l, W full or low-rank U V^T of rank r).
Legend: B batch rows, F input width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from hyrank.models.config import at_least, choices, widths
from hyrank.models.inputs import InputShape, TowerInput, TowerOutput
from hyrank.models.layers.cross import CrossNetwork
from hyrank.models.layers.mlp import mlp


@dataclass
class DCNv2Config:
    num_cross_layers: int = 3
    rank: int = 0  # 0: full-rank W; r > 0: W = U V^T with inner width r
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    structure: Literal["stacked", "parallel"] = "stacked"

    def __post_init__(self) -> None:
        at_least(self, 0, "num_cross_layers", "rank")  # 0 cross layers: the deep part alone
        widths(self, "hidden")
        choices(self)


class DCNv2(nn.Module):
    Config = DCNv2Config

    def __init__(self, config: DCNv2Config, shape: InputShape):
        super().__init__()
        self.cfg = config
        width = shape.non_seq_dim + sum(s.dim for s in shape.sequences.values())
        self.block_names, self.seq_names = list(shape.blocks), list(shape.sequences)
        self.cross = CrossNetwork(width, config.num_cross_layers, config.rank)
        stacked = config.structure == "stacked"
        self.deep = mlp(width, config.hidden)
        deep_out = config.hidden[-1] if config.hidden else width
        self.out = nn.Linear(deep_out if stacked else deep_out + width, 1)

    def forward(self, x: TowerInput) -> TowerOutput:
        x0 = torch.cat([x.blocks[b] for b in self.block_names] + [x.dense]
                       + [x.sequences[s].mean_pool() for s in self.seq_names], dim=-1)
        crossed = self.cross(x0)
        if self.cfg.structure == "stacked":
            return TowerOutput(logits=self.out(self.deep(crossed)).squeeze(-1))
        return TowerOutput(logits=self.out(torch.cat([crossed, self.deep(x0)], dim=-1)).squeeze(-1))
