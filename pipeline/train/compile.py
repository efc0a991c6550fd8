"""train.compile and train.autocast: a dense tower under torch.compile and/or bf16 autocast, applied from outside
(models/ stay plain modules).

    autocast_tower(tower, "cpu")  # in place: training forwards under bf16 autocast, the logits back in fp32
    compile_tower(tower)          # in place (after autocast_tower, so the compiled graph holds the autocast)

Torch only (no torchrec), so `hyrank bench model --compile` on a GPU box with torch alone compiles the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import torch
from torch import nn

log = logging.getLogger(__name__)


def compile_tower(tower: nn.Module, *, report: bool = True) -> None:
    """train.compile: the tower's forward under torch.compile (inductor), in place, so its parameters keep their
    names and DMP, DDP and the dense sync wrap it as they wrap the plain module. Logs, once, how long the first
    forward took: the forward's compile (the backward's follows in the first backward). The forward, not the
    module (nn.Module.compile): module hooks, such as the one timing it here, stay outside the compiled graph."""
    tower.forward = torch.compile(tower.forward)
    start: list[float] = []

    def before(module, args):
        start.append(time.perf_counter())

    def after(module, args, output):
        pre.remove()
        post.remove()
        if report:
            log.info("train.compile: the tower's first forward took %.1f s (inductor compile; the backward compiles "
                     "in the first backward)", time.perf_counter() - start[0])

    pre, post = tower.register_forward_pre_hook(before), tower.register_forward_hook(after)


def autocast_tower(tower: nn.Module, device_type: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """train.autocast = "bf16": the tower's forward, in training mode only, under torch.autocast(bf16) on
    `device_type` (CPU too: AMX/AVX-512 bf16 matmuls), in place. Parameters, gradients and optimizer state stay
    fp32 (autocast casts per op), the logits come back fp32, so the loss and metrics are fp32. In eval mode (the
    evaluation days, scoring) the forward is plain fp32: the numbers reported are those of the fp32 model that
    export serves from the same weights."""
    forward = tower.forward

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not tower.training:
            return forward(*args, **kwargs)
        with torch.autocast(device_type, dtype=dtype):
            out = forward(*args, **kwargs)
        return dataclasses.replace(out, logits=out.logits.float())

    tower.forward = run
