"""Benchmark: the sharding plan's memory against what CPU ranks hold, and the cost of training as a table grows.

    hyrank bench tables                                     # default.toml as shipped, then item at 1M, 10M, 40M rows
    hyrank bench tables --config jobs/configs/hyformer.toml --sizes ""      # the memory check alone
    hyrank bench tables --table user --sizes 1000000,40000000 --steps 300

Each variant (the config as shipped, then with `--table` at each of `--sizes` rows) runs on `--nproc` gloo ranks
forked from this process:
  predicted  `hyrank plan --device cpu` for 1 host of nproc ranks: per rank its table and optimizer bytes, the
             planner's input/output buffer estimate, and the tower's weights + gradients + optimizer state
  held       the tensor bytes each rank's sharded model holds after shard_model (dmp.held_bytes)
  RSS        each rank's resident memory when it starts (the forked parent: Python, torch, torchrec), after the
             Trainer is built (model sharded, tables initialised), and its peak (VmHWM) once it has trained
  training   `Trainer.run` over one generated day of --steps steps per rank (as `hyrank train`; no checkpoint):
             rows/s over all ranks, and the seconds to build the Trainer (planning, sharding, initialising tables)
Before a variant runs, its predicted bytes over all ranks are checked against the memory the machine has free.
Synthetic ids stay below the data's own vocabulary (5-100k), so a larger table is touched in the same few rows:
the steps measure what a table's size costs by itself, not a wider spread of ids.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

MiB = 2**20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="run config (default: jobs/configs/default.toml)")
    p.add_argument("--table", default="item", help="the table whose rows --sizes sets")
    p.add_argument("--sizes", default="1000000,10000000,40000000",
                   help="comma-separated row counts of --table ('' for the config as shipped only)")
    p.add_argument("--steps", type=int, default=300, help="training steps per rank of each variant")
    p.add_argument("--nproc", type=int, default=2, help="local gloo ranks")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every variant, as for `hyrank train`")
    p.add_argument("--json", type=Path, default=None, help="also write the records here")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _rank(rank: int, world_size: int, cfg) -> dict:
    """Build the Trainer, measure what it holds, train one day; memory and time of this rank."""
    from hyrank.pipeline.data.days import discover_days
    from hyrank.pipeline.distributed.dmp import held_bytes
    from hyrank.pipeline.distributed.env import env_of_current_group
    from hyrank.pipeline.train.trainer import RunPlan, Trainer

    rss_start = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    trainer = Trainer(cfg, env_of_current_group())
    setup_s = time.perf_counter() - start
    held = held_bytes(trainer.sharded)
    rss_built = _status_kib("VmRSS") * 1024
    stats = trainer.run(RunPlan(train_days=[discover_days(cfg.data.root)[0]])).trained[0]
    trainer.close()
    return {"tables": held.tables, "optimizer": held.optimizer, "dense": held.dense, "rss_start": rss_start,
            "rss_built": rss_built, "rss_peak": _status_kib("VmHWM") * 1024, "setup_s": setup_s,
            "rows": stats.rows, "seconds": stats.seconds, "steps": stats.steps}


def _predict(cfg, nproc: int) -> list[dict]:
    from hyrank.embeddings.planning import GiB, Cluster
    from hyrank.pipeline.train.cluster_plan import plan_run

    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    report = plan_run(cfg, Cluster(hosts=1, gpus_per_host=nproc, hbm_bytes=GiB, host_bytes=host, device="cpu"),
                      dense_tflops=1.0)
    return [{"tables": r.host.tables, "optimizer": r.host.optimizer, "io": r.host.io,
             "dense": report.dense.bytes_per_rank} for r in report.sparse.ranks]


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise KeyError("MemAvailable")


def measure(cfg, nproc: int) -> dict | None:
    """One variant: predicted and measured per rank, or None when the prediction does not fit the free memory."""
    from hyrank.pipeline.distributed.local import run_local

    predicted = _predict(cfg, nproc)
    need = sum(p["tables"] + p["optimizer"] + p["io"] + p["dense"] for p in predicted)
    free = _available_bytes()
    if need > 0.7 * free:
        print(f"  skipped: the plan needs {need / MiB:,.0f} MiB over {nproc} ranks, {free / MiB:,.0f} MiB free")
        return None
    ranks = run_local(_rank, cfg, world_size=nproc, timeout_s=3600, pg_timeout_s=600)
    return {"predicted": predicted, "ranks": ranks,
            "rows_per_s": ranks[0]["rows"] / max(r["seconds"] for r in ranks)}


def _generate(root: Path, rows: int) -> None:
    from hyrank.pipeline.data.synth import SynthConfig, generate_logs

    print(f"generating one day of {rows:,} rows ...", flush=True)
    generate_logs(SynthConfig(rows_per_day=rows, num_days=1, rows_per_chunk=8192), root)


def _print_memory(name: str, r: dict) -> None:
    for rank, (p, m) in enumerate(zip(r["predicted"], r["ranks"])):
        planned, held = p["tables"] + p["optimizer"], m["tables"] + m["optimizer"]
        print(f"{name:<22}{rank:>5}{planned / MiB:>12,.1f}{held / MiB:>10,.1f}{held / planned:>8.4f}"
              f"{p['io'] / MiB:>8,.1f}{p['dense'] / MiB:>8,.1f}{m['rss_start'] / MiB:>10,.0f}"
              f"{(m['rss_built'] - m['rss_start']) / MiB:>10,.0f}{m['rss_peak'] / MiB:>10,.0f}")


def run(args: argparse.Namespace) -> int:
    from hyrank.pipeline.config import load_config

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = args.config or Path(__file__).resolve().parents[1] / "jobs" / "configs" / "default.toml"
    sizes = [int(s) for s in args.sizes.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="hyrank-bench-tables-") as tmp:
        base = load_config(config, args.overrides)
        rows = args.steps * args.nproc * base.data.batch_size_per_rank
        _generate(Path(tmp) / "data", rows)
        common = [f'data.root="{Path(tmp) / "data"}"', "train.tensorboard=false", "checkpoint.at_day_end=false",
                  *args.overrides]
        index = [t.name for t in base.features.tables].index(args.table)
        variants = {"as shipped": []} | {f"{args.table} {n:,} rows": [f"features.tables.{index}.num_embeddings={n}"]
                                         for n in sizes}
        load_before = os.getloadavg()[0]
        results = {}
        for name, extra in variants.items():
            cfg = load_config(config, [*common, f'out_dir="{Path(tmp) / "runs" / str(len(results))}"', *extra])
            print(f"{name} ...", flush=True)
            results[name] = measure(cfg, args.nproc)
    ran = {k: v for k, v in results.items() if v is not None}
    print(f"load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores); "
          f"{rows:,} rows, {args.steps} steps per rank, {args.nproc} ranks")
    print(f"{'variant':<22}{'rank':>5}{'planned MiB':>12}{'held MiB':>10}{'ratio':>8}{'io MiB':>8}{'dense':>8}"
          f"{'RSS start':>10}{'+built':>10}{'peak RSS':>10}")
    for name, r in ran.items():
        _print_memory(name, r)
    print("planned/held: tables + fused optimizer state; io: the planner's buffer estimate; dense: weights + "
          "gradients + optimizer state of the tower (MiB; RSS columns MiB, +built = after the Trainer is built)")
    print(f"{'variant':<22}{'rows/s':>10}{'setup s':>9}{'held MiB/rank':>15}{'peak RSS MiB/rank':>19}")
    for name, r in ran.items():
        ranks = r["ranks"]
        print(f"{name:<22}{r['rows_per_s']:>10,.0f}{max(m['setup_s'] for m in ranks):>9.1f}"
              f"{max(m['tables'] + m['optimizer'] for m in ranks) / MiB:>15,.1f}"
              f"{max(m['rss_peak'] for m in ranks) / MiB:>19,.0f}")
    record = {"bench": "tables", "config": str(config), "table": args.table, "steps": args.steps,
              "nproc": args.nproc, "load_before": load_before, "results": results}
    print(json.dumps(record))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    return 0
