"""A run config planned for a cluster this machine is not: `hyrank plan`.

    cluster = Cluster(hosts=8, gpus_per_host=8, hbm_bytes=80 * GiB, host_bytes=1024 * GiB)
    plan = plan_run(cfg, cluster, dense_tflops=300)       # seconds, no GPU: the model is built on the meta device
    print(format_plan(plan))

The sparse side is TorchRec's planner with exactly the inputs `shard_model` gives it in a run (the sharders for the
device, embeddings.sharding's constraints, the ids per sample of every table, the fused optimizer, the batch per
rank), for the stated topology instead of the running one. The dense side is ours: the tower's parameters and
training FLOPs counted on meta (models/accounting.py) at an achievable FLOP/s the caller states, its weights,
gradients and optimizer state per rank, and an estimate of its gradient allreduce, which the planner leaves out.
The activations a batch keeps for the backward are counted on meta too; the planner keeps only a 15% margin for
them, so the plan says when they take a rank over its memory.
"""

from __future__ import annotations

import logging
import textwrap
import warnings
from dataclasses import dataclass

import torch

from hyrank.embeddings.managed import remap_bytes_per_rank
from hyrank.embeddings.planning import RESERVED_SHARE, GiB, Cluster, PlanReport, RankLoad, plan_cluster
from hyrank.embeddings.sharding import SparseOptimizer, apply_sparse_optimizer, make_sharders
from hyrank.pipeline.config import RunConfig
from hyrank.pipeline.train.model import table_constraints

# TorchRec's planner defaults (torchrec/distributed/planner/constants.py), used for the dense allreduce estimate so
# that it rests on the same network as the planner's all-to-all estimates
INTRA_HOST_BYTES_PER_S = 600 * GiB  # NVLink / NVSwitch, per GPU
INTER_HOST_BYTES_PER_S = 12.5 * GiB  # one 100 Gb/s NIC per GPU
# bytes per dense parameter on every rank: fp32 weights and gradients, plus the dense optimizer's state
DENSE_OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "sgd": 0}


@dataclass(frozen=True)
class DenseSide:
    model: str
    params: int
    train_flops_per_sample: float
    batch_size_per_rank: int
    tflops: float  # achievable dense FLOP/s per device, x 1e12, as stated by the caller
    bytes_per_rank: int  # weights + gradients + optimizer state
    activation_bytes: int  # what one batch's forward keeps for the backward (models/accounting.activation_bytes)
    allreduce_bytes: int  # gradient bytes each step reduces (bf16 with train.allreduce_compression = "bf16")
    allreduce_ms: float
    allreduce_mode: str  # train.allreduce: "async" overlaps it with the next step

    @property
    def compute_ms(self) -> float:
        return self.train_flops_per_sample * self.batch_size_per_rank / (self.tflops * 1e12) * 1e3


@dataclass(frozen=True)
class RunPlanReport:
    config_name: str
    sparse: PlanReport
    dense: DenseSide
    ids_per_sample: float  # ids a sample sends to sharded (not data-parallel) tables: the input all-to-all's load
    remap_bytes: int = 0  # per rank: the managed tables' id remaps, which the planner does not count

    @property
    def ids_all_to_all_ms(self) -> float:
        """Our estimate of one rank's input all-to-all: its batch's int64 ids, all but 1/world of them to other
        ranks, over NVLink within a host or the GPU's NIC across hosts."""
        c = self.sparse.cluster
        if c.world_size == 1:
            return 0.0
        num_bytes = self.ids_per_sample * self.dense.batch_size_per_rank * 8 * (c.world_size - 1) / c.world_size
        return num_bytes / (INTER_HOST_BYTES_PER_S if c.hosts > 1 else INTRA_HOST_BYTES_PER_S) * 1e3

    @property
    def step_ms(self) -> float:
        """The critical rank's embedding lookup and communication (TorchRec's rating of it) plus the dense
        compute, with no overlap between them: the step of the planner's model, as an upper bound."""
        return self.sparse.critical_rank.planner_ms + self.dense.compute_ms


