"""What a sharding plan costs on a cluster: TorchRec's planner run for a topology this machine does not have.

    cluster = Cluster(hosts=8, gpus_per_host=8, hbm_bytes=80 * GiB, host_bytes=1024 * GiB)
    report = plan_cluster(model, sharders=make_sharders(torch.device("cuda")), cluster=cluster,
                          batch_size_per_rank=2048, constraints={...})
    report.ranks[r].hbm.tables, report.tables[0].compute_kernel, report.critical_rank.lookup_ms

No GPU is needed: the planner reads shapes (build the model on the meta device), the fused optimizer attached to
each table and the topology, and `plan()` runs without a process group. A plan that does not fit raises a
ValueError of one line naming the table that decides it and what would make it fit.

Memory is counted in two ways, side by side: `tables` and `optimizer` are the exact bytes of the weights and the
fused optimizer state each rank holds (shard sizes x 4 bytes; the optimizer's share as TorchRec's planner counts
it: row-wise Adagrad one float per row, Adam two per element); `planner` is what TorchRec's planner bin-packs with,
which adds its estimate of the lookup's input and output buffers (`io` = planner - tables - optimizer - cache).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.constants import UVM_CACHING_RATIO
from torchrec.distributed.planner.shard_estimators import _get_optimizer_multipler
from torchrec.distributed.planner.types import PlannerError, ShardingOption
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingCollection

GiB = 1024**3
# TorchRec's HeuristicalStorageReservation (its planner's default): 15% of every device held back as a margin, and
# 6x the dense parameters' bytes (weights, gradients, optimizer state, copies) before any table is placed
RESERVED_SHARE = 0.15
SPLITTABLE = {"row_wise", "table_row_wise", "column_wise", "table_column_wise", "grid_shard"}
CACHED_KERNELS = {"fused_uvm_caching"}  # a share of the table in HBM, all of it in host memory
HOST_KERNELS = {"fused_uvm"}  # the table in host memory, read over PCIe


@dataclass(frozen=True)
class Cluster:
    """The machines a plan is for: `hosts` x `gpus_per_host` ranks."""

    hosts: int
    gpus_per_host: int
    hbm_bytes: int  # per GPU
    host_bytes: int  # per host, shared by its ranks (each gets host_bytes / gpus_per_host)
    device: str = "cuda"  # "cpu": CPU ranks (what runs here); the planner then puts everything in host memory

    def __post_init__(self) -> None:
        for name in ("hosts", "gpus_per_host", "hbm_bytes", "host_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")

    @property
    def world_size(self) -> int:
        return self.hosts * self.gpus_per_host

    def topology(self) -> Topology:
        return Topology(world_size=self.world_size, local_world_size=self.gpus_per_host, compute_device=self.device,
                        hbm_cap=self.hbm_bytes, ddr_cap=self.host_bytes // self.gpus_per_host)


@dataclass
class Memory:
    """Bytes of one rank in one tier."""

    tables: int = 0
    optimizer: int = 0
    cache: int = 0  # UVM caching: the share of a table kept in HBM
    planner: int = 0  # what the planner placed: the above plus its input/output buffer estimate

    @property
    def io(self) -> int:
        return max(0, self.planner - self.tables - self.optimizer - self.cache)


@dataclass
class RankLoad:
    """One rank: memory per tier and the planner's time estimate for its embedding shards (ms per step)."""

    rank: int
    hbm: Memory = field(default_factory=Memory)
    host: Memory = field(default_factory=Memory)
    lookup_ms: float = 0.0  # forward + backward lookup (and UVM prefetch) of this rank's shards
    comms_ms: float = 0.0  # forward + backward output all-to-all / reduce-scatter
    input_dist_ms: float = 0.0  # the ids' all-to-all; TorchRec's rating leaves it out
    planner_ms: float = 0.0  # TorchRec's rating of this rank: lookup + comms


@dataclass(frozen=True)
class TablePlacement:
    module: str
    name: str
    rows: int
    dim: int
    sharding_type: str
    compute_kernel: str
    ranks: tuple[int, ...]
    table_bytes: int  # the whole table's weights (data_parallel: one replica)
    optimizer_bytes: int  # its fused optimizer state (one replica)
    cache_load_factor: float | None = None  # fused_uvm_caching: the share of rows cached in HBM


