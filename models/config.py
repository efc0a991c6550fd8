"""What the towers' Config dataclasses share: range checks, and the fields of the attention towers.

Each Config checks itself in `__post_init__`, so a bad option fails where the config is read rather than deep
inside a constructor. Messages start with the field name (`num_layers must be >= 1, got -1`): the run config
prefixes that name with `model.options.`.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


def at_least(cfg: Any, minimum: int, *names: str) -> None:
    """Each named count is >= minimum."""
    for name in names:
        value = getattr(cfg, name)
        if not value >= minimum:  # `not >=` also rejects NaN
            raise ValueError(f"{name} must be >= {minimum}, got {value}")


def widths(cfg: Any, *names: str) -> None:
    """Each named list of hidden-layer widths holds only widths >= 1; an empty list is no hidden layer."""
    for name in names:
        value = getattr(cfg, name)
        if not all(w >= 1 for w in value):
            raise ValueError(f"{name} entries must be >= 1, got {value}")


def fraction(cfg: Any, *names: str) -> None:
    """Each named probability (dropout) is in [0, 1)."""
    for name in names:
        value = getattr(cfg, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")


def divisible(cfg: Any, name: str, by: str) -> None:
    """Field `name` is a multiple of field `by` (check `by` >= 1 first)."""
    value, divisor = getattr(cfg, name), getattr(cfg, by)
    if value % divisor:
        raise ValueError(f"{name} must be divisible by {by} ({divisor}), got {value}")


def choices(cfg: Any) -> None:
    """Every Literal field holds one of its choices: build_model takes plain dicts that no loader has checked."""
    for name, allowed in _literal_fields(type(cfg)).items():
        value = getattr(cfg, name)
        if value not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


@functools.cache
def _literal_fields(cls: type) -> dict[str, tuple[Any, ...]]:
    hints = typing.get_type_hints(cls)
    return {f.name: typing.get_args(hints[f.name]) for f in dataclasses.fields(cls)
            if typing.get_origin(hints[f.name]) is Literal}


@dataclass
class AttentionTowerConfig:
    """Fields of a tower of multi-head attention layers over D-wide tokens with an MLP head."""

    d_model: int = 32
    num_heads: int = 2
    num_layers: int = 2
    ffn_mult: int = 4
    head_hidden: list[int] = field(default_factory=lambda: [128, 64])

    def __post_init__(self) -> None:
        at_least(self, 1, "d_model", "num_heads", "num_layers", "ffn_mult")
        divisible(self, "d_model", "num_heads")
        widths(self, "head_hidden")
        choices(self)
