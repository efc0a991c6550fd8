"""Dense towers, registered by name. Pure single-device PyTorch: no torch.distributed, no torchrec.

    model = build_model("dlrm_mlp", {"hidden": [256, 128]}, shape)   # shape: models.inputs.InputShape
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from models.dlrm import DLRM
from models.inputs import InputShape

MODELS: dict[str, type[nn.Module]] = {
    "dlrm_mlp": DLRM,
}


def model_class(name: str) -> type[nn.Module]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {sorted(MODELS)}")
    return MODELS[name]


def build_model(name: str, config: Any, shape: InputShape) -> nn.Module:
    """Instantiate a registered tower from its Config (a dataclass instance, or a dict of its fields)."""
    cls = model_class(name)
    if isinstance(config, dict):
        config = cls.Config(**config)
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config for {name!r} must be a {cls.Config.__name__} or a dict")
    return cls(config, shape)
