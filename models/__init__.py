"""Dense towers, registered by name. Pure single-device PyTorch: no torch.distributed, no torchrec.

    model = build_model("dlrm_mlp", {"hidden": [256, 128]}, shape)   # shape: models.inputs.InputShape
"""

from __future__ import annotations

if __name__ != "hyrank.models":  # a checkout's root on sys.path must not make a second, top-level copy
    raise ImportError(f"import hyrank.models, not {__name__}: hyrank installs its packages under one namespace")

from typing import Any

from torch import nn

from hyrank.models.dcnv2 import DCNv2
from hyrank.models.dlrm import DLRM
from hyrank.models.hhft import HHFT
from hyrank.models.hiformer import Hiformer
from hyrank.models.hyformer import HyFormer
from hyrank.models.inputs import InputShape
from hyrank.models.longer_rankmixer import LongerRankMixer
from hyrank.models.onetrans import OneTrans
from hyrank.models.rankmixer import RankMixer
from hyrank.models.transformer import Transformer

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
