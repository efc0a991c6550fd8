"""Benchmark: hyrank's training step against TorchRec's own DLRM / DLRMTrain with TrainPipelineSparseDist.

    hyrank bench torchrec                       # 26 tables of 100k x 64, 13 dense, batch 512, 2 gloo ranks
    hyrank bench torchrec --rows 100000 --steps 60 --rounds 3 --json torchrec.json
    hyrank bench torchrec --rounds 1 --profile 40   # then 40 steps each, taking turns: where the time differs

One model, two pipelines, identical batches. The model is the DLRM paper's (bottom MLP 13 -> 512 -> 256 -> 64,
pairwise dot products of the 27 vectors, top MLP 415 -> 512 -> 512 -> 256 -> 1); hyrank runs it as `dlrm_mlp` with
`interaction = "dot"` (models/dlrm.py; same arithmetic as TorchRec's DLRM, tests/test_bench_torchrec.py), TorchRec
as `DLRMTrain(DLRM(EmbeddingBagCollection))`, sharded by TorchRec's own planner and sharders, the tables' fused
RowWiseAdagrad applied in backward (`apply_optimizer_in_backward`), AdamW on the dense part, stepped through
`TrainPipelineSparseDist`: the recipe of TorchRec's DLRM example. hyrank: `Trainer` with its planner, DenseSync
and the config's loop (`train.pipeline`, plain by default). Same optimizers and learning rates on both sides;
hyrank's dense AdamW runs fused (pipeline/train/model.py), TorchRec's as its example builds it (the per-parameter
loop), unless `--torchrec-fused-adamw` gives TorchRec the fused one too.

Two settings, each side taking turns within a round (`--rounds`; the best round of each is kept):
  in memory     every rank first reads its share of the day into a list of hyrank Batches; each side then trains on
                that list (TorchRec gets `torchrec.datasets.utils.Batch(dense, the same KJT, labels)`), timed after
                `--warmup` steps. Goal: hyrank >= 1.0x TorchRec's rows/s.
  from Parquet  each side trains the whole day read by hyrank's DayReader (the reader TorchRec would otherwise not
                have: its own examples read Criteo .npy files): hyrank's `Trainer.run`, and TorchRec's pipeline fed
                by the same reader's batches. Goal: >= 0.9x.
`--profile STEPS` then lets both sides take turns step by step on the in-memory batches (which goes first
alternates), so a busy machine slows both alike: ms per step of each, unprofiled and under torch.profiler, and the
operators whose self CPU time per step differs most between them. The `... wait()` operators are where a rank
waits for its peer: that is where rank skew lands, in each side's first collective of a step.
The generated day: 26 id columns drawn from a heavy-tailed law over 100k ids, 13 log-normal dense columns, a label
that depends on a few of them; `--rows` rows (default: what `--steps` steps of every rank take).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

NUM_TABLES, NUM_ROWS, DIM, NUM_DENSE = 26, 100_000, 64, 13
BOTTOM, TOP = [512, 256, DIM], [512, 512, 256]
DAY = "2026-01-01"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=512, help="rows per rank and step")
    p.add_argument("--num-embeddings", type=int, default=NUM_ROWS, help="rows of each of the 26 tables")
    p.add_argument("--nproc", type=int, default=2, help="local gloo ranks")
    p.add_argument("--steps", type=int, default=40, help="timed in-memory steps per side and round")
    p.add_argument("--warmup", type=int, default=5, help="untimed in-memory steps first")
    p.add_argument("--rows", type=int, default=0, help="rows of the generated day (0: (warmup + steps) batches of "
                                                        "every rank)")
    p.add_argument("--rounds", type=int, default=2, help="turns of every measurement; the best is kept")
    p.add_argument("--lr", type=float, default=1e-3, help="dense AdamW learning rate (both sides)")
    p.add_argument("--sparse-lr", type=float, default=0.05, help="fused RowWiseAdagrad learning rate (both sides)")
    p.add_argument("--torchrec-fused-adamw", action="store_true",
                   help="give TorchRec's side hyrank's fused AdamW too (its example's default is AdamW's "
                        "per-parameter loop): the pipelines alone, same optimizer kernels")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override of hyrank's side, e.g. train.pipeline=\"sparse_dist\" or data.num_workers=2")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after the rounds, STEPS in-memory steps of both sides taking turns: ms per step of each "
                        "(unprofiled, then under torch.profiler) and the operators whose self CPU time differs most")
    p.add_argument("--json", type=Path, default=None, help="also write the record here")


def write_day(root: Path, rows: int, num_embeddings: int = NUM_ROWS, seed: int = 0) -> Path:
    """One day of the benchmark's logs: c0..c25 (int64 ids), i0..i12 (float), click (0/1)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    cols = {f"c{i}": (rng.pareto(1.1, rows) * 50).astype(np.int64) % num_embeddings for i in range(NUM_TABLES)}
    cols |= {f"i{i}": rng.lognormal(0.0, 1.0, rows).astype(np.float32) for i in range(NUM_DENSE)}
    logit = -1.5 + 0.8 * np.log1p(cols["i0"]) - 0.5 * (cols["c0"] % 7 == 0) + 0.7 * (cols["c1"] < 20)
    cols["click"] = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    day = root / f"day={DAY}"
    day.mkdir(parents=True)
    pq.write_table(pa.table(cols), day / "part-00000.parquet", row_group_size=16384)
    (day / "_SUCCESS").touch()
    return root