@dataclass
class PlanReport:
    plan: ShardingPlan
    cluster: Cluster
    tables: list[TablePlacement]
    ranks: list[RankLoad]
    reserved_dense_bytes: int  # per rank, by TorchRec's heuristic (6x the dense parameters' bytes)
    reserved_input_bytes: int  # per rank: the planner's allowance for input KJTs (2 batches, 10 copies each)
    reserved_margin_bytes: int  # per rank: RESERVED_SHARE of the device
    num_proposals: int
    seconds: float

    @property
    def critical_rank(self) -> RankLoad:
        """The rank TorchRec's planner rates slowest: the one every step waits for."""
        return max(self.ranks, key=lambda r: r.planner_ms)


def parameter_constraints(constraints: dict[str, Any]) -> dict[str, ParameterConstraints]:
    """TableConstraint-like objects -> TorchRec's ParameterConstraints (empty lists: anything the sharder offers)."""
    return {table: ParameterConstraints(sharding_types=list(c.sharding_types) or None,
                                        compute_kernels=list(c.compute_kernels) or None,
                                        min_partition=c.min_partition,
                                        pooling_factors=list(c.pooling_factors) or [1.0])
            for table, c in constraints.items()}


def without_ec_data_parallel(module: nn.Module, sharders: list[ModuleSharder[nn.Module]], constraints: dict[str, Any],
                             device_type: str) -> dict[str, Any]:
    """`constraints` with data_parallel taken out of the choices of every EmbeddingCollection table that states none.

    TorchRec 1.8 offers it, and its data-parallel EmbeddingCollection lookup fails at the first forward (the
    canary in tests/test_sharding.py; embeddings.sharding.check_constraints refuses it when asked for): left free,
    the planner picks it for small sequence side tables on GPUs, and such a run would fail at its first step."""
    out = dict(constraints)
    for _, sub in module.named_modules():
        sharder = next((s for s in sharders if type(sub) is s.module_type), None)
        if not isinstance(sub, EmbeddingCollection) or sharder is None:
            continue
        allowed = [t for t in sharder.sharding_types(device_type) if t != "data_parallel"]
        for cfg in sub.embedding_configs():
            c = out.get(cfg.name)
            if c is not None and not c.sharding_types:
                out[cfg.name] = dataclasses.replace(c, sharding_types=allowed)
    return out


def plan_cluster(module: nn.Module, *, sharders: list[ModuleSharder[nn.Module]], cluster: Cluster,
                 batch_size_per_rank: int, constraints: dict[str, Any]) -> PlanReport:
    """Run TorchRec's planner for `cluster` on this machine and report memory and time per rank and placement per
    table; a ValueError of one line if no plan fits."""
    constraints = without_ec_data_parallel(module, sharders, constraints, cluster.device)
    planner = EmbeddingShardingPlanner(topology=cluster.topology(), batch_size=batch_size_per_rank,
                                       constraints=parameter_constraints(constraints), debug=False)
    start = time.perf_counter()
    try:
        plan = planner.plan(module, sharders)
    except PlannerError as e:
        raise ValueError(explain_no_fit(module, planner, sharders, cluster, e)) from None
    seconds = time.perf_counter() - start
    dense, inputs = _reserved(planner, cluster)
    options = planner._best_plan or []
    return PlanReport(plan=plan, cluster=cluster, tables=[_placement(so) for so in options],
                      ranks=_rank_loads(options, cluster), num_proposals=planner._num_proposals, seconds=seconds,
                      reserved_dense_bytes=dense, reserved_input_bytes=inputs,
                      reserved_margin_bytes=_margin(cluster))


def _reserved(planner: EmbeddingShardingPlanner, cluster: Cluster) -> tuple[int, int]:
    """(dense, input KJT) bytes the planner's storage reservation holds back on each rank's fast tier."""
    tier = "hbm" if cluster.device == "cuda" else "ddr"
    reservation = planner._storage_reservation
    dense, inputs = getattr(reservation, "_dense_storage", None), getattr(reservation, "_kjt_storage", None)
    return (getattr(dense, tier) if dense else 0), (getattr(inputs, tier) if inputs else 0)


def _margin(cluster: Cluster) -> int:
    # the reservation's percentage is taken off HBM only: a CPU rank's memory has no margin
    return int(RESERVED_SHARE * cluster.hbm_bytes) if cluster.device == "cuda" else 0


