"""Dense towers, registered by name. Pure single-device PyTorch: no torch.distributed, no torchrec.

    model = build_model("dlrm_mlp", {"hidden": [256, 128]}, shape)   # shape: models.inputs.InputShape
"""

from __future__ import annotations

from typing import Any

from torch import nn

from models.dcnv2 import DCNv2
from models.dlrm import DLRM
from models.hhft import HHFT
from models.hiformer import Hiformer
from models.hyformer import HyFormer
from models.inputs import InputShape
from models.longer_rankmixer import LongerRankMixer
from models.onetrans import OneTrans
from models.rankmixer import RankMixer
from models.transformer import Transformer

MODELS: dict[str, type[nn.Module]] = {
    "dlrm_mlp": DLRM,
    "dcnv2": DCNv2,
    "rankmixer": RankMixer,
    "longer_rankmixer": LongerRankMixer,
    "transformer": Transformer,
    "onetrans": OneTrans,
    "hyformer": HyFormer,
    "hhft": HHFT,
    "hiformer": Hiformer,
}


def model_class(name: str) -> type[nn.Module]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {sorted(MODELS)}")
    return MODELS[name]


def build_model(name: str, config: Any, shape: InputShape) -> nn.Module:
    """Instantiate a registered tower from its Config (an instance, or a dict of its fields, checked here)."""
    cls = model_class(name)
    if isinstance(config, dict):
        config = cls.Config(**config)
    if not isinstance(config, cls.Config):
        raise TypeError(f"config for {name!r} must be a {cls.Config.__name__} or a dict")
    return cls(config, shape)