def config_text(root: Path, out_dir: Path, batch_size: int, lr: float, sparse_lr: float,
                num_embeddings: int = NUM_ROWS) -> str:
    """hyrank's run config of the benchmark model (TOML)."""
    tables = ",\n  ".join(f'{{ name = "t{i}", num_embeddings = {num_embeddings}, dim = {DIM} }}'
                            for i in range(NUM_TABLES))
    sparse = ",\n  ".join(f'{{ name = "c{i}", table = "t{i}" }}' for i in range(NUM_TABLES))
    dense = ", ".join(f'{{ name = "i{i}", norm = "log1p" }}' for i in range(NUM_DENSE))
    members = ", ".join(f'"c{i}"' for i in range(NUM_TABLES))
    return f"""name = "bench-torchrec"
seed = 0
out_dir = "{out_dir}"

[data]
root = "{root}"
batch_size_per_rank = {batch_size}

[model]
name = "dlrm_mlp"
options = {{ interaction = "dot", bottom = {BOTTOM}, hidden = {TOP} }}

[embeddings]
optimizer = "rowwise_adagrad"
lr = {sparse_lr}

[train]
dense_optimizer = "adamw"
lr = {lr}
weight_decay = 0.0
lr_schedule = "constant"
tensorboard = false

[checkpoint]
at_day_end = false

[features]
label = "click"
tables = [
  {tables},
]
sparse = [
  {sparse},
]
dense = [{dense}]

[features.blocks]
sparse = [{members}]
"""


def torchrec_dlrm(world_size: int, batch_size: int, lr: float, sparse_lr: float, num_embeddings: int = NUM_ROWS,
                  fused_adamw: bool = False):
    """TorchRec's DLRMTrain, planned, sharded and optimised the way its DLRM example does it; returns the DMP
    model and the optimizer to hand TrainPipelineSparseDist."""
    import torch
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import ShardingEnv
    from torchrec.models.dlrm import DLRM, DLRMTrain
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=num_embeddings,
                                 feature_names=[f"c{i}"]) for i in range(NUM_TABLES)]
    model = DLRMTrain(DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=tables, device=torch.device("meta")),
                           dense_in_features=NUM_DENSE, dense_arch_layer_sizes=BOTTOM,
                           over_arch_layer_sizes=[*TOP, 1]))
    apply_optimizer_in_backward(RowWiseAdagrad, model.model.sparse_arch.parameters(), {"lr": sparse_lr, "eps": 1e-8})
    topology = Topology(world_size=world_size, compute_device="cpu", local_world_size=world_size)
    # hyrank's planner also keeps these tables whole (fused kernel, table_wise on CPU); say so to TorchRec's too
    constraints = {f"t{i}": ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"])
                   for i in range(NUM_TABLES)}
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=constraints)
    plan = planner.collective_plan(model, pg=dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=model, device=torch.device("cpu"), plan=plan,
                                   env=ShardingEnv.from_process_group(dist.GroupMember.WORLD))
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0,
                                                                   fused=fused_adamw or None))
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])