def _capacity(planner: EmbeddingShardingPlanner, cluster: Cluster) -> tuple[int, int]:
    """(fast, host) bytes each rank has for tables after the reservation; fast is HBM on GPUs, memory on CPUs."""
    dense, inputs = _reserved(planner, cluster)
    host = cluster.host_bytes // cluster.gpus_per_host
    if cluster.device == "cpu":
        return host - dense - inputs, 0
    return cluster.hbm_bytes - _margin(cluster) - dense - inputs, host


def _element_and_optimizer_share(so: ShardingOption) -> tuple[int, float]:
    """(weight bytes per element, optimizer bytes per weight byte) of a table."""
    optimizer_class = getattr(so.tensor, "_optimizer_classes", [None])[0]
    return so.tensor.element_size(), float(_get_optimizer_multipler(optimizer_class, so.tensor.shape))


def _placement(so: ShardingOption) -> TablePlacement:
    rows, dim = so.tensor.shape
    element, opt_share = _element_and_optimizer_share(so)
    table = rows * dim * element
    caching = so.compute_kernel in CACHED_KERNELS
    return TablePlacement(module=so.path, name=so.name, rows=rows, dim=dim, sharding_type=so.sharding_type,
                          compute_kernel=so.compute_kernel, ranks=tuple(sorted({s.rank for s in so.shards})),
                          table_bytes=table, optimizer_bytes=round(table * opt_share),
                          cache_load_factor=(so.cache_load_factor or UVM_CACHING_RATIO) if caching else None)


def _rank_loads(options: list[ShardingOption], cluster: Cluster) -> list[RankLoad]:
    ranks = [RankLoad(rank=r) for r in range(cluster.world_size)]
    for so in options:
        element, opt_share = _element_and_optimizer_share(so)
        for shard in so.shards:
            load = ranks[shard.rank]
            weights = math.prod(shard.size) * element
            optimizer = round(weights * opt_share)
            fast = load.hbm if cluster.device == "cuda" else load.host
            if so.compute_kernel in CACHED_KERNELS or so.compute_kernel in HOST_KERNELS:
                load.host.tables += weights
                load.host.optimizer += optimizer
                if so.compute_kernel in CACHED_KERNELS:
                    load.hbm.cache += round(weights * (so.cache_load_factor or UVM_CACHING_RATIO))
            else:
                fast.tables += weights
                fast.optimizer += optimizer
            load.hbm.planner += shard.storage.hbm
            load.host.planner += shard.storage.ddr
            perf = shard.perf
            load.lookup_ms += perf.fwd_compute + perf.bwd_compute + perf.prefetch_compute
            load.comms_ms += perf.fwd_comms + perf.bwd_comms
            load.input_dist_ms += perf.input_dist_comms
            load.planner_ms += perf.total
    return ranks


# -- a plan that does not fit, in one line -------------------------------------------------------------------------


@dataclass
class _Table:
    """One table as the planner's enumerated options see it: the least each of its placements asks for."""

    name: str
    rows: int
    dim: int
    need: float = math.inf  # fast-tier bytes (HBM; memory on CPU) of its cheapest placement without UVM
    smallest_shard: float = math.inf  # the largest shard of its most evenly spread placement without UVM
    cached_need: float = math.inf  # HBM of its cheapest UVM placement (cache, buffers)
    cached_host: float = math.inf  # host memory of that placement
    splittable: bool = False  # some placement spreads it over several ranks
    may_cache: bool = False  # some placement keeps it in host memory (fused_uvm_caching, fused_uvm)


def _tables(planner: EmbeddingShardingPlanner, module: nn.Module, sharders: list[ModuleSharder[nn.Module]],
            cluster: Cluster) -> list[_Table]:
    """Every table's cheapest placements among those the planner may choose (its enumerated options, which apply
    embeddings.sharding's constraints): bytes with optimizer state and the planner's input/output buffers."""
    fast_tier = "hbm" if cluster.device == "cuda" else "ddr"
    tables: dict[str, _Table] = {}
    for so in planner._enumerator.enumerate(module=module, sharders=sharders):
        t = tables.setdefault(so.name, _Table(so.name, *so.tensor.shape))
        fast = [getattr(sh.storage, fast_tier) for sh in so.shards]
        if so.compute_kernel in CACHED_KERNELS | HOST_KERNELS:
            t.may_cache = True
            t.cached_need = min(t.cached_need, sum(fast))
            t.cached_host = min(t.cached_host, sum(sh.storage.ddr for sh in so.shards))
        else:
            t.need = min(t.need, sum(fast))
            t.smallest_shard = min(t.smallest_shard, max(fast))
        t.splittable |= len(so.shards) > 1 and so.sharding_type != "data_parallel"
    return sorted(tables.values(), key=lambda t: -t.need)


