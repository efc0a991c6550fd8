"""Benchmark: a drifting stream of days, progressive AUC per day of managed tables against hashed tables.

    hyrank bench drift                                   # 3 seeds x 7 drifting days (gen-logs --drift), 2 gloo ranks
    hyrank bench drift --rows 20000 --days 4 --seeds 2 --out runs/bench-drift

For each seed S: `hyrank gen-logs --drift --seed S` writes the days, and the same days are streamed three times,
with the model seed S each time (so the three runs of a seed differ only in their user and item tables):
  managed        jobs/configs/drift.toml: user and item tables managed (embeddings/managed.py);
  hashed_equal   those two tables plain, their 63-bit ids hashed modulo the table (pipeline/data/convert.py,
                 oov = "hash": no row is refused), with as many rows as fit in the managed table's memory;
  hashed_double  the same with twice that memory.
The memory rule, per table: rows x (dim x 4 bytes of fp32 weights + the sparse optimizer's state per row) plus, for
a managed table, its id remap (embeddings.managed.remap_bytes_per_rank: 3 int64 a slot and the output segments, on
each rank). A hashed table gets floor(bytes / bytes per row) rows, so it holds at most one row less than the
managed one. The bytes each rank's sharded model holds after training (dmp.held_bytes) are measured and printed
beside the rule.

Each run is Trainer.run over the days with progressive evaluation (the loop of `hyrank stream`): every day but the
first is scored by the model of the day before, then trained on; the score's `oracle_auc` is the AUC of the true
click probability the generator wrote (`_oracle_p`). Checkpoints are off. The table reports, per day, each setup's
AUC (mean over seeds), the oracle AUC, and the paired difference managed - hashed_equal over the seeds with its
standard error (sample standard deviation / sqrt(seeds)). Training rows/s of managed against hashed_equal (plain
tables) are from the same runs, over every day but the first (the tables are full then); the order of the three
setups rotates with the seed, so the machine's load falls on each alike. Rows validation dropped are counted per
setup (a plain table hashes every id, so there should be none). Writes <out>/drift.json, drift.md and the plot
drift_auc.png (AUC per day with the oracle, and the paired differences); a seed's generated days are deleted after
its three runs. On the 2-core machine the default size took 47 minutes (docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

SETUPS = ("managed", "hashed_equal", "hashed_double")
# fp32 optimizer state per row of a fused sparse optimizer, in floats (embeddings/sharding.py's optimizers)
_STATE_FLOATS = {"sgd": lambda dim: 0, "rowwise_adagrad": lambda dim: 1, "adagrad": lambda dim: dim,
                 "adam": lambda dim: 2 * dim}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="run config with managed tables "
                                                              "(default: jobs/configs/drift.toml)")
    p.add_argument("--rows", type=int, default=100_000, help="rows of each generated drifting day")
    p.add_argument("--days", type=int, default=7, help="days of the stream")
    p.add_argument("--seeds", type=int, default=3, help="how many seeds, of the data and of the model each")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds FIRST..FIRST+N-1 (settings are tried on other seeds than the reported ones)")
    p.add_argument("--nproc", type=int, default=2, help="local gloo ranks")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, as for `hyrank train`")
    p.add_argument("--out", type=Path, default=Path("runs/bench-drift"),
                   help="where the data, drift.json, drift.md and drift_auc.png go")
    p.add_argument("--timeout-s", type=float, default=3600, help="a run (one seed, one setup) longer than this fails")


# -- the memory rule ---------------------------------------------------------------------------------------------------


def row_bytes(dim: int, optimizer: str) -> int:
    """Bytes of one plain row: fp32 weights and the optimizer's fp32 state for that row."""
    return 4 * (dim + _STATE_FLOATS[optimizer](dim))


def table_bytes(table, optimizer: str, world_size: int) -> int:
    """A table's rows with their optimizer state, plus a managed table's id remaps on every rank."""
    from hyrank.embeddings.managed import remap_bytes_per_rank

    return table.num_embeddings * row_bytes(table.dim, optimizer) + world_size * remap_bytes_per_rank([table],
                                                                                                      world_size)


