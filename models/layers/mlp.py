"""Multi-layer perceptron, and several Linears of one input as one GEMM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hyrank.models.layers.fastpath import fast


def mlp(in_dim: int, hidden: list[int], out_dim: int | None = None, *, activation: type[nn.Module] = nn.ReLU,
        dropout: float = 0.0) -> nn.Sequential:
    """Linear-activation stack through `hidden`; a final plain Linear to `out_dim` if given."""
    layers: list[nn.Module] = []
    prev = in_dim
    for width in hidden:
        layers += [nn.Linear(prev, width), activation()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        prev = width
    if out_dim is not None:
        layers.append(nn.Linear(prev, out_dim))
    return nn.Sequential(*layers)


def linears(x: torch.Tensor, layers: list[nn.Linear]) -> tuple[torch.Tensor, ...]:
    """[layer(x) for layer in layers] as one GEMM: the weights (separate parameters) joined along the output."""
    if not fast():
        return tuple(layer(x) for layer in layers)
    biases = [layer.bias for layer in layers]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        raise ValueError("linears joins layers that all have a bias or none")
    bias = None if biases[0] is None else torch.cat(biases)
    out = F.linear(x, torch.cat([layer.weight for layer in layers]), bias)
    return out.split([layer.out_features for layer in layers], dim=-1)
