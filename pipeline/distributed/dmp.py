"""Wrap a RankingModel in DistributedModelParallel: sharded tables with fused optimizers, DDP for the rest.

    sharded = shard_model(model, cfg, env, data_parallel_wrapper=wrapper)
    sharded.dmp, sharded.optimizer (fused sparse + dense, for checkpoints), sharded.dense_optimizer, sharded.plan
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from embeddings.sharding import (
    SparseOptimizer,
    TableConstraint,
    apply_sparse_optimizer,
    describe_plan,
    make_sharders,
    plan_sharding,
    plan_to_dict,
)
from pipeline.config import RunConfig
from pipeline.distributed.env import DistEnv

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


def dense_optimizer_factory(cfg: RunConfig):
    t = cfg.train
    if t.dense_optimizer == "adamw":
        return lambda params: torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.dense_optimizer == "adam":
        return lambda params: torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return lambda params: torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)


def shard_model(model: nn.Module, cfg: RunConfig, env: DistEnv, *,
                data_parallel_wrapper: DefaultDataParallelWrapper | None = None) -> ShardedModel:
    """Plan, shard and wrap `model` (its sparse arch built on meta) for this process group."""
    e = cfg.embeddings
    apply_sparse_optimizer(model, SparseOptimizer(e.optimizer, e.lr, e.eps, e.weight_decay), env.device)
    sharders = make_sharders(env.device)
    constraints = {t: TableConstraint(list(s.sharding_types), list(s.compute_kernels)) for t, s in e.sharding.items()}
    plan = plan_sharding(model, sharders=sharders, world_size=env.world_size,
                         local_world_size=env.local_world_size, device=env.device,
                         batch_size_per_rank=cfg.data.batch_size_per_rank, constraints=constraints)
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
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  dense_optimizer_factory(cfg))
    return ShardedModel(dmp=dmp, optimizer=CombinedOptimizer([dmp.fused_optimizer, dense]), dense_optimizer=dense,
                        plan=plan)
