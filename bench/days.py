"""Benchmark: many small day partitions against one big day of the same rows, trained and evaluated side by side.

    hyrank bench days                                   # 1,000 days of 100 rows vs 1 day of 100,000, 2 gloo ranks
    hyrank bench days --small-days 200 --rows-per-day 500 --set model.name=hyformer

Real logs can come as thousands of tiny partitions (a data set cut by day, a test set spanning years). Training
reads consecutive small days as one unit (train.min_unit_rows, pipeline.data.split.group_days) so batches stay
full and a day's fixed costs (reader start, end-of-day collectives, the day-end checkpoint) are paid per unit;
evaluating a span reads it as one set (--eval-days A..B). Prints rows/s of training (discovery included) and of
evaluation for both layouts and their ratio (goal: the small days within 2x of the big day), plus the steps
each took: the same rows in the same number of batches means no filler was added.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="run config (default: jobs/configs/default.toml)")
    p.add_argument("--small-days", type=int, default=1000, help="number of small days")
    p.add_argument("--rows-per-day", type=int, default=100, help="rows of each small day")
    p.add_argument("--small", type=Path, help="an existing root of small days to use instead of generating one")
    p.add_argument("--big", type=Path, help="an existing root whose first day holds the same number of rows")
    p.add_argument("--nproc", type=int, default=2, help="local gloo ranks")
    p.add_argument("--json", type=Path, help="also write the record here")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _train_and_evaluate(rank: int, world_size: int, cfg) -> dict:
    from hyrank.pipeline.data.days import as_span, discover_days
    from hyrank.pipeline.distributed.env import env_of_current_group
    from hyrank.pipeline.train.trainer import RunPlan, Trainer

    trainer = Trainer(cfg, env_of_current_group())
    start = time.perf_counter()
    days = discover_days(cfg.data.root)
    result = trainer.run(RunPlan(train_days=days))
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = trainer.evaluate(as_span(days), kind="bench")
    eval_s = time.perf_counter() - start
    trainer.close()
    return {"days": len(days), "units": len(result.trained), "steps": sum(s.steps for s in result.trained),
            "rows": sum(s.rows for s in result.trained), "train_s": train_s, "eval_rows": metrics.num_rows,
            "eval_s": eval_s, "auc": metrics.auc}


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from hyrank.pipeline.config import load_config
    from hyrank.pipeline.data.synth import SynthConfig, generate_logs
    from hyrank.pipeline.distributed.local import run_local

    config = args.config or Path(__file__).resolve().parents[1] / "jobs" / "configs" / "default.toml"
    total = args.small_days * args.rows_per_day
    with tempfile.TemporaryDirectory() as tmp:
        small, big = args.small, args.big
        if small is None:
            print(f"generating {args.small_days} days of {args.rows_per_day} rows ...", flush=True)
            small = Path(tmp) / "small"
            generate_logs(SynthConfig(rows_per_day=args.rows_per_day, num_days=args.small_days), small, workers=2)
        if big is None:
            big = Path(tmp) / "big"
            generate_logs(SynthConfig(rows_per_day=total, num_days=1, rows_per_chunk=8192), big)
        out = {}
        for name, root in (("one big day", big), (f"{args.small_days} small days", small)):
            cfg = load_config(config, [f'data.root="{root}"', f'out_dir="{Path(tmp) / name.replace(" ", "-")}"',
                                       "train.tensorboard=false", *args.overrides])
            out[name] = run_local(_train_and_evaluate, cfg, world_size=args.nproc, timeout_s=3600)[0]
    big_r, small_r = out.values()
    print(f"{'layout':<18} {'days':>6} {'units':>6} {'steps':>6} {'rows':>8} {'train rows/s':>13} "
          f"{'eval rows/s':>12} {'AUC':>7}")
    for name, r in out.items():
        print(f"{name:<18} {r['days']:>6} {r['units']:>6} {r['steps']:>6} {r['rows']:>8} "
              f"{r['rows'] / r['train_s']:>13,.0f} {r['eval_rows'] / r['eval_s']:>12,.0f} {r['auc']:>7.4f}")
    train_ratio = (small_r["rows"] / small_r["train_s"]) / (big_r["rows"] / big_r["train_s"])
    eval_ratio = (small_r["eval_rows"] / small_r["eval_s"]) / (big_r["eval_rows"] / big_r["eval_s"])
    print(f"small days / big day: training {train_ratio:.2f}x, evaluation {eval_ratio:.2f}x the rows/s "
          "(goal: >= 0.5)")
    record = {"bench": "days", "small_days": args.small_days, "rows_per_day": args.rows_per_day,
              "results": out, "train_ratio": train_ratio, "eval_ratio": eval_ratio}
    print(json.dumps(record))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    return 0
