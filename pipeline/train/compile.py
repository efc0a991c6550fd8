"""train.compile: a dense tower under torch.compile, applied from outside (models/ stay plain modules).

    compile_tower(tower)        # in place; then shard/wrap it as usual

Torch only (no torchrec), so `hyrank bench model --compile` on a GPU box with torch alone compiles the same way.
"""

from __future__ import annotations

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