def torchrec_batch(b):
    from torchrec.datasets.utils import Batch as TorchRecBatch

    return TorchRecBatch(dense_features=b.dense, sparse_features=b.pooled, labels=b.labels)


def _torchrec_pipeline(world_size: int, args: dict):
    """TorchRec's side: its DLRMTrain stepped by TrainPipelineSparseDist."""
    import torch
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    dmp, opt = torchrec_dlrm(world_size, args["batch_size"], args["lr"], args["sparse_lr"], args["num_embeddings"],
                             args["torchrec_fused_adamw"])
    return TrainPipelineSparseDist(dmp, opt, torch.device("cpu"))


def _hyrank_trainer(cfg):
    """hyrank's side: a Trainer of the benchmark config on the current process group, in training mode."""
    from hyrank.pipeline.distributed.env import env_of_current_group
    from hyrank.pipeline.train.trainer import Trainer

    trainer = Trainer(cfg, env_of_current_group())
    trainer.model.train()
    return trainer


def _torchrec_rows_per_s(batches, world_size: int, args: dict, warmup: int) -> tuple[float, int]:
    """TorchRec's pipeline over `batches` (an iterable of hyrank Batches); rows/s after `warmup` steps."""
    pipe = _torchrec_pipeline(world_size, args)
    it = (torchrec_batch(b) for b in batches)
    steps, start = 0, time.perf_counter()
    while True:
        if steps == warmup:
            start = time.perf_counter()
        try:
            pipe.progress(it)
        except StopIteration:
            break
        steps += 1
    return (steps - warmup) * args["batch_size"] / (time.perf_counter() - start), steps


def _hyrank_in_memory(cfg, batches, warmup: int) -> float:
    from hyrank.pipeline.train.pipelined import InputClock

    trainer = _hyrank_trainer(cfg)
    start = time.perf_counter()
    for step, _ in enumerate(trainer.steps(InputClock(batches))):
        if step + 1 == warmup:
            start = time.perf_counter()
    trainer.dense.flush()
    rows_per_s = (len(batches) - warmup) * cfg.data.batch_size_per_rank / (time.perf_counter() - start)
    trainer.close()
    return rows_per_s


def _hyrank_from_parquet(cfg) -> float:
    from hyrank.pipeline.data.days import discover_days
    from hyrank.pipeline.distributed.env import env_of_current_group
    from hyrank.pipeline.train.trainer import RunPlan, Trainer

    trainer = Trainer(cfg, env_of_current_group())
    stats = trainer.run(RunPlan(train_days=discover_days(cfg.data.root))).trained[0]
    trainer.close()
    return stats.rows / stats.seconds / trainer.env.world_size  # per rank, like the other lines


_TURN_STEPS = 10  # steps of one side before the other's turn: TorchRec's pipeline has the next batch's input
# all-to-all in flight between its steps, and gloo finishes it in the background while hyrank's steps run, so
# turns of one step would hand TorchRec that overlap for free; turns of 10 give it to one step in 10


