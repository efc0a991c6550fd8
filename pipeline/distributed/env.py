"""Process-group setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...).

Outside torchrun a run is a world of one: a gloo group on a free local port, so the same code path (DMP, the
planner, collectives in metrics) runs in a plain `python` process and in tests.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from hyrank.pipeline.distributed.collectives import Collectives


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    comm: Collectives = field(default_factory=lambda: Collectives(0, 1), compare=False)  # the pipeline's collectives

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto", timeout_s: int = 600) -> DistEnv:
    """Join (or create) the default process group and pick this rank's device."""
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("train.backend = 'nccl' needs CUDA, and none is available; use 'gloo' or 'auto'")
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        init_method = None if "MASTER_ADDR" in os.environ else f"tcp://127.0.0.1:{_free_port()}"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=dt.timedelta(seconds=timeout_s))
    return DistEnv(rank, dist.get_world_size(), local_rank, local_world_size, device, Collectives.of_world())


def env_of_current_group(device: torch.device | None = None) -> DistEnv:
    """DistEnv for an already initialised default group (tests create groups themselves)."""
    world = dist.get_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return DistEnv(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", dist.get_rank())), local,
                   device or torch.device("cpu"), Collectives.of_world())
