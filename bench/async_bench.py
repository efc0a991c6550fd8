"""Benchmark: synchronous vs one-step-stale (async) AllReduce of the dense gradients, side by side in one run.

    hyrank bench async                      # generates a small dataset in a temp dir, 2 local gloo ranks
    hyrank bench async --data data/synth --config jobs/configs/hyformer.toml    # parity on a default day

Prints per-step time of both modes, the time of the blocking allreduce alone, the share of it that async hides
((t_sync - t_async) / t_allreduce), and convergence parity: eval AUC of both after the same training day (with
`train.allreduce_sync_steps`, `train.allreduce_weight_prediction` or `train.allreduce_delay_compensation`
configured, also that of the plain stale rule).
On a 2-core CPU machine gloo's allreduce competes with compute for the same cores, so the hidden share there
says little about GPUs/NCCL, where the allreduce runs on its own stream and link: `hyrank bench overlap` measures
it for the dense tower alone, with torch only, on a GPU machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="run config (default: jobs/configs/default.toml)")
    p.add_argument("--data", type=Path, default=None, help="dataset root with 2 days (default: generate one)")
    p.add_argument("--rows-per-day", type=int, default=30_000)
    p.add_argument("--model", default=None, help="override model.name")
    p.add_argument("--seeds", type=int, default=1,
                   help="run sync and async on seeds 0..N-1 and report async's mean AUC difference with its standard "
                        "error (one run's AUC varies by about 0.01 from seed to seed on the default data)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from hyrank.pipeline.config import load_config
    from hyrank.pipeline.distributed.local import run_local
    from hyrank.pipeline.data.synth import SynthConfig, generate_logs

    config = args.config or Path(__file__).resolve().parents[1] / "jobs" / "configs" / "default.toml"
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "data"
            # row groups of 2048 rows: enough of them to deal to both ranks even for a small day
            generate_logs(SynthConfig(rows_per_day=args.rows_per_day, num_days=2, rows_per_chunk=2048), data)
        overrides = [f'data.root="{data}"', f'out_dir="{Path(tmp) / "run"}"', "train.tensorboard=false",
                     "checkpoint.at_day_end=false",
                     *(["model.name=" + args.model] if args.model else []), *args.overrides]
        t = load_config(config, overrides).train
        fixes = {"sync steps": t.allreduce_sync_steps, "prediction": t.allreduce_weight_prediction,
                 "compensation": t.allreduce_delay_compensation}
        fixes = {name: value for name, value in fixes.items() if value}
        modes = {"sync": ["train.allreduce=sync"], "async": ["train.allreduce=async"]}
        if fixes:  # the configured async run corrects for the delay: also show the plain stale rule
            modes["plain stale"] = ["train.allreduce=async", "train.allreduce_delay_compensation=0",
                                    "train.allreduce_weight_prediction=0", "train.allreduce_sync_steps=0"]
        # one seed: a second sync seed gives the noise floor; several: every mode on every seed
        runs = [(mode, seed) for seed in range(args.seeds) for mode in modes]
        runs += [("sync", 1)] if args.seeds == 1 else []
        results = {(mode, seed): run_local(_worker, str(config), overrides + modes[mode] + [f"seed={seed}"])[0]
                   for mode, seed in runs}
    sync, asyn = results[("sync", 0)], results[("async", 0)]
    print(f"dense parameters: {sync['dense_params']:,}  ranks: 2 (gloo, CPU)")
    print(f"step time   sync {sync['step_s'] * 1e3:8.2f} ms   async {asyn['step_s'] * 1e3:8.2f} ms   "
          f"ratio async/sync {asyn['step_s'] / sync['step_s']:.3f}")
    if ("plain stale", 0) in results:  # what the prediction / compensation cost per step
        plain = results[("plain stale", 0)]
        print(f"            plain stale {plain['step_s'] * 1e3:8.2f} ms   ratio async/plain stale "
              f"{asyn['step_s'] / plain['step_s']:.3f}")
    share = sync["allreduce_s"] / sync["step_s"]
    print(f"blocking allreduce of the dense gradient alone: {sync['allreduce_s'] * 1e3:.2f} ms "
          f"({share:.1%} of a sync step)")
    if share > 0.05:
        print(f"share of the allreduce hidden by async: "
              f"{(sync['step_s'] - asyn['step_s']) / sync['allreduce_s']:.2f}")
    else:
        print("share of the allreduce hidden by async: not measurable here (the allreduce is under 5% of a step, "
              "below the step-time noise)")
    _print_parity(results, list(modes), args.seeds, fixes)
    return 0


def _print_parity(results: dict, modes: list[str], seeds: int, fixes: dict[str, float]) -> None:
    """Eval AUC of every mode and seed, and async's mean difference from sync with its standard error."""
    names = {"async": f"async ({', '.join(f'{k} {v:g}' for k, v in fixes.items())})" if fixes else "async"}
    print("eval AUC after one day")
    width = max(len(names.get(m, m)) for m in modes) + 3
    print("  seed" + "".join(f"{names.get(m, m):>{width}}" for m in modes))
    for seed in range(seeds):
        print(f"  {seed:>4}" + "".join(f"{results[(m, seed)]['auc']:>{width}.4f}" for m in modes))
    sync = [results[("sync", s)]["auc"] for s in range(seeds)]
    for mode in modes[1:]:
        deltas = [results[(mode, s)]["auc"] - a for s, a in enumerate(sync)]
        mean = statistics.fmean(deltas)
        error = f" +- {statistics.stdev(deltas) / len(deltas) ** 0.5:.4f} (standard error)" if seeds > 1 else ""
        print(f"  {names.get(mode, mode)} - sync: {mean:+.4f}{error} over {seeds} seed(s)")
    if seeds > 1:
        print(f"  noise floor: sync's seed-to-seed standard deviation {statistics.stdev(sync):.4f}")
    else:
        other = results[("sync", 1)]["auc"]
        print(f"  noise floor: sync with seed 1 {other:.4f}, |delta| {abs(other - sync[0]):.4f} "
              f"(--seeds N runs every mode on N seeds)")


def _worker(rank: int, world_size: int, config: str, overrides: list[str]) -> dict:
    import torch
    import torch.distributed as dist

    from hyrank.pipeline.config import load_config
    from hyrank.pipeline.data.days import discover_days
    from hyrank.pipeline.distributed.env import env_of_current_group
    from hyrank.pipeline.train.trainer import RunPlan, Trainer

    cfg = load_config(config, overrides)
    trainer = Trainer(cfg, env_of_current_group())
    days = discover_days(cfg.data.root)
    result = trainer.run(RunPlan(train_days=days[:1], eval_days=days[1:2]))  # what `hyrank train` runs
    times = result.trained[0].step_seconds
    flat = torch.zeros(sum(p.numel() for _, p in trainer.dense_named_parameters()))  # what the hook reduces
    ar = []
    for _ in range(20):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(flat)
        ar.append(time.perf_counter() - start)
    skip = min(5, len(times) // 4)  # warm-up steps (DDP re-bucketing, allocator) are not representative
    if cfg.train.allreduce == "async":  # and an async run's synchronous first steps are not async steps
        skip = min(len(times) - 1, max(skip, cfg.train.allreduce_sync_steps + 1))
    return {"step_s": statistics.median(times[skip:]), "allreduce_s": statistics.median(ar),
            "auc": result.metrics[str(days[1].day)].auc, "dense_params": flat.numel()}