def _interleaved(cfg, batches, world_size: int, args: dict, steps: int) -> dict:
    """hyrank's plain step and TorchRec's pipeline step taking turns of _TURN_STEPS steps on the same batches
    (which side goes first alternates), so a busy machine slows both alike: ms per step of each over `steps`
    steps unprofiled, then `steps` more under one short torch.profiler profile a step, with each operator's self
    CPU ms per step on each side."""
    import collections
    import contextlib
    import itertools

    import torch

    trainer = _hyrank_trainer(cfg)
    pipe = _torchrec_pipeline(world_size, args)
    hyrank_batches = itertools.cycle(batches)
    torchrec_batches = (torchrec_batch(b) for b in itertools.cycle(batches))
    sides = {"hyrank": lambda: trainer.train_step(next(hyrank_batches).to(trainer.env.device)),
             "torchrec": lambda: pipe.progress(torchrec_batches)}
    warmup, total = args["warmup"], args["warmup"] + 2 * steps
    wall = {phase: dict.fromkeys(sides, 0.0) for phase in ("plain", "profiled")}
    ops: dict[str, collections.Counter] = {side: collections.Counter() for side in sides}
    for turn, first in enumerate(range(0, total, _TURN_STEPS)):
        for side in (sorted(sides) if turn % 2 else sorted(sides, reverse=True)):
            for i in range(first, min(first + _TURN_STEPS, total)):
                phase = "plain" if i < warmup + steps else "profiled"
                with (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if phase == "profiled"
                      else contextlib.nullcontext()) as prof:
                    start = time.perf_counter()
                    sides[side]()
                    elapsed = time.perf_counter() - start
                if i >= warmup:
                    wall[phase][side] += elapsed
                if prof is not None:
                    for event in prof.key_averages():
                        ops[side][event.key] += event.self_cpu_time_total / 1e3
    trainer.dense.flush()
    trainer.close()
    return {"ms_per_step": {phase: {side: 1e3 * t / steps for side, t in w.items()} for phase, w in wall.items()},
            "self_ms_per_step": {side: {k: v / steps for k, v in c.items()} for side, c in ops.items()}}


def _print_interleaved(prof: dict, steps: int, top: int = 20) -> None:
    ms, self_ms = prof["ms_per_step"], prof["self_ms_per_step"]
    print(f"\ninterleaved, {steps} steps each (rank 0): ms per step  hyrank / TorchRec")
    for phase, w in ms.items():
        print(f"  {phase:<9}{w['hyrank']:>9.2f} /{w['torchrec']:>7.2f}   ratio of rows/s "
              f"{w['torchrec'] / w['hyrank']:.3f}")
    h, t = self_ms["hyrank"], self_ms["torchrec"]
    keys = sorted(set(h) | set(t), key=lambda k: -abs(h.get(k, 0.0) - t.get(k, 0.0)))[:top]
    print(f"operators whose self CPU time differs most (ms per step; total {sum(h.values()):.2f} / "
          f"{sum(t.values()):.2f})")
    print(f"  {'operator':<60}{'hyrank':>9}{'TorchRec':>10}{'diff':>8}")
    for k in keys:
        print(f"  {k[:60]:<60}{h.get(k, 0.0):>9.2f}{t.get(k, 0.0):>10.2f}{h.get(k, 0.0) - t.get(k, 0.0):>+8.2f}")


