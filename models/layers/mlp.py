"""Multi-layer perceptron."""

from __future__ import annotations

from torch import nn


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
