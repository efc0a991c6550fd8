"""Wrap a RankingModel in DistributedModelParallel: sharded tables with fused optimizers, DDP for the rest.

    dmp, optimizer, plan = shard_model(model, cfg, env)
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

from embeddings.sharding import SparseOptimizer, apply_sparse_optimizer, describe_plan, make_sharders, plan_sharding
from pipeline.config import RunConfig
from pipeline.distributed.env import DistEnv

log = logging.getLogger(__name__)


@dataclass
class ShardedModel:
    dmp: DistributedModelParallel
    optimizer: CombinedOptimizer  # fused sparse optimizers + the dense optimizer
    plan: ShardingPlan


def dense_optimizer_factory(cfg: RunConfig):
    t = cfg.train
    if t.dense_optimizer == "adamw":
        return lambda params: torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.dense_optimizer == "adam":
        return lambda params: torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return lambda params: torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)


def shard_model(model: nn.Module, cfg: RunConfig, env: DistEnv) -> ShardedModel:
    """Plan, shard and wrap `model` (its sparse arch built on meta) for this process group."""
    e = cfg.embeddings
    apply_sparse_optimizer(model, SparseOptimizer(e.optimizer, e.lr, e.eps, e.weight_decay), env.device)
    sharders = make_sharders(env.device)
    constraints = {t: (s.sharding_types, s.compute_kernels) for t, s in e.sharding.items()}
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
        data_parallel_wrapper=DefaultDataParallelWrapper(),
    )
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  dense_optimizer_factory(cfg))
    return ShardedModel(dmp=dmp, optimizer=CombinedOptimizer([dmp.fused_optimizer, dense]), plan=plan)
