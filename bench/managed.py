"""Benchmark: training rows/s with managed tables against plain tables of the same size, same data, same run.

    hyrank bench managed                        # two generated drifting days of 60k rows, 2 gloo ranks, 3 rounds
    hyrank bench managed --rows 20000 --rounds 5 --set data.batch_size_per_rank=256

The data is two days of `hyrank gen-logs --drift` (63-bit user and item ids); both are trained and the second is
timed, when the item table is full and admissions evict (the first day fills it). `managed`: jobs/configs/drift.toml,
whose user and item tables are managed (embeddings/managed.py); `plain`: the same config with those tables plain,
of the same sizes, their ids hashed modulo the table (and colliding). The two take turns `--rounds` times, so that
load from other work on the machine hits both alike. Prints rows/s of each round and the best of each, the ratio of
each round's pair and their median (goal: managed >= 0.7x plain), and for the managed run the share of lookups
that found no slot and the ids admitted and evicted. Checkpoints and evaluation are off: the timed part is the day
loop (the second day of Trainer.run).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="run config with managed tables "
                                                              "(default: jobs/configs/drift.toml)")
    p.add_argument("--rows", type=int, default=60_000, help="rows of each generated drifting day")
    p.add_argument("--nproc", type=int, default=2, help="local gloo ranks")
    p.add_argument("--rounds", type=int, default=3, help="turns of (managed, plain); the best of each is kept")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both runs, as for `hyrank train`")
    p.add_argument("--json", type=Path, default=None, help="also write the record here")


def _train(rank: int, world_size: int, cfg) -> dict:
    from hyrank.pipeline.data.days import discover_days
    from hyrank.pipeline.distributed.env import env_of_current_group
    from hyrank.pipeline.train.trainer import RunPlan, Trainer

    trainer = Trainer(cfg, env_of_current_group())
    stats = trainer.run(RunPlan(train_days=discover_days(cfg.data.root)[:2])).trained[-1]
    trainer.close()
    return {"rows": stats.rows, "seconds": stats.seconds, "managed": stats.managed}


def configs(config: Path, root: Path, tmp: Path, overrides: list[str]) -> dict:
    """{"managed": the config as it is, "plain": its managed tables made plain} on `root`, no checkpoints."""
    from hyrank.pipeline.config import load_config, to_dict, with_values

    managed = load_config(config, [f'data.root="{root}"', f'out_dir="{tmp / "managed"}"', "train.tensorboard=false",
                                   "checkpoint.at_day_end=false", *overrides])
    tables = [{k: v for k, v in t.items() if k != "managed"} for t in to_dict(managed)["features"]["tables"]]
    plain = with_values(managed, {"features.tables": tables, "out_dir": str(tmp / "plain")})
    return {"managed": managed, "plain": plain}


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from hyrank.pipeline.data.synth import SynthConfig, generate_logs
    from hyrank.pipeline.distributed.local import run_local

    config = args.config or Path(__file__).resolve().parents[1] / "jobs" / "configs" / "drift.toml"
    best: dict[str, dict] = {}
    ratios: list[float] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="hyrank-bench-managed-") as tmp:
        root = Path(tmp) / "data"
        print(f"generating two drifting days of {args.rows} rows ...", flush=True)
        generate_logs(SynthConfig(rows_per_day=args.rows, num_days=2, drift=True), root)
        cfgs = configs(config, root, Path(tmp), args.overrides)
        for round_index in range(args.rounds):
            pair = {}
            for name, cfg in cfgs.items():
                ranks = run_local(_train, cfg, world_size=args.nproc, timeout_s=3600)
                r = {"rows": ranks[0]["rows"], "rows_per_s": ranks[0]["rows"] / max(x["seconds"] for x in ranks),
                     "managed": ranks[0]["managed"]}
                pair[name] = r["rows_per_s"]
                if name not in best or r["rows_per_s"] > best[name]["rows_per_s"]:
                    best[name] = r
            ratios.append(pair["managed"] / pair["plain"])
            print(f"  round {round_index + 1}: managed {pair['managed']:,.0f} rows/s, plain {pair['plain']:,.0f} "
                  f"rows/s, {ratios[-1]:.2f}x", flush=True)
    load_after = os.getloadavg()
    ratio = sorted(ratios)[len(ratios) // 2] if len(ratios) % 2 else sum(sorted(ratios)[len(ratios) // 2 - 1:
                                                                                     len(ratios) // 2 + 1]) / 2
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} cores)")
    print(f"{'tables':<10}{'rows':>9}{'train rows/s (day 2)':>22}")
    for name, r in best.items():
        print(f"{name:<10}{r['rows']:>9,}{r['rows_per_s']:>22,.0f}")
    for table, s in best["managed"]["managed"].items():
        print(f"managed {table!r} on day 2: {s['missed'] / max(s['looked_up'], 1):.1%} of lookups found no slot, "
              f"{s['admitted']:,} ids admitted, {s['evicted']:,} evicted, {s['slots_used']:,}/{s['slots']:,} slots "
              "used")
    print(f"managed / plain: median of the rounds' pairs {ratio:.2f}x (goal >= 0.7x: "
          f"{'met' if ratio >= 0.7 else 'missed'}), best against best "
          f"{best['managed']['rows_per_s'] / best['plain']['rows_per_s']:.2f}x")
    record = {"bench": "managed", "nproc": args.nproc, "rounds": args.rounds, "results": best, "ratios": ratios,
              "median_ratio": ratio, "load_before": load_before[0], "load_after": load_after[0]}
    print(json.dumps(record))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    return 0
