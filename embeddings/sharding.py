"""Sharding plan and fused sparse optimisers for the sparse arch.

    apply_sparse_optimizer(arch, SparseOptimizer("rowwise_adagrad", lr=0.05))
    sharders = make_sharders(device)
    plan = plan_sharding(model, sharders=sharders, world_size=2, device=device, constraints={...})

The planner (`EmbeddingShardingPlanner` + `Topology`) picks a sharding per table within the user's constraints.
Only the `fused` kernel is allowed for sharded tables (fbgemm applies the optimizer inside backward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

SparseOptimizerName = Literal["rowwise_adagrad", "adagrad", "sgd", "adam"]


@dataclass(frozen=True)
class SparseOptimizer:
    """The optimizer fbgemm fuses into the embedding backward."""

    name: SparseOptimizerName
    lr: float
    eps: float = 1e-8
    weight_decay: float = 0.0


def apply_sparse_optimizer(module: nn.Module, opt: SparseOptimizer, device: torch.device) -> None:
    """Attach the fused optimizer to every embedding table of `module` (before DMP shards it)."""
    import torchrec.optim as trec_optim

    if opt.name == "adam" and device.type != "cuda":
        raise ValueError("embeddings.optimizer = 'adam' needs CUDA: fbgemm's CPU kernels refuse fused Adam. "
                         "Use 'rowwise_adagrad', 'adagrad' or 'sgd' on CPU.")
    classes = {
        "rowwise_adagrad": (trec_optim.RowWiseAdagrad, {"lr": opt.lr, "eps": opt.eps, "weight_decay": opt.weight_decay}),
        "adagrad": (torch.optim.Adagrad, {"lr": opt.lr, "eps": opt.eps, "weight_decay": opt.weight_decay}),
        "sgd": (torch.optim.SGD, {"lr": opt.lr, "weight_decay": opt.weight_decay}),
        "adam": (torch.optim.Adam, {"lr": opt.lr, "eps": opt.eps, "weight_decay": opt.weight_decay}),
    }
    cls, kwargs = classes[opt.name]
    params = [p for name, p in module.named_parameters() if _is_table(name)]
    apply_optimizer_in_backward(cls, params, kwargs)


def _is_table(param_name: str) -> bool:
    return ".embedding_bags." in f".{param_name}" or ".embeddings." in f".{param_name}"


class _CPURowWiseEBCSharder(EmbeddingBagCollectionSharder):
    """EBC sharder that also advertises row-wise sharding types on CPU.

    TorchRec lists ROW_WISE / TABLE_ROW_WISE for EBC only when the device is CUDA, although the CPU fbgemm
    kernels and gloo collectives run them correctly (measured: outputs match the unsharded module). Without this
    a CPU job could not exercise the row-wise path that production uses on GPUs.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        for extra in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value):
            if extra not in types:
                types.append(extra)
        return types


def make_sharders(device: torch.device) -> list[ModuleSharder[nn.Module]]:
    ebc = EmbeddingBagCollectionSharder() if device.type == "cuda" else _CPURowWiseEBCSharder()
    return [ebc, EmbeddingCollectionSharder()]


def plan_sharding(
    module: nn.Module,
    *,
    sharders: list[ModuleSharder[nn.Module]],
    world_size: int,
    local_world_size: int,
    device: torch.device,
    batch_size_per_rank: int,
    constraints: dict[str, tuple[list[str], list[str]]] | None = None,
    collective: bool = True,
) -> ShardingPlan:
    """Plan table placement; `constraints` maps table name -> (sharding types, compute kernels).

    With `collective=True` rank 0 plans and broadcasts (all ranks get the same plan even if the planner's
    heuristics were not deterministic); this needs an initialised process group.
    """
    topology = Topology(world_size=world_size, local_world_size=local_world_size, compute_device=device.type)
    param_constraints = {
        table: ParameterConstraints(sharding_types=list(types), compute_kernels=list(kernels))
        for table, (types, kernels) in (constraints or {}).items()
    }
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size_per_rank, constraints=param_constraints, debug=False
    )
    if collective:
        import torch.distributed as dist

        return planner.collective_plan(module, sharders, dist.GroupMember.WORLD)
    return planner.plan(module, sharders)


def describe_plan(plan: ShardingPlan) -> str:
    """The plan as a readable table: module, table, sharding type, kernel, ranks."""
    rows = [("module", "table", "sharding", "kernel", "ranks")]
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            ranks = sorted(set(ps.ranks or []))
            rows.append((module_path, table, ps.sharding_type, ps.compute_kernel, ",".join(map(str, ranks))))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