def hashed_tables(cfg, factor: int, world_size: int) -> list[dict]:
    """The config's tables with each managed one made plain, with the rows `factor` x its bytes hold."""
    from hyrank.pipeline.config import to_dict

    optimizer = cfg.embeddings.optimizer
    out = []
    for table, raw in zip(cfg.features.tables, to_dict(cfg)["features"]["tables"]):
        raw = {k: v for k, v in raw.items() if k != "managed"}
        if table.managed is not None:
            raw["num_embeddings"] = factor * table_bytes(table, optimizer, world_size) // row_bytes(table.dim,
                                                                                                    optimizer)
        out.append(raw)
    return out


def setup_configs(config: Path, root: Path, runs: Path, seed: int, nproc: int, overrides: list[str]) -> dict:
    """{setup: RunConfig} on the data under `root`, model seed `seed`, checkpoints and TensorBoard off."""
    from hyrank.pipeline.config import load_config, with_values

    managed = load_config(config, [f'data.root="{root}"', f"seed={seed}", "train.tensorboard=false",
                                   "checkpoint.at_day_end=false", *overrides])
    if not any(t.managed is not None for t in managed.features.tables):
        raise ValueError(f"{config}: no managed table to compare (features.tables[*].managed)")
    out = {"managed": managed}
    for name, factor in (("hashed_equal", 1), ("hashed_double", 2)):
        out[name] = with_values(managed, {"features.tables": hashed_tables(managed, factor, nproc)})
    return {name: with_values(cfg, {"out_dir": str(runs / f"{name}-s{seed}")}) for name, cfg in out.items()}


def memory_rule(cfgs: dict, nproc: int) -> dict:
    """{setup: {table: {"rows", "bytes"}}} by the rule, for the tables managed in `managed`."""
    names = [t.name for t in cfgs["managed"].features.tables if t.managed is not None]
    return {setup: {t.name: {"rows": t.num_embeddings, "bytes": table_bytes(t, cfg.embeddings.optimizer, nproc),
                             "row_bytes": row_bytes(t.dim, cfg.embeddings.optimizer)}
                    for t in cfg.features.tables if t.name in names}
            for setup, cfg in cfgs.items()}


# -- one run -----------------------------------------------------------------------------------------------------------


def _stream(rank: int, world_size: int, cfg) -> dict:
    """Every day under data.root in order, each scored before it is trained on (Trainer.run, progressive)."""
    from dataclasses import asdict

    from hyrank.pipeline.data.days import discover_days
    from hyrank.pipeline.distributed.dmp import held_bytes
    from hyrank.pipeline.distributed.env import env_of_current_group
    from hyrank.pipeline.train.trainer import RunPlan, Trainer

    trainer = Trainer(cfg, env_of_current_group())
    try:
        result = trainer.run(RunPlan(train_days=discover_days(cfg.data.root), progressive=True))
        held = asdict(held_bytes(trainer.sharded))
    finally:
        trainer.close()
    return {"progressive": {day: None if m is None else m.to_dict() for day, m in result.progressive.items()},
            "trained": [{k: v for k, v in s.to_dict().items() if k != "losses"} for s in result.trained],
            "held": held}


def run_setup(cfg, nproc: int, timeout_s: float) -> dict:
    from hyrank.pipeline.distributed.local import run_local

    ranks = run_local(_stream, cfg, world_size=nproc, timeout_s=timeout_s)
    days = []
    for i, day in enumerate(ranks[0]["trained"]):
        seconds = max(r["trained"][i]["seconds"] for r in ranks)  # the day ends when its slowest rank does
        m = ranks[0]["progressive"].get(day["day"])
        days.append({"day": day["day"], "rows": day["rows"], "seconds": seconds,
                     "bad_rows": sum(day["bad_rows"].values()), "managed": day.get("managed", {}),
                     "auc": None if m is None else m["auc"], "oracle_auc": None if m is None else m["oracle_auc"],
                     "logloss": None if m is None else m["logloss"]})
    held = {k: sum(r["held"][k] for r in ranks) for k in ranks[0]["held"]}
    return {"days": days, "held": held}