def build_meta_model(cfg: RunConfig, device: torch.device, world_size: int = 1):
    """The run's RankingModel on the meta device with its fused sparse optimizer attached: nothing is allocated,
    whatever the tables' size; `world_size`: the ranks its managed tables' id space is cut for."""
    from hyrank.models import build_model
    from hyrank.pipeline.ranker import RankingModel

    with torch.device("meta"):
        tower = build_model(cfg.model.name, cfg.model.config, cfg.features.input_shape())
    model = RankingModel(cfg.features, tower, sparse_device=torch.device("meta"), dedup=cfg.embeddings.dedup,
                         init_scale=cfg.embeddings.init_scale, world_size=world_size)
    e = cfg.embeddings
    apply_sparse_optimizer(model, SparseOptimizer(e.optimizer, e.lr, e.eps, e.weight_decay), device)
    return model


def plan_run(cfg: RunConfig, cluster: Cluster, *, dense_tflops: float) -> RunPlanReport:
    """Plan `cfg` for `cluster` as a run would be sharded there, and cost its dense side."""
    from hyrank.models import build_model
    from hyrank.models.accounting import activation_bytes, model_cost

    if not dense_tflops > 0:
        raise ValueError(f"dense_tflops must be > 0, got {dense_tflops}")
    device = torch.device(cluster.device)  # a device object only: no CUDA call is made
    model = build_meta_model(cfg, device, cluster.world_size)
    constraints = table_constraints(cfg, model)
    with _quiet_torchrec():
        sparse = plan_cluster(model, sharders=make_sharders(device), cluster=cluster,
                              batch_size_per_rank=cfg.data.batch_size_per_rank, constraints=constraints)
    replicated = {t.name for t in sparse.tables if t.sharding_type == "data_parallel"}
    ids = sum(sum(c.pooling_factors) for table, c in constraints.items() if table not in replicated)
    shape = cfg.features.input_shape()
    cost = model_cost(cfg.model.name, cfg.model.options, shape)
    with torch.device("meta"):
        tower = build_model(cfg.model.name, cfg.model.config, shape)
    t = cfg.train
    grad_bytes = cost.params * (2 if t.allreduce_compression == "bf16" else 4)
    dense = DenseSide(model=cfg.model.name, params=cost.params, train_flops_per_sample=cost.train_flops_per_sample,
                      batch_size_per_rank=cfg.data.batch_size_per_rank, tflops=dense_tflops,
                      bytes_per_rank=cost.params * (8 + DENSE_OPTIMIZER_STATE_BYTES[t.dense_optimizer]),
                      activation_bytes=activation_bytes(tower, shape, batch_size=cfg.data.batch_size_per_rank),
                      allreduce_bytes=grad_bytes, allreduce_ms=allreduce_ms(grad_bytes, cluster),
                      allreduce_mode=t.allreduce)
    remap = remap_bytes_per_rank(cfg.features.tables, cluster.world_size)
    return RunPlanReport(config_name=cfg.name, sparse=sparse, dense=dense, ids_per_sample=ids, remap_bytes=remap)


def allreduce_ms(num_bytes: int, cluster: Cluster) -> float:
    """A hierarchical ring allreduce: reduce-scatter and all-gather inside each host over NVLink, and each GPU's
    1/gpus_per_host share across hosts over its own NIC. Bandwidth terms only (no latency); 0 on CPU ranks."""
    if cluster.device != "cuda":
        return 0.0
    g, h = cluster.gpus_per_host, cluster.hosts
    intra = 2 * (g - 1) / g * num_bytes / INTRA_HOST_BYTES_PER_S
    inter = 2 * (h - 1) / h * (num_bytes / g) / INTER_HOST_BYTES_PER_S
    return (intra + inter) * 1e3


class _quiet_torchrec:
    """TorchRec's planner logs a page of warnings for every plan made away from its hardware (the topology not
    made by its factory, the dense-size estimate on meta, data-parallel tables without a sharding spec, through
    the root logger), none about the plan, and logs its own no-plan error in full before raising it, which
    plan_cluster turns into one line."""

    def __enter__(self):
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        logging.disable(logging.ERROR)

    def __exit__(self, *exc):
        logging.disable(logging.NOTSET)
        self._warnings.__exit__(*exc)


# -- printing ------------------------------------------------------------------------------------------------------


