"""Sharding plan and fused sparse optimisers for the sparse arch.

    apply_sparse_optimizer(arch, SparseOptimizer("rowwise_adagrad", lr=0.05))
    sharders = make_sharders(device)
    plan = plan_sharding(model, sharders=sharders, world_size=2, device=device, constraints={...})

The planner (`EmbeddingShardingPlanner` + `Topology`) picks a sharding per table within the user's constraints.
Only the `fused` kernel is allowed for sharded tables (fbgemm applies the optimizer inside backward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.constants import DDR_CAP, HBM_CAP
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from hyrank.embeddings.planning import Cluster, explain_no_fit, parameter_constraints, without_ec_data_parallel

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


@dataclass(frozen=True)
class TableConstraint:
    """What the planner may choose for one table (an empty list: anything its sharder offers), and how many ids a
    sample looks up in it per feature, in the order of the table's features (empty: TorchRec's default of 1)."""

    sharding_types: list[str]
    compute_kernels: list[str]
    min_partition: int | None = None  # narrowest column-wise shard; None keeps the planner's default
    pooling_factors: tuple[float, ...] = ()


def make_sharders(device: torch.device) -> list[ModuleSharder[nn.Module]]:
    """TorchRec's sharders of the EBC and EC for `device`, and of their managed-collision twins
    (embeddings/managed_lookup.py); for a CUDA device they only describe the GPU kernels (planning on a machine
    without a GPU touches no CUDA: `hyrank plan`)."""
    from hyrank.embeddings.managed_lookup import managed_sharders

    def ebc() -> EmbeddingBagCollectionSharder:
        return EmbeddingBagCollectionSharder() if device.type == "cuda" else _CPURowWiseEBCSharder()

    return [ebc(), EmbeddingCollectionSharder(), *managed_sharders(ebc(), EmbeddingCollectionSharder())]


def plan_sharding(
    module: nn.Module,
    *,
    sharders: list[ModuleSharder[nn.Module]],
    world_size: int,
    local_world_size: int,
    device: torch.device,
    batch_size_per_rank: int,
    constraints: dict[str, TableConstraint | tuple[list[str], list[str]]] | None = None,
    group: Any = None,
    hbm_bytes: int | None = None,
    host_bytes: int | None = None,
) -> ShardingPlan:
    """Plan table placement; `constraints` maps table name -> TableConstraint or (sharding types, kernels).

    With a process `group` (the caller's: communication is pipeline/distributed's), rank 0 plans and broadcasts
    (all ranks get the same plan even if the planner's heuristics were not deterministic); without one each
    process plans alone, which needs no process group. A planner error on rank 0 under a group
    leaves the other ranks waiting in the broadcast until the process group's timeout: keep it short in tests.
    `hbm_bytes` / `host_bytes` are one rank's device and host memory (None: TorchRec's defaults, 32 and 128 GiB).
    """
    topology = Topology(world_size=world_size, local_world_size=local_world_size, compute_device=device.type,
                        hbm_cap=hbm_bytes, ddr_cap=host_bytes)
    typed = {t: c if isinstance(c, TableConstraint) else TableConstraint(list(c[0]), list(c[1]))
             for t, c in (constraints or {}).items()}
    check_constraints(module, sharders, typed, device)
    typed = without_ec_data_parallel(module, sharders, typed, device.type)
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size_per_rank, constraints=parameter_constraints(typed), debug=False
    )
    try:
        if group is not None:
            return planner.collective_plan(module, sharders, group)
        return planner.plan(module, sharders)
    except PlannerError as e:  # twenty lines naming no table: one naming the table and the way out
        cluster = Cluster(hosts=max(1, world_size // local_world_size), gpus_per_host=local_world_size,
                          hbm_bytes=hbm_bytes or HBM_CAP, host_bytes=(host_bytes or DDR_CAP) * local_world_size,
                          device=device.type)
        raise ValueError(explain_no_fit(module, planner, sharders, cluster, e)) from None


def check_constraints(module: nn.Module, sharders: list[ModuleSharder[nn.Module]],
                      constraints: dict[str, TableConstraint], device: torch.device) -> None:
    """Refuse, before planning, a table whose allowed sharding types or kernels its module's sharder cannot do.

    The planner's own message ("No available sharding type and compute kernel combination") names neither the
    cause nor the way out, and under `collective_plan` it is raised on rank 0 only while the other ranks wait
    in the broadcast. This check runs on every rank from the same inputs, so all fail together.
    """
    from torchrec.modules.mc_embedding_modules import BaseManagedCollisionEmbeddingCollection

    managed_inner = set()  # the collection inside a managed one is sharded by the managed one's sharder
    for name, sub in module.named_modules():
        sharder = next((s for s in sharders if type(sub) is s.module_type), None)
        if isinstance(sub, BaseManagedCollisionEmbeddingCollection):
            managed_inner.add(id(sub._embedding_module))
            sub = sub._embedding_module
        elif id(sub) in managed_inner:
            continue
        configs_of = getattr(sub, "embedding_bag_configs", None) or getattr(sub, "embedding_configs", None)
        if sharder is None or configs_of is None:
            continue
        configs = configs_of()
        supported = list(sharder.sharding_types(device.type))
        if isinstance(sub, EmbeddingCollection):
            # TorchRec 1.8 advertises it, but its data-parallel EmbeddingCollection lookup returns fewer rows than
            # there are events and fails in its own output split (test_sharding.py keeps a canary of this).
            supported = [t for t in supported if t != ShardingType.DATA_PARALLEL.value]
        for cfg in configs:
            c = constraints.get(cfg.name)
            if c is None:
                continue
            types = [t for t in c.sharding_types or supported if t in supported]
            if not types and id(sub) in managed_inner:
                raise ValueError(
                    f"embeddings.sharding[{cfg.name!r}] allows only {c.sharding_types}, but table {cfg.name!r} is "
                    f"managed (a managed-collision table) and TorchRec shards those {supported} only")
            if not types:
                raise ValueError(
                    f"embeddings.sharding[{cfg.name!r}] allows only {c.sharding_types}, but table {cfg.name!r} "
                    f"lives in a {type(sub).__name__} whose TorchRec sharder supports {supported} on "
                    f"{device.type}; pick one of those (e.g. row_wise instead of table_row_wise)")
            kernels = {k for t in types for k in sharder.compute_kernels(t, device.type)}
            if c.compute_kernels and not set(c.compute_kernels) & kernels:
                raise ValueError(
                    f"embeddings.sharding[{cfg.name!r}] allows only the kernels {c.compute_kernels}, but TorchRec "
                    f"offers {sorted(kernels)} for table {cfg.name!r} on {device.type} (UVM kernels need CUDA); "
                    f"pick one of those")


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


def plan_to_dict(plan: ShardingPlan) -> dict[str, dict[str, dict]]:
    """The plan as plain data (str/int/list only) for checkpoints and logs: module -> table -> placement.

    Each table gets its sharding type, kernel, ranks, and one entry per shard (rank, offsets, sizes), enough to
    tell whether a checkpoint was written under a different layout.
    """
    out: dict[str, dict[str, dict]] = {}
    for module_path, module_plan in plan.plan.items():
        tables = {}
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            shards = []
            if ps.sharding_spec is not None and hasattr(ps.sharding_spec, "shards"):
                shards = [{"rank": _placement_rank(sh.placement), "offsets": list(map(int, sh.shard_offsets)),
                           "sizes": list(map(int, sh.shard_sizes))} for sh in ps.sharding_spec.shards]
            tables[table] = {"sharding_type": str(ps.sharding_type), "compute_kernel": str(ps.compute_kernel),
                             "ranks": [int(r) for r in (ps.ranks or [])], "shards": shards}
        out[module_path] = tables
    return out


def _placement_rank(placement) -> int:
    # ShardMetadata.placement is a torch `_remote_device` ("rank:0/cpu"); only the rank is plan data.
    rank = placement.rank() if placement is not None else None
    return -1 if rank is None else int(rank)
