"""SwiGLU feed-forward (Shazeer 2020): attention-free per-position transform.

Legend: B batch rows, L positions, D width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hyrank.models.inputs import SequenceInput


class SwiGLU(nn.Module):
    """w_out(silu(w_gate x) * w_up x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden)
        self.up = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.gate(x_BLD)) * self.up(x_BLD))


class SwiGLULayer(nn.Module):
    """Pre-LN residual SwiGLU over a sequence: each event transformed on its own, so padding never leaks."""

    def __init__(self, dim: int, *, ffn_mult: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.swiglu = SwiGLU(dim, ffn_mult * dim)

    def forward(self, seq: SequenceInput) -> SequenceInput:
        return SequenceInput(values_BLD=seq.values_BLD + self.swiglu(self.norm(seq.values_BLD)), mask_BL=seq.mask_BL)
