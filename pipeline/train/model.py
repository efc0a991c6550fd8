"""The model of a run, as its config describes it: the tower and the tables, sharded for this process group with
their optimizers and the dense allreduce (pipeline/distributed/dmp.py does the wiring; this module reads the
config for it, so the communication layer knows no run config).

    built = build_run_model(cfg, env)     # built.sharded (DMP, optimizers, plan), built.hook, built.sequence_feed
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from hyrank.embeddings.dedup import SequenceFeed, dedup_key
from hyrank.embeddings.sharding import SparseOptimizer, TableConstraint
from hyrank.models import build_model
from hyrank.pipeline.config import RunConfig, TrainConfig
from hyrank.pipeline.distributed.comm_hooks import StaleAllReduce
from hyrank.pipeline.distributed.dmp import ShardedModel, make_data_parallel_wrapper, shard_model
from hyrank.pipeline.distributed.env import DistEnv
from hyrank.pipeline.ranker import RankingModel
from hyrank.pipeline.train.compile import autocast_tower, compile_tower


@dataclass
class RunModel:
    sharded: ShardedModel
    hook: StaleAllReduce | None  # the async allreduce's state, None for plain DDP
    sequence_feed: SequenceFeed | None  # readers shape sequences the way this model's lookup reads them


def build_run_model(cfg: RunConfig, env: DistEnv) -> RunModel:
    """The configured tower and tables, sharded; the same dense init on every rank (DDP also broadcasts rank 0's)."""
    torch.manual_seed(cfg.seed)
    spec = cfg.features
    tower = build_model(cfg.model.name, cfg.model.config, spec.input_shape())
    if cfg.train.autocast == "bf16":
        autocast_tower(tower, env.device.type)
    if cfg.train.compile:
        compile_tower(tower, report=env.is_main)
    model = RankingModel(spec, tower, sparse_device=torch.device("meta"), dedup=cfg.embeddings.dedup,
                         init_scale=cfg.embeddings.init_scale, world_size=env.world_size)
    t = cfg.train
    wrapper, hook = make_data_parallel_wrapper(t.allreduce, t.allreduce_compression, t.allreduce_delay_compensation,
                                               t.allreduce_weight_prediction)
    sharded = shard_model(model, env, data_parallel_wrapper=wrapper, **sharding_arguments(cfg, model))
    return RunModel(sharded, hook, model.sequence_feed)


def sharding_arguments(cfg: RunConfig, model: nn.Module) -> dict[str, Any]:
    """What shard_model takes from the run config: the tables' fused optimizer, the planner's constraints, the batch
    size it plans for, and the dense optimizer."""
    e = cfg.embeddings
    return {"sparse_optimizer": SparseOptimizer(e.optimizer, e.lr, e.eps, e.weight_decay),
            "constraints": table_constraints(cfg, model),
            "batch_size_per_rank": cfg.data.batch_size_per_rank,
            "dense_optimizer": dense_optimizer_factory(cfg.train)}


def table_constraints(cfg: RunConfig, model: nn.Module) -> dict[str, TableConstraint]:
    """The planner's per-table inputs of a run (what `hyrank plan` plans with too): embeddings.sharding's
    constraints, and the ids a sample looks up per feature of each table: a sequence column its max_len (every
    sequence full: the worst case, as models/accounting counts FLOPs), a pooled feature 1, a deduplicated table's
    one key the sum of its features' (no saving from duplicates assumed)."""
    max_len = {c: s.max_len for s in cfg.features.sequences for c in s.columns}
    layout = cfg.features.embedding_layout()
    managed = {t.name for t in cfg.features.tables if t.managed is not None}
    out = {}
    for _, sub in model.named_modules():
        configs_of = getattr(sub, "embedding_bag_configs", None) or getattr(sub, "embedding_configs", None)
        if not callable(configs_of) or not isinstance(sub, (EmbeddingBagCollection, EmbeddingCollection)):
            continue
        for table in configs_of():
            ids = {f: float(max_len.get(f, 1)) for f in (lk.feature for lk in layout.lookups if lk.table == table.name)}
            ids[dedup_key(table.name)] = sum(ids.values())
            given = cfg.embeddings.sharding.get(table.name)
            if given is not None:
                types, kernels = list(given.sharding_types), list(given.compute_kernels)
            else:  # TorchRec shards a managed table row-wise or not at all: say so to the planner
                types, kernels = (["row_wise"], ["fused"]) if table.name in managed else ([], [])
            out[table.name] = TableConstraint(types, kernels,
                                              pooling_factors=tuple(ids[f] for f in table.feature_names))
    return out


def dense_optimizer_factory(t: TrainConfig) -> Callable[[list], torch.optim.Optimizer]:
    """The optimizer train.dense_optimizer names, at train.lr and train.weight_decay. Adam(W) runs fused (one kernel
    over every tensor; CPU and CUDA): the per-parameter loop of the default was 9% of HyFormer's step and 14% of
    HHFT's on CPU (docs/results.md), and the result is the same update up to float rounding."""
    if t.dense_optimizer == "adamw":
        return lambda params: torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)
    if t.dense_optimizer == "adam":
        return lambda params: torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)
    return lambda params: torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)