# -- the table -----------------------------------------------------------------------------------------------------------


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / sqrt(n)); NaN s.e. for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def summarize(runs: dict) -> dict:
    """runs[seed][setup] -> per-day rows (days scored by all runs), the throughput ratio and the dropped rows."""
    seeds = sorted(runs)
    labels = [d["day"] for d in runs[seeds[0]]["managed"]["days"]]
    rows = []
    for i, day in enumerate(labels):
        if any(runs[s][setup]["days"][i]["auc"] is None for s in seeds for setup in SETUPS):
            continue  # the first day: no model yet
        auc = {setup: [runs[s][setup]["days"][i]["auc"] for s in seeds] for setup in SETUPS}
        row = {"day": day, "oracle_auc": mean_se([runs[s]["managed"]["days"][i]["oracle_auc"] for s in seeds])[0]}
        for setup in SETUPS:
            row[setup] = mean_se(auc[setup])[0]
        for other in SETUPS[1:]:
            row[f"managed-{other}"] = mean_se([m - h for m, h in zip(auc["managed"], auc[other])])
        rows.append(row)
    speed = {}
    for setup in SETUPS:  # rows/s over every day but the first, per seed
        speed[setup] = [sum(d["rows"] for d in runs[s][setup]["days"][1:]) /
                        sum(d["seconds"] for d in runs[s][setup]["days"][1:]) for s in seeds]
    ratios = sorted(m / h for m, h in zip(speed["managed"], speed["hashed_equal"]))
    mid = len(ratios) // 2
    median = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
    dropped = {setup: sum(d["bad_rows"] for s in seeds for d in runs[s][setup]["days"]) for setup in SETUPS}
    return {"days": rows, "rows_per_s": speed, "speed_ratios": ratios, "median_speed_ratio": median,
            "dropped_rows": dropped}


def markdown(summary: dict, memory: dict, held: dict, seeds: int) -> str:
    lines = [f"| day | managed | hashed, equal memory | hashed, 2x memory | oracle | managed - hashed equal "
             f"(s.e., {seeds} seeds) | managed - hashed 2x (s.e.) |", "|---|---|---|---|---|---|---|"]
    for r in summary["days"]:
        d1, d2 = r["managed-hashed_equal"], r["managed-hashed_double"]
        lines.append(f"| {r['day']} | {r['managed']:.4f} | {r['hashed_equal']:.4f} | {r['hashed_double']:.4f} | "
                     f"{r['oracle_auc']:.4f} | {d1[0]:+.5f} ({d1[1]:.5f}) | {d2[0]:+.5f} ({d2[1]:.5f}) |")
    lines += ["", "| setup | " + " | ".join(f"{t} rows (bytes by the rule)" for t in memory["managed"]) +
              " | held by the ranks: tables + optimizer + remaps | train rows/s (days 2+, per seed) | rows dropped |",
              "|---|" + "---|" * (len(memory["managed"]) + 3)]
    for setup in SETUPS:
        tables = " | ".join(f"{t['rows']:,} ({t['bytes']:,})" for t in memory[setup].values())
        h = held[setup]
        speeds = ", ".join(f"{v:,.0f}" for v in summary["rows_per_s"][setup])
        lines.append(f"| {setup} | {tables} | {h['tables'] + h['optimizer'] + h['remap']:,} | {speeds} | "
                     f"{summary['dropped_rows'][setup]} |")
    later = summary["days"][1:]  # the goal's days: from the third on
    ahead = [r["day"] for r in later if r["managed-hashed_equal"][0] > 0]
    clear = [r["day"] for r in later if r["managed-hashed_equal"][0] > 2 * r["managed-hashed_equal"][1]]
    lines += ["", f"From the third day on, managed is ahead of hashed equal in the mean on {len(ahead)} of {len(later)} "
              f"days ({', '.join(ahead) or 'none'}), by more than 2 s.e. on {len(clear)} ({', '.join(clear) or 'none'})."]
    ratios = ", ".join(f"{r:.2f}" for r in summary["speed_ratios"])
    lines += ["", f"Training rows/s, managed / hashed equal (plain tables), per seed: {ratios}; median "
              f"{summary['median_speed_ratio']:.2f}x (goal >= 0.7x)."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, title: str) -> None:
    """AUC per day of each setup (mean over seeds) with the oracle, and the paired differences with their s.e."""
    from matplotlib.figure import Figure  # as pipeline/report.py: no pyplot, no display

    days = [r["day"][5:] for r in summary["days"]]
    fig = Figure(figsize=(9, 7.5), layout="constrained")
    auc_ax, diff_ax = fig.subplots(2, 1, sharex=True)
    styles = {"managed": ("tab:blue", "managed"), "hashed_equal": ("tab:orange", "hashed, equal memory"),
              "hashed_double": ("tab:green", "hashed, 2x memory")}
    for setup, (color, label) in styles.items():
        auc_ax.plot(days, [r[setup] for r in summary["days"]], marker="o", color=color, label=label)
    auc_ax.plot(days, [r["oracle_auc"] for r in summary["days"]], linestyle="--", color="tab:gray",
                label="oracle (true click probability)")
    auc_ax.set_ylabel("progressive AUC (mean over seeds)")
    auc_ax.legend(loc="best", fontsize="small")
    for other, color in (("hashed_equal", "tab:orange"), ("hashed_double", "tab:green")):
        values = [r[f"managed-{other}"] for r in summary["days"]]
        diff_ax.errorbar(days, [v[0] for v in values], yerr=[0 if math.isnan(v[1]) else v[1] for v in values],
                         marker="o", capsize=3, color=color, label=f"managed - {styles[other][1]} (+- s.e.)")
    diff_ax.axhline(0, color="black", linewidth=0.8)
    diff_ax.set_ylabel("paired AUC difference")
    diff_ax.set_xlabel("day (each scored before it is trained on)")
    diff_ax.legend(loc="best", fontsize="small")
    for ax in (auc_ax, diff_ax):
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)


