"""DCN-V2 cross layers (Wang et al. 2021): explicit, bounded-degree feature crosses.

Cross layer: x_{l+1} = x0 * (W x_l + b) + x_l, with W full (F x F) or low-rank U V^T (rank r: DCN-Mix's "r").
L layers hold every cross of x0's features up to degree L + 1. Used by the DCNv2 tower and, as an option, beside
HyFormer's token path (models/hyformer.py `cross_layers`). Legend: B batch rows, F input width.
"""

from __future__ import annotations

import torch
from torch import nn


class CrossLayerV2(nn.Module):
    def __init__(self, width: int, rank: int = 0):
        super().__init__()
        self.w = nn.Linear(width, width) if not rank else nn.Sequential(nn.Linear(width, rank, bias=False),
                                                                          nn.Linear(rank, width))

    def forward(self, x0_BF: torch.Tensor, x_BF: torch.Tensor) -> torch.Tensor:
        return x0_BF * self.w(x_BF) + x_BF


class CrossNetwork(nn.ModuleList):
    """`num_layers` cross layers over x0; returns x_L (B, F). A ModuleList: parameters are named `<i>.w.*`."""

    def __init__(self, width: int, num_layers: int, rank: int = 0):
        super().__init__(CrossLayerV2(width, rank) for _ in range(num_layers))

    def forward(self, x0_BF: torch.Tensor) -> torch.Tensor:
        x_BF = x0_BF
        for layer in self:
            x_BF = layer(x0_BF, x_BF)
        return x_BF
