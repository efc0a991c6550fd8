"""Benchmark: training rows/s from Parquet against the reader alone, and the share of time the trainer waits on input.

    hyrank bench e2e                                  # HyFormer and DLRM-MLP, one generated 40k-row day, 2 gloo ranks
    hyrank bench e2e --data data/synth --models hyformer --rounds 2 --set data.num_workers=2
    hyrank bench e2e --models hyformer --compare train.compile=true      # eager and compiled rows, same run

For each tower, side by side in one run (the towers take turns, `--rounds` times, and the best round is kept):
  reader   DayReader alone on every rank over the day, exactly as training builds it (same split, options and the
           tower's sequence feed), batches consumed as fast as they come: the input side's ceiling.
  train    `Trainer.run` over the same day on the same ranks: reader, sharded embeddings, tower, dense step.
`--compare KEY=VALUE` (repeatable) adds, per tower, a variant with those overrides too, taking its turn in every
round beside the plain one, so the two rows of the table are measured side by side. The first step's time is
printed apart (the compile, with train.compile), and `steady rows/s` is training without it.
Prints training rows/s, the reader's rows/s, their ratio, and the input-wait share: the wall time the trainer spent
inside `next()` of its batches (pipeline.train.pipelined.InputClock: decode its loader threads had not finished,
the reader's per-batch flags) over the day's wall time, on the rank that waited most (goal: under 5%), and its two
parts: the wait for the rank's own loader, and the wait inside the flags' all_reduce (DayReader.agree_wait_s),
which is the rank waiting for the slowest rank to finish its step: a lag the step's first all-to-all would wait out
if the flags were not there, so it is rank skew, not input. Checkpoints and evaluation are off, so the train line
is the day loop itself. On a machine with fewer cores than ranks x
(1 + loader threads), the loader threads and the tower's compute share cores: the wait then measures that too.
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
    p.add_argument("--models", default="hyformer,dlrm_mlp", help="comma-separated towers")
    p.add_argument("--data", type=Path, default=None, help="root of day=... folders; its first day is read "
                                                              "(default: generate one day into a temp dir)")
    p.add_argument("--rows", type=int, default=40_000, help="rows of the generated day")
    p.add_argument("--nproc", type=int, default=2, help="local gloo ranks")
    p.add_argument("--rounds", type=int, default=1, help="turns of (reader, train) per tower; the best is kept")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, as for `hyrank train`")
    p.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                   help="also run every tower with these overrides (e.g. train.compile=true), in turns with the plain "
                        "runs: before/after rows in one table")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="after the timed rounds, train each tower once more under torch.profiler on rank 0: "
                        "DIR/<tower>.trace.json (chrome://tracing, Perfetto) and the top operators by self CPU time")
    p.add_argument("--json", type=Path, default=None, help="also write the record here")


def _trainer(cfg):
    from hyrank.pipeline.distributed.env import env_of_current_group
    from hyrank.pipeline.train.trainer import Trainer

    return Trainer(cfg, env_of_current_group())


def _read_alone(rank: int, world_size: int, cfg) -> dict:
    """One rank's pass of the day's reader as training builds it, batches dropped as they come."""
    from hyrank.pipeline.data.days import discover_days
    from hyrank.pipeline.data.reader import DayReader

    trainer = _trainer(cfg)  # for the tower's sequence feed; built before the clock starts
    day = discover_days(cfg.data.root)[0]
    start = time.perf_counter()
    reader = DayReader(day, cfg.features, batch_size=cfg.data.batch_size_per_rank, rank=rank, world_size=world_size,
                       seed=cfg.seed, options=cfg.data, sequence_feed=trainer.sequence_feed)
    rows = sum(b.num_real for b in reader)
    seconds = time.perf_counter() - start
    trainer.close()
    return {"rows": rows, "seconds": seconds}


def _train(rank: int, world_size: int, cfg, profile: Path | None = None) -> dict:
    import contextlib

    import torch

    from hyrank.pipeline.data.days import discover_days
    from hyrank.pipeline.train.trainer import RunPlan

    trainer = _trainer(cfg)
    day = discover_days(cfg.data.root)[0]
    profiling = profile is not None and rank == 0
    with (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profiling
          else contextlib.nullcontext()) as prof:
        stats = trainer.run(RunPlan(train_days=[day])).trained[0]
    trainer.close()
    if profiling:
        prof.export_chrome_trace(str(profile))
        print(f"rank 0 profile of {cfg.model.name} ({stats.steps} steps, input wait "
              f"{100 * stats.input_wait_share:.1f}%), trace {profile}; top operators by self CPU time:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    return {"rows": stats.rows, "seconds": stats.seconds, "steps": stats.steps, "first_step_s": stats.step_seconds[0],
            "input_wait_share": stats.input_wait_share, "loader_wait_share": stats.loader_wait_share}


def _generate(root: Path, rows: int) -> Path:
    from hyrank.pipeline.data.synth import SynthConfig, generate_logs

    print(f"generating one day of {rows} rows ...", flush=True)
    generate_logs(SynthConfig(rows_per_day=rows, num_days=1, rows_per_chunk=8192), root)
    return root


def _config(config: Path, root: Path, tmp: Path, model: str, overrides: list[str]):
    """The run config of one tower: another tower than the config's starts from its own defaults (the config's
    options are the config tower's); no checkpoints, no TensorBoard."""
    from hyrank.pipeline.config import load_config

    own = load_config(config).model.name
    return load_config(config, [f'data.root="{root}"', f'out_dir="{tmp / model}"', "train.tensorboard=false",
                                "checkpoint.at_day_end=false", *overrides, f'model.name="{model}"',
                                *([] if model == own else ["model.options={}"])])