def _worker(rank: int, world_size: int, cfg, args: dict) -> dict:
    import torch.distributed as dist

    from hyrank.pipeline.data.days import discover_days
    from hyrank.pipeline.data.reader import DayReader

    day = discover_days(cfg.data.root)[0]

    def reader() -> DayReader:
        return DayReader(day, cfg.features, batch_size=cfg.data.batch_size_per_rank, rank=rank,
                         world_size=world_size, seed=cfg.seed, options=cfg.data)

    in_memory = list(reader())[: args["warmup"] + args["steps"]]
    best = {"hyrank in memory": 0.0, "torchrec in memory": 0.0, "hyrank from parquet": 0.0,
            "torchrec from parquet": 0.0}
    rounds: dict[str, list[float]] = {name: [] for name in best}
    for _ in range(args["rounds"]):
        runs = {"hyrank in memory": lambda: _hyrank_in_memory(cfg, in_memory, args["warmup"]),
                "torchrec in memory": lambda: _torchrec_rows_per_s(in_memory, world_size, args, args["warmup"])[0],
                "hyrank from parquet": lambda: _hyrank_from_parquet(cfg),
                "torchrec from parquet": lambda: _torchrec_rows_per_s(reader(), world_size, args, 0)[0]}
        for name, fn in runs.items():
            dist.barrier()
            rate = fn()
            every = [0.0] * world_size
            dist.all_gather_object(every, rate)
            best[name] = max(best[name], min(every) * world_size)  # the slowest rank sets the pace
            rounds[name].append(min(every) * world_size)
    if args["profile"]:
        return {"best": best, "rounds": rounds,
                "interleaved": _interleaved(cfg, in_memory, world_size, args, args["profile"])}
    return {"best": best, "rounds": rounds}


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from hyrank.pipeline.config import load_config
    from hyrank.pipeline.distributed.local import run_local

    rows = args.rows or (args.warmup + args.steps) * args.batch_size * args.nproc
    if rows < (args.warmup + args.steps) * args.batch_size * args.nproc:
        raise ValueError(f"--rows {rows}: the in-memory setting needs (warmup + steps) x batch x ranks = "
                         f"{(args.warmup + args.steps) * args.batch_size * args.nproc} rows")
    with tempfile.TemporaryDirectory(prefix="hyrank-bench-torchrec-") as tmp:
        root = write_day(Path(tmp) / "data", rows, args.num_embeddings)
        path = Path(tmp) / "bench.toml"
        path.write_text(config_text(root, Path(tmp) / "run", args.batch_size, args.lr, args.sparse_lr,
                                    args.num_embeddings))
        cfg = load_config(path, list(args.overrides))
        spec = {k: getattr(args, k)
                for k in ("batch_size", "steps", "warmup", "rounds", "lr", "sparse_lr", "num_embeddings", "profile",
                          "torchrec_fused_adamw")}
        load_before = os.getloadavg()[0]
        rank0 = run_local(_worker, cfg, spec, world_size=args.nproc, timeout_s=7200)[0]
    best = rank0["best"]
    print(f"{NUM_TABLES} tables of {args.num_embeddings:,} x {DIM}, {NUM_DENSE} dense, "
          f"batch {args.batch_size} per rank, "
          f"{args.nproc} gloo ranks, {rows:,} rows; hyrank loop: {cfg.train.pipeline}; best of {args.rounds} rounds; "
          f"load average {load_before:.2f} -> {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    print(f"{'setting':<14}{'hyrank rows/s':>15}{'torchrec rows/s':>17}{'ratio':>8}{'goal':>7}"
          f"        ratio in each round (the sides run one after the other in a round)")
    ratios, round_ratios = {}, {}
    for setting, goal in (("in memory", 1.0), ("from parquet", 0.9)):
        h, t = best[f"hyrank {setting}"], best[f"torchrec {setting}"]
        ratios[setting] = h / t
        round_ratios[setting] = [a / b for a, b in zip(rank0["rounds"][f"hyrank {setting}"],
                                                       rank0["rounds"][f"torchrec {setting}"])]
        print(f"{setting:<14}{h:>15,.0f}{t:>17,.0f}{h / t:>8.2f}{goal:>7.1f}"
              f"  {'met   ' if h / t >= goal else 'missed'}  {' '.join(f'{r:.2f}' for r in round_ratios[setting])}")
    record = {"bench": "torchrec", "rows": rows, "nproc": args.nproc, "pipeline": cfg.train.pipeline,
              "rows_per_s": best, "ratios": ratios, "round_ratios": round_ratios, "load_before": load_before,
              **spec}
    if "interleaved" in rank0:
        _print_interleaved(rank0["interleaved"], args.profile)
        record["interleaved_ms_per_step"] = rank0["interleaved"]["ms_per_step"]
    print(json.dumps(record))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    return 0