# -- the benchmark -----------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from hyrank.pipeline.data.synth import SynthConfig, generate_logs

    if args.days < 3 or args.seeds < 1:
        raise SystemExit("--days must be >= 3 (the first day is only trained) and --seeds >= 1")
    config = args.config or Path(__file__).resolve().parents[1] / "jobs" / "configs" / "drift.toml"
    out = args.out
    load_before, start = os.getloadavg(), time.perf_counter()
    runs: dict[int, dict] = {}
    held: dict[str, dict] = {}
    memory = None
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        root = out / "data" / f"seed-{seed}"
        shutil.rmtree(root, ignore_errors=True)  # what an earlier invocation left, of other sizes maybe
        print(f"seed {seed}: generating {args.days} drifting days of {args.rows:,} rows ...", flush=True)
        generate_logs(SynthConfig(rows_per_day=args.rows, num_days=args.days, drift=True, seed=seed), root,
                      workers=min(os.cpu_count() or 1, 2))
        cfgs = setup_configs(config, root, out / "runs", seed, args.nproc, args.overrides)
        memory = memory or memory_rule(cfgs, args.nproc)
        runs[seed] = {}
        for k in range(len(SETUPS)):  # the order rotates with the seed: load falls on each setup alike
            setup = SETUPS[(seed + k) % len(SETUPS)]
            t0 = time.perf_counter()
            shutil.rmtree(cfgs[setup].out_dir, ignore_errors=True)  # a fresh run, not a resumed one
            runs[seed][setup] = run_setup(cfgs[setup], args.nproc, args.timeout_s)
            held[setup] = runs[seed][setup]["held"]
            aucs = " ".join(f"{d['auc']:.4f}" for d in runs[seed][setup]["days"] if d["auc"] is not None)
            print(f"seed {seed} {setup:<14} {time.perf_counter() - t0:6.0f} s  progressive AUC by day: {aucs}  "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
        shutil.rmtree(root)  # ~400 MB a seed at the default size, regenerated by every invocation anyway
    summary = summarize(runs)
    load_after = os.getloadavg()
    table = markdown(summary, memory, held, args.seeds)
    load = (f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} cores), "
            f"{time.perf_counter() - start:.0f} s in all")
    print(table + load)
    plot(summary, out / "drift_auc.png", f"{args.days} drifting days of {args.rows:,} rows, {args.seeds} seed(s), "
                                          f"{args.nproc} ranks: progressive AUC per day")
    (out / "drift.md").write_text(table + "\n" + load + "\n")
    record = {"bench": "drift", "rows_per_day": args.rows, "days": args.days, "seeds": args.seeds,
              "nproc": args.nproc, "overrides": args.overrides, "memory": memory, "held": held, "summary": summary,
              "runs": runs, "load_before": load_before[0], "load_after": load_after[0]}
    (out / "drift.json").write_text(json.dumps(record, indent=2))
    print(f"table: {out / 'drift.md'}\nplot:  {out / 'drift_auc.png'}\nrecord: {out / 'drift.json'}")
    return 0