def measure(cfg, nproc: int) -> dict:
    """One turn for one config: the reader alone, then training; rows/s over all ranks (the slowest rank's
    time) and the input-wait share of the rank that waited most, with its wait for the loader."""
    from hyrank.pipeline.distributed.local import run_local

    reads = run_local(_read_alone, cfg, world_size=nproc, timeout_s=3600)
    trains = run_local(_train, cfg, world_size=nproc, timeout_s=3600)
    read_rows = sum(r["rows"] for r in reads)
    most = max(trains, key=lambda t: t["input_wait_share"])
    seconds, first = max(t["seconds"] for t in trains), max(t["first_step_s"] for t in trains)
    rows, steps = trains[0]["rows"], trains[0]["steps"]
    return {"reader_rows_per_s": read_rows / max(r["seconds"] for r in reads),
            "train_rows_per_s": rows / seconds, "first_step_s": first,
            "steady_rows_per_s": rows * (steps - 1) / steps / max(seconds - first, 1e-9),
            "input_wait_share": most["input_wait_share"], "loader_wait_share": most["loader_wait_share"],
            "rows": trains[0]["rows"], "reader_rows": read_rows, "steps": trains[0]["steps"]}


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = args.config or Path(__file__).resolve().parents[1] / "jobs" / "configs" / "default.toml"
    models = [m for m in args.models.split(",") if m]
    with tempfile.TemporaryDirectory(prefix="hyrank-bench-e2e-") as tmp:
        root = args.data or _generate(Path(tmp) / "data", args.rows)
        variants = {"": []} | ({" + " + ",".join(args.compare): args.compare} if args.compare else {})
        cfgs = {m + label: _config(config, root, Path(tmp) / f"{m}{i}", m, [*args.overrides, *extra])
                for m in models for i, (label, extra) in enumerate(variants.items())}
        load_before = os.getloadavg()
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for m, cfg in cfgs.items():
                r = measure(cfg, args.nproc)
                print(f"  {m}: train {r['train_rows_per_s']:,.0f} rows/s, reader {r['reader_rows_per_s']:,.0f} "
                      f"rows/s, input wait {100 * r['input_wait_share']:.1f}% (loader "
                      f"{100 * r['loader_wait_share']:.1f}%)", flush=True)
                if m not in best or r["train_rows_per_s"] > best[m]["train_rows_per_s"]:
                    best[m] = r
        if args.profile is not None:  # after the timed rounds: the profiler slows what it watches
            from hyrank.pipeline.distributed.local import run_local

            args.profile.mkdir(parents=True, exist_ok=True)
            for m, cfg in cfgs.items():
                run_local(_train, cfg, args.profile / f"{m}.trace.json", world_size=args.nproc, timeout_s=3600)
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    width = max([18, *(len(m) + 2 for m in best)])
    print(f"{'tower':<{width}}{'rows':>9}{'train rows/s':>14}{'first step s':>14}{'steady rows/s':>15}"
          f"{'reader rows/s':>15}{'train/reader':>14}{'input wait':>12}{'loader':>8}{'ranks':>8}")
    for m, r in best.items():
        print(f"{m:<{width}}{r['rows']:>9,}{r['train_rows_per_s']:>14,.0f}{r['first_step_s']:>14.1f}"
              f"{r['steady_rows_per_s']:>15,.0f}{r['reader_rows_per_s']:>15,.0f}"
              f"{r['train_rows_per_s'] / r['reader_rows_per_s']:>14.3f}{100 * r['input_wait_share']:>11.1f}%"
              f"{100 * r['loader_wait_share']:>7.1f}%"
              f"{100 * (r['input_wait_share'] - r['loader_wait_share']):>7.1f}%")
    print("input wait = loader (decode the loader threads had not finished) + ranks (inside the per-batch flags' "
          "all_reduce: waiting for the slowest rank)")
    misses = [m for m, r in best.items() if r["input_wait_share"] >= 0.05]
    print("input wait under 5% of the day's time: " + ("met" if not misses else f"missed by {', '.join(misses)}"))
    record = {"bench": "e2e", "nproc": args.nproc, "rounds": args.rounds, "results": best,
              "load_before": load_before[0]}
    print(json.dumps(record))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    return 0