def _unit(report: RunPlanReport) -> tuple[str, int]:
    """GiB for a plan whose tables hold 10 GiB or more, MiB for the small ones."""
    total = sum(t.table_bytes + t.optimizer_bytes for t in report.sparse.tables) + report.dense.bytes_per_rank
    return ("GiB", GiB) if total >= 10 * GiB else ("MiB", 2**20)


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _ranks(ranks: tuple[int, ...] | list[int]) -> str:
    """0-7,16-23 for a set of ranks."""
    spans, ranks = [], sorted(ranks)
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def format_plan(report: RunPlanReport, *, all_ranks: bool = False) -> str:
    s, d, c = report.sparse, report.dense, report.sparse.cluster
    unit, size = _unit(report)

    def _g(num_bytes: float) -> str:
        return f"{num_bytes / size:.2f}"
    kind = "GPUs" if c.device == "cuda" else "CPU ranks"
    lines = [f"{report.config_name}: {c.hosts} host(s) x {c.gpus_per_host} {kind} = {c.world_size} ranks; "
             + (f"{c.hbm_bytes / GiB:g} GiB HBM per GPU, " if c.device == "cuda" else "")
             + f"{c.host_bytes / GiB:g} GiB host memory per host; batch {d.batch_size_per_rank} per rank",
             f"TorchRec's EmbeddingShardingPlanner: {s.num_proposals} proposals in {s.seconds:.1f} s", "",
             "tables (bytes of the whole table; a data_parallel table is replicated on every rank)"]
    rows = [("table", "module", "rows", "dim", "sharding", "kernel", "ranks", f"weights {unit}", f"optimizer {unit}")]
    for t in s.tables:
        kernel = t.compute_kernel + (f" ({t.cache_load_factor:.0%} cached)" if t.cache_load_factor else "")
        rows.append((t.name, t.module, f"{t.rows:,}", t.dim, t.sharding_type, kernel, _ranks(t.ranks),
                     _g(t.table_bytes), _g(t.optimizer_bytes)))
    rows.append(("total", "", f"{sum(t.rows for t in s.tables):,}", "", "", "", "",
                 _g(sum(t.table_bytes for t in s.tables)), _g(sum(t.optimizer_bytes for t in s.tables))))
    lines += _table(rows) + ["", *_memory_lines(report, all_ranks=all_ranks), "", *_time_lines(report)]
    return "\n".join(_wrap(line) for line in lines)


def _wrap(line: str, width: int = 120) -> str:
    """Prose at `width` columns; table rows (no run of words longer than a column gap) stay whole. A step line's
    continuation aligns under its description."""
    if len(line) <= width or "  " in line.strip() and not line.startswith("  "):
        return line
    indent = " " * 32 if line.startswith("  ") else "  "
    return textwrap.fill(line, width=width, subsequent_indent=indent, break_on_hyphens=False)


