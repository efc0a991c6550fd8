"""Wrap a RankingModel in DistributedModelParallel: sharded tables with fused optimizers, DDP for the rest.

    wrapper, hook = make_data_parallel_wrapper(cfg.train.allreduce, ...)   # DDP, with the stale hook for "async"
    sharded = shard_model(model, env, data_parallel_wrapper=wrapper, **sharding_arguments(cfg, model))  # train/model.py
    sharded.dmp, sharded.optimizer (fused sparse + dense, for checkpoints), sharded.dense_optimizer, sharded.plan
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from hyrank.embeddings.sharding import (
    SparseOptimizer,
    TableConstraint,
    apply_sparse_optimizer,
    describe_plan,
    make_sharders,
    plan_sharding,
    plan_to_dict,
)
from hyrank.pipeline.distributed.comm_hooks import Compression, StaleAllReduce, stale_allreduce_hook
from hyrank.pipeline.distributed.env import DistEnv

log = logging.getLogger(__name__)


@dataclass
class ShardedModel:
    dmp: DistributedModelParallel
    optimizer: CombinedOptimizer  # fused sparse optimizers + the dense optimizer
    dense_optimizer: KeyedOptimizerWrapper  # stepped by the trainer (the fused ones step inside backward)
    plan: ShardingPlan

    @property
    def plan_dict(self) -> dict[str, dict[str, dict]]:
        """The plan as plain data (module -> table -> sharding, kernel, ranks, shards), for checkpoints."""
        return plan_to_dict(self.plan)


@dataclass(frozen=True)
class HeldBytes:
    """The tensor bytes one rank holds after sharding, from the sharded module's state."""

    tables: int  # its shards of the sharded tables, and whole data-parallel tables
    optimizer: int  # the fused optimizer state of its shards (created with the shards, not at the first step)
    dense: int  # the replicated rest: tower parameters and buffers
    remap: int = 0  # managed tables' id remaps (embeddings/managed.py): their rank's slots


def held_bytes(sharded: ShardedModel) -> HeldBytes:
    """What this rank's sharded model holds: what `hyrank plan` predicts, measured (tests/test_plan.py)."""
    def nbytes(value) -> int:
        if isinstance(value, ShardedTensor):
            return sum(s.tensor.numel() * s.tensor.element_size() for s in value.local_shards())
        return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0

    tables = dense = remap = 0
    for name, value in sharded.dmp.state_dict().items():
        if ".embedding_bags." in name or ".embeddings." in name:
            tables += nbytes(value)
        elif "._managed_collision_collection." in name:
            remap += nbytes(value)
        else:
            dense += nbytes(value)
    state = sharded.dmp.fused_optimizer.state_dict()["state"]
    optimizer = sum(nbytes(v) for per_param in state.values() for v in per_param.values())
    return HeldBytes(tables=tables, optimizer=optimizer, dense=dense, remap=remap)


def shard_model(model: nn.Module, env: DistEnv, *, sparse_optimizer: SparseOptimizer, batch_size_per_rank: int,
                dense_optimizer: Callable[[list], torch.optim.Optimizer],
                constraints: dict[str, TableConstraint] | None = None,
                data_parallel_wrapper: DefaultDataParallelWrapper | None = None) -> ShardedModel:
    """Plan, shard and wrap `model` (its sparse arch built on meta) for this process group: the tables' fused
    `sparse_optimizer`, the planner's `constraints` by table, `dense_optimizer(params)` for the rest; planned for
    this rank's share of the machine's memory (rank_memory)."""
    apply_sparse_optimizer(model, sparse_optimizer, env.device)
    sharders = make_sharders(env.device)
    plan = plan_sharding(model, sharders=sharders, world_size=env.world_size,
                         local_world_size=env.local_world_size, device=env.device,
                         batch_size_per_rank=batch_size_per_rank, constraints=constraints,
                         group=torch.distributed.GroupMember.WORLD, **rank_memory(env))
    if env.is_main:
        log.info("sharding plan:\n%s", describe_plan(plan))
    dmp = DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(torch.distributed.GroupMember.WORLD),
        device=env.device,
        plan=plan,
        sharders=sharders,
        data_parallel_wrapper=data_parallel_wrapper or DefaultDataParallelWrapper(),
    )
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())), dense_optimizer)
    return ShardedModel(dmp=dmp, optimizer=CombinedOptimizer([dmp.fused_optimizer, dense]), dense_optimizer=dense,
                        plan=plan)


def rank_memory(env: DistEnv) -> dict[str, int]:
    """This rank's share of the machine for the planner: its GPU's memory, and the host's memory over the ranks on
    it. Without them TorchRec assumes 32 GiB of HBM and 128 GiB of host memory per rank whatever the machine, and a
    run on 80 GiB GPUs would be planned unlike `hyrank plan --hbm-gb 80`."""
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, env.local_world_size)
    out = {"host_bytes": host}
    if env.device.type == "cuda":
        out["hbm_bytes"] = torch.cuda.get_device_properties(env.device).total_memory
    return out


class HookedDataParallelWrapper(DefaultDataParallelWrapper):
    """DMP's DDP wrapper with the stale-allreduce hook registered before the first forward."""

    def __init__(self, state: StaleAllReduce, **kwargs):
        super().__init__(**kwargs)
        self.state = state

    def wrap(self, dmp, env, device) -> None:
        super().wrap(dmp, env, device)
        ddp = dmp._dmp_wrapped_module
        if isinstance(ddp, nn.parallel.DistributedDataParallel):
            self.state.process_group = env.process_group
            ddp.register_comm_hook(self.state, stale_allreduce_hook)


def make_data_parallel_wrapper(mode: str, compression: Compression = "none", compensation: float = 0.0,
                               prediction: float = 0.0) -> tuple[DefaultDataParallelWrapper, StaleAllReduce | None]:
    """The DDP wrapper for `train.allreduce`: plain DDP for "sync", the stale hook for "async" (with delay
    compensation of strength `compensation` and weight prediction of scale `prediction`; nothing is stale under
    "sync", so neither is used there).

    "hook_sync" (tests only) runs the hook with staleness 0: the hook's machinery with plain DDP's arithmetic.
    """
    if mode == "sync":
        precision = "bf16" if compression == "bf16" else None
        return DefaultDataParallelWrapper(allreduce_comm_precision=precision), None
    state = StaleAllReduce(compression=compression, staleness=0 if mode == "hook_sync" else 1,
                           compensation=compensation, prediction=prediction)
    return HookedDataParallelWrapper(state), state