def _gb(num_bytes: float) -> str:
    return f"{num_bytes / GiB:,.1f} GiB" if num_bytes >= GiB / 10 else f"{num_bytes / 2**20:,.1f} MiB"


def explain_no_fit(module: nn.Module, planner: EmbeddingShardingPlanner, sharders: list[ModuleSharder[nn.Module]],
                   cluster: Cluster, error: PlannerError) -> str:
    """One line for a plan that does not fit: the table that decides it and what would make it fit.

    TorchRec's own message is twenty lines of global totals that name no table; this one is computed from the
    same inputs (each table's placements the planner may choose, with optimizer state and buffers, and each
    rank's capacity after the planner's reservations) and names the way out: more hosts, UVM caching of the
    largest table, or a smaller dim for it.
    """
    where = f"{cluster.hosts} host(s) x {cluster.gpus_per_host} {'GPUs' if cluster.device == 'cuda' else 'ranks'}"
    tier = "HBM" if cluster.device == "cuda" else "memory"
    fast, host = _capacity(planner, cluster)
    dense, inputs = _reserved(planner, cluster)
    if fast <= 0:
        cap = cluster.hbm_bytes if cluster.device == "cuda" else host
        return (f"no sharding plan fits {where}: before any table, the planner reserves {_gb(dense)} per rank for "
                f"the dense tower (6x its parameters' bytes), {_gb(inputs)} for input batches and "
                f"{_gb(_margin(cluster))} of margin, of {_gb(cap)}: use devices with more memory, a smaller tower "
                f"or a smaller data.batch_size_per_rank")
    tables = _tables(planner, module, sharders, cluster)
    for t in tables:
        if not t.splittable and t.smallest_shard > fast and not (t.cached_need <= fast and t.cached_host <= host):
            return (f"no sharding plan fits {where}: table {t.name!r} ({t.rows:,} x {t.dim}) needs "
                    f"{_gb(t.smallest_shard)} on one rank (with optimizer state and buffers) and may only sit whole "
                    f"on one (embeddings.sharding.{t.name}), which has {_gb(fast)} of {tier} for tables: allow "
                    f"row_wise or table_row_wise for it")
    total_fast, total_host = fast * cluster.world_size, host * cluster.world_size
    need = sum(t.need for t in tables)  # every table in HBM
    largest = tables[0]
    if need <= total_fast:
        first = str(error).strip().splitlines()[0]
        return (f"no sharding plan fits {where} although the tables' {_gb(need)} fit the {_gb(total_fast)} of {tier} "
                f"left for them in all: no placement fits each rank's {_gb(fast)} (largest table {largest.name!r}, "
                f"{largest.rows:,} x {largest.dim}, its smallest shard {_gb(largest.smallest_shard)}); use more "
                f"hosts or loosen embeddings.sharding; TorchRec: {first}")
    ways = [f">= {math.ceil(need / (fast * cluster.gpus_per_host))} hosts"]
    if cluster.device == "cuda" and not largest.may_cache:
        ways.append(f"UVM caching for {largest.name!r} (--set 'embeddings.sharding.{largest.name}="
                    f"{{compute_kernels=[\"fused_uvm_caching\"]}}': {UVM_CACHING_RATIO:.0%} of its rows in HBM, all "
                    f"of them in host memory)")
    cached = [t for t in tables if t.may_cache]
    if cached and sum(t.cached_host for t in cached) > total_host:
        ways.append(f"more host memory for UVM caching ({_gb(sum(t.cached_host for t in cached))} for "
                    f"{', '.join(repr(t.name) for t in cached[:3])}{', ...' if len(cached) > 3 else ''}; the hosts "
                    f"have {_gb(total_host)})")
    dim = 4 * math.floor(largest.dim * (1 - (need - total_fast) / largest.need) / 4)  # fbgemm: dims of 4k
    if 0 < dim < largest.dim:
        ways.append(f"{largest.name!r} at dim {dim}")
    return (f"no sharding plan fits {where}: the tables need {_gb(need)} of {tier} with their optimizer state and "
            f"the planner's buffers (largest {largest.name!r}: {largest.rows:,} x {largest.dim}, {_gb(largest.need)})"
            f" and the ranks have {_gb(total_fast)} for them after the planner's reservations ({_gb(fast)} each); "
            f"to fit: " + ", or ".join(ways))