def _memory_lines(report: RunPlanReport, *, all_ranks: bool) -> list[str]:
    s, d, c = report.sparse, report.dense, report.sparse.cluster
    unit, size = _unit(report)

    def _g(num_bytes: float) -> str:
        return f"{num_bytes / size:.2f}"

    fast = "HBM" if c.device == "cuda" else "memory"
    reserved = s.reserved_dense_bytes + s.reserved_input_bytes + s.reserved_margin_bytes
    lines = [f"memory per rank, {unit} ({fast}: tables, their fused optimizer state, UVM cache, the planner's input/"
             f"output buffer estimate, the dense tower's weights + gradients + optimizer state, and the activations "
             f"its forward keeps for the backward at batch {d.batch_size_per_rank})"]
    cap = c.hbm_bytes if c.device == "cuda" else c.host_bytes // c.gpus_per_host
    header = ("ranks", f"{fast} tables", "optimizer", "cache", "io", "dense", "activations", f"{fast} total",
              "planner's view")
    header += ("host tables+opt",) if c.device == "cuda" else ()
    rows, previous = [header], None

    def row_of(load: RankLoad) -> tuple:
        m = load.hbm if c.device == "cuda" else load.host
        total = m.tables + m.optimizer + m.cache + m.io + d.bytes_per_rank + d.activation_bytes
        view = f"{_g(m.planner + reserved)} / {_g(cap)}"
        extra = (_g(load.host.tables + load.host.optimizer),) if c.device == "cuda" else ()
        return (_g(m.tables), _g(m.optimizer), _g(m.cache), _g(m.io), _g(d.bytes_per_rank), _g(d.activation_bytes),
                _g(total), view) + extra

    groups: list[list] = []
    for load in s.ranks:
        values = row_of(load)
        if values == previous and not all_ranks:
            groups[-1][0].append(load.rank)
        else:
            groups.append([[load.rank], values])
        previous = values
    rows += [(_ranks(ranks), *values) for ranks, values in groups]
    lines += _table(rows)
    lines.append(f"planner's view = what it placed + what it reserves before placing: {_g(s.reserved_dense_bytes)} "
                 f"dense (6x the tower's parameter bytes), {_g(s.reserved_input_bytes)} input batches, "
                 f"{_g(s.reserved_margin_bytes)} margin; activations: saved tensors counted on meta, fp32, attention "
                 f"weights included (a fused attention kernel keeps less)")
    if report.remap_bytes:
        lines.append(f"managed tables' id remaps: {_g(report.remap_bytes)} {unit} per rank on top (3 int64 a slot)")
    worst = max(report.sparse.ranks, key=lambda r: (r.hbm if c.device == "cuda" else r.host).planner)
    m = worst.hbm if c.device == "cuda" else worst.host
    peak = m.tables + m.optimizer + m.cache + m.io + d.bytes_per_rank + d.activation_bytes + report.remap_bytes
    if peak > cap:
        lines.append(f"over the cap: rank {worst.rank} needs {_g(peak)} of {_g(cap)} {unit} with the activations, "
                     f"which the planner does not count (it keeps {RESERVED_SHARE:.0%} margin); a smaller "
                     f"data.batch_size_per_rank, bf16 activations or activation checkpointing would bring it under")
    return lines


def _flops(flops: float) -> str:
    for scale, name in ((1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs")):
        if flops >= scale:
            return f"{flops / scale:.2f} {name}"
    return f"{flops:,.0f} FLOPs"


def _time_lines(report: RunPlanReport) -> list[str]:
    s, d, c = report.sparse, report.dense, report.sparse.cluster
    r = s.critical_rank
    bw = INTER_HOST_BYTES_PER_S if c.hosts > 1 else INTRA_HOST_BYTES_PER_S
    lines = [f"dense tower {d.model}: {d.params:,} parameters, {_flops(d.train_flops_per_sample)} per sample "
             f"(forward + backward; {_flops(d.train_flops_per_sample * d.batch_size_per_rank)} per batch of "
             f"{d.batch_size_per_rank})",
             f"estimated step, ms (rank {r.rank}, the one TorchRec's planner rates slowest; no overlap assumed):",
             f"  embedding lookup  {r.lookup_ms:9.2f}   forward + backward of its shards (planner)",
             f"  communication     {r.comms_ms:9.2f}   output all-to-all / reduce-scatter, forward + backward "
             f"(planner)",
             f"  dense compute     {d.compute_ms:9.2f}   {_flops(d.train_flops_per_sample)} x "
             f"{d.batch_size_per_rank} at {d.tflops:g} TFLOP/s (--dense-tflops)",
             f"  total             {report.step_ms:9.2f}",
             f"  ids all-to-all    {report.ids_all_to_all_ms:9.2f}   the next batch's {report.ids_per_sample:,.0f} ids "
             f"per sample to their shards (ours: int64 at {bw / GiB:g} GiB/s; the planner charges "
             f"{r.input_dist_ms:.2f}, batch x world size x 8 bytes per shard, and leaves it out of its rating: "
             f"TrainPipelineSparseDist overlaps it with this step, which it stalls if longer)"]
    if c.device == "cuda" and c.world_size > 1:
        hidden = ("overlapped with the next step (train.allreduce = \"async\")" if d.allreduce_mode == "async"
                  else "on the step's critical path (train.allreduce = \"sync\")")
        lines.append(f"  dense allreduce   {d.allreduce_ms:9.2f}   {d.allreduce_bytes / 2**20:,.1f} MiB of gradients, "
                     f"hierarchical ring at {INTRA_HOST_BYTES_PER_S / GiB:g} GiB/s in a host and "
                     f"{INTER_HOST_BYTES_PER_S / GiB:g} GiB/s per GPU across hosts (ours, not the planner's); "
                     + hidden)
    return lines
