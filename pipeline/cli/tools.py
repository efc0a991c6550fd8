"""The tool verbs: gen-logs (synthetic logs), models (towers and their cost), plan (a run's sharding plan for a
cluster), report (a run's days), bench."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import time
from pathlib import Path

from hyrank.pipeline.cli import verb


# -- gen-logs ------------------------------------------------------------------------------------------------------


def add_gen_logs(verbs) -> None:
    from hyrank.pipeline.data.synth import SynthConfig

    d = SynthConfig()
    p = verb(verbs, "gen-logs", _gen_logs)
    p.add_argument("--out", required=True, type=Path, help="dataset root to write under")
    p.add_argument("--days", type=int, default=d.num_days, help="number of days")
    p.add_argument("--rows-per-day", type=int, default=d.rows_per_day)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--start-day", type=dt.date.fromisoformat, default=d.start_day, help="first day, YYYY-MM-DD")
    p.add_argument("--long-len", type=_int_range, default=f"{d.long_len_min}..{d.long_len_max}",
                   help="long sequence length per row, MIN..MAX (paper scale: 1000..3000)")
    p.add_argument("--short-len", type=int, default=d.short_len, help="length of the two short sequences")
    p.add_argument("--partition-key", default=d.partition_key, help="folder key: <key>=YYYY-MM-DD")
    p.add_argument("--drift", action="store_true",
                   help="ids drift: new users and items every day, churning popularity, 63-bit ids (for managed "
                        "tables: jobs/configs/drift.toml)")
    p.add_argument("--new-id-share", type=float, default=d.new_id_share,
                   help="with --drift: expected share of a day's impressions on ids born that day")
    p.add_argument("--popularity-churn", type=float, default=d.popularity_churn,
                   help="with --drift: share of each popularity ranking that rotates away per day")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4),
                   help="days written in parallel processes (files are identical for any value)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _int_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("..")
    try:
        return int(lo), int(hi or lo)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected MIN..MAX, got {text!r}") from e


def _gen_logs(args) -> int:
    """Write synthetic click logs with known structure (the built-in default data).

    Day-partitioned: <out>/day=YYYY-MM-DD/part-*.parquet plus _SUCCESS. The true click probability is stored as
    `_oracle_p`, so every day's oracle AUC is known. Same seed, identical files.
    """
    from hyrank.pipeline.data.synth import SynthConfig, generate_logs, oracle_auc

    lo, hi = args.long_len
    cfg = SynthConfig(rows_per_day=args.rows_per_day, num_days=args.days, start_day=args.start_day, seed=args.seed,
                      long_len_min=lo, long_len_max=hi, short_len=args.short_len, partition_key=args.partition_key,
                      drift=args.drift, new_id_share=args.new_id_share, popularity_churn=args.popularity_churn)
    start = time.perf_counter()
    days = generate_logs(cfg, args.out, workers=min(args.workers, cfg.num_days), progress=not args.quiet)
    seconds = time.perf_counter() - start
    rows = cfg.rows_per_day * cfg.num_days
    for path in days:
        print(f"{path}  oracle AUC {oracle_auc(path):.4f}")
    print(f"wrote {rows} rows in {seconds:.1f} s ({rows / seconds:,.0f} rows/s)")
    return 0


# -- models --------------------------------------------------------------------------------------------------------


def add_models(verbs) -> None:
    p = verb(verbs, "models", _models)
    p.add_argument("--config", type=Path, default=Path("jobs/configs/default.toml"),
                   help="run config whose feature spec sets the input shapes")
    p.add_argument("--table", action="store_true", help="paper-shaped params/FLOPs table with the paper's figures")


def _models(args) -> int:
    """The registered towers: dense params and training FLOPs; --table for the paper-shaped comparison.

    Lists the registered dense towers with their parameter count and training FLOPs per sample (forward +
    backward, counted on the meta device) for the inputs of a run config. --table prints the paper-shaped
    HyFormer / LONGER+RankMixer / unified comparison next to the HyFormer paper's Table 1.
    """
    from hyrank.models import MODELS
    from hyrank.models.accounting import model_cost, paper_table

    if args.table:
        print(paper_table())
        return 0
    from hyrank.pipeline.config import load_config

    cfg = load_config(args.config)
    shape = cfg.features.input_shape()
    print(f"input shapes from {args.config}: blocks {shape.blocks}, dense {shape.dense_dim}, "
          f"sequences { {k: (v.max_len, v.dim) for k, v in shape.sequences.items()} }")
    print(f"{'model':<18}{'params':>12}{'train MFLOPs/sample':>22}")
    for name in MODELS:
        options = cfg.model.options if name == cfg.model.name else {}
        cost = model_cost(name, options, shape)
        print(f"{name:<18}{cost.params:>12,}{cost.train_flops_per_sample / 1e6:>22.2f}")
    return 0


# -- plan ----------------------------------------------------------------------------------------------------------


def add_plan(verbs) -> None:
    p = verb(verbs, "plan", _plan)
    p.add_argument("--config", type=Path, required=True, help="run config (TOML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set features.tables.0.num_embeddings=1000000 (repeatable)")
    p.add_argument("--unset", dest="unsets", action="append", default=[], metavar="KEY",
                   help="remove a config key, e.g. --unset embeddings.sharding: the planner's free choice (repeatable)")
    p.add_argument("--hosts", type=int, default=1, help="hosts (nodes)")
    p.add_argument("--gpus-per-host", type=int, default=8, help="GPUs per host: ranks per host")
    p.add_argument("--hbm-gb", type=float, default=80.0, help="GPU memory per GPU, GiB")
    p.add_argument("--ddr-gb", type=float, default=1024.0, help="host memory per host, GiB (its GPUs share it)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: plan CPU ranks, as runs on this machine are planned (--gpus-per-host is then ranks "
                        "per host and --hbm-gb is not used)")
    p.add_argument("--dense-tflops", type=float, default=300.0,
                   help="achievable dense training TFLOP/s per GPU, for the tower's compute time (300: about 30%% "
                        "of an H100's 989 dense bf16 TFLOP/s)")
    p.add_argument("--all-ranks", action="store_true", help="one line per rank (default: equal ranks share a line)")


def _plan(args) -> int:
    """A run config's sharding plan for a cluster: memory per rank, placement per table, the step estimated.

    Runs TorchRec's EmbeddingShardingPlanner on this machine for HOSTS x GPUS-PER-HOST GPUs (no GPU needed: the
    model is built on the meta device), with the inputs a run gives it (sharders, embeddings.sharding, ids per
    sample, the fused optimizer, the batch per rank). Prints each table's sharding type and kernel (UVM caching
    included), each rank's memory for tables, optimizer state and the dense tower, and the planner's step estimate
    split into lookup, communication and dense compute (the tower's FLOPs at --dense-tflops). A plan that does not
    fit is one line naming the table that decides it and what would make it fit.

    Examples:
      hyrank plan --config jobs/configs/paper_scale.toml --hosts 8 --gpus-per-host 8 --hbm-gb 80 --ddr-gb 1024
      hyrank plan --config jobs/configs/default.toml --hosts 1 --gpus-per-host 2 --device cpu --ddr-gb 24
    """
    from hyrank.embeddings.planning import GiB, Cluster
    from hyrank.pipeline.config import load_config
    from hyrank.pipeline.train.cluster_plan import format_plan, plan_run

    cfg = load_config(args.config, args.overrides, args.unsets)
    cluster = Cluster(hosts=args.hosts, gpus_per_host=args.gpus_per_host, hbm_bytes=int(args.hbm_gb * GiB),
                      host_bytes=int(args.ddr_gb * GiB), device=args.device)
    print(format_plan(plan_run(cfg, cluster, dense_tflops=args.dense_tflops), all_ranks=args.all_ranks))
    return 0


# -- report --------------------------------------------------------------------------------------------------------


def add_report(verbs) -> None:
    p = verb(verbs, "report", _report)
    p.add_argument("run", type=Path, help="the run directory (the out_dir of hyrank train / hyrank stream)")


def _report(args) -> int:
    """The day-by-day report of a run: <run>/report/days.csv and days.png, and the table printed.

    Rebuilt from the run's own files, so it can be rerun at any time: <run>/train/day-*.json (rows, steps,
    rows/s, rows validation dropped) and <run>/metrics/progressive-*.json (the model's AUC, query AUC, logloss
    and calibration on each day before it trained on it). The PNG plots progressive AUC (with the oracle AUC of
    synthetic data), logloss and train rows/s per day; an empty cell or a gap is a value no file holds. A run of
    several passes with --valid-days also gets report/passes.csv and passes.png: the validation curve.
    """
    from hyrank.pipeline.pass_report import write_pass_report
    from hyrank.pipeline.report import write_report

    passes = write_pass_report(args.run)
    if passes is not None:
        print(f"validation curve: {passes.csv_path} and {passes.png_path}")
    try:
        report = write_report(args.run)
    except ValueError:
        if passes is not None:  # a run of passes over spans of days has no day-by-day report
            return 0
        raise
    print(f"table: {report.csv_path}")
    print(f"plot:  {report.png_path}")
    print(report.table())
    return 0


# -- bench ---------------------------------------------------------------------------------------------------------

# name -> (module under bench/, one-line help); each module has add_arguments(parser) and run(args) -> int
BENCHES = {
    "async": ("hyrank.bench.async_bench", "sync vs one-step-stale allreduce: step time, hidden share, AUC parity"),
    "overlap": ("hyrank.bench.overlap", "the share of the dense allreduce the stale hook hides: a tower alone, "
                "CPU or GPU, torch only"),
    "dedup": ("hyrank.bench.dedup", "plain vs deduplicated sequence lookup: time and host->device bytes per unique "
              "ratio"),
    "e2e": ("hyrank.bench.e2e", "training rows/s from Parquet against the reader alone, and the trainer's "
            "input-wait share"),
    "torchrec": ("hyrank.bench.vs_torchrec", "hyrank's step against TorchRec's DLRM + TrainPipelineSparseDist on "
                 "identical batches, in memory and from Parquet"),
    "managed": ("hyrank.bench.managed", "training rows/s with managed tables against plain tables of the same size "
                "on the same drifting day"),
    "drift": ("hyrank.bench.drift", "a 7-day drifting stream: progressive AUC per day of managed tables against "
              "hashed tables of the same and twice the memory, with the oracle; training rows/s"),
    "days": ("hyrank.bench.days", "1,000 days of 100 rows against one day of 100,000: training and evaluation rows/s"),
    "model": ("hyrank.bench.model", "achieved training FLOP/s of each tower against the machine's fp32 matmul FLOP/s"),
    "seqlen": ("hyrank.bench.seqlen", "step time and FLOPs of HyFormer, LONGER+RankMixer and the Transformer over "
               "sequence length, width and depth"),
    "storage": ("hyrank.bench.storage", "object storage (S3) against local disk: reader rows/s of one day, checkpoint "
                "save and load time"),
    "reader": ("hyrank.bench.reader", "DayReader rows/s against a raw pyarrow scan of the same files and columns"),
    "serve": ("hyrank.bench.serve", "the scoring server under concurrent clients and a hot reload: throughput, "
              "p50/p99, errors, served rows/s against the program called in-process"),
    "paper": ("hyrank.bench.papers", "the papers' experiments (HyFormer Tables 1-2, HHFT, Hiformer, scaling): "
              "table + plot"),
    "tables": ("hyrank.bench.tables", "the sharding plan's memory against what CPU ranks hold, and training rows/s "
               "and memory per rank as a table grows (1M, 10M, 40M rows)"),
    "quality": ("hyrank.bench.quality", "model-quality table: real train runs per (model, variant, seed), "
                "AUC mean +- s.e."),
}


def add_bench(verbs) -> None:
    # A benchmark's module (and the torch it imports) loads only when that benchmark runs: `hyrank --help` and
    # every rank build this parser. So each benchmark is registered here by name alone; main() leaves the
    # arguments after the name in args.unparsed_args, and _run_bench parses them with the benchmark's own parser.
    p = verb(verbs, "bench", _bench_menu)
    kinds = p.add_subparsers(title="benchmarks", metavar="<benchmark>")
    for name, (module, help_text) in BENCHES.items():
        sub = kinds.add_parser(name, help=help_text, add_help=False)  # its --help is the benchmark's own
        sub.set_defaults(func=_run_bench, bench=name, unparsed_args=[])
    p.set_defaults(print_help=p.print_help)


def bench_parser(name: str) -> argparse.ArgumentParser:
    """The full parser of one benchmark (imports its module): what `hyrank bench <name> --help` prints."""
    import importlib

    module, help_text = BENCHES[name]
    parser = argparse.ArgumentParser(prog=f"hyrank bench {name}", description=help_text,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    importlib.import_module(module).add_arguments(parser)
    return parser


def _bench_menu(args) -> int:
    """Benchmarks that print ratios measured side by side in one run.

    Absolute times on a shared machine are noise; ratios of neighbours are not.
    """
    args.print_help()
    return 2


def _run_bench(args) -> int:
    import importlib

    # parsed into the same namespace, so the benchmark still sees args.verbose and the other global options
    args = bench_parser(args.bench).parse_args(args.unparsed_args, namespace=args)
    return importlib.import_module(BENCHES[args.bench][0]).run(args)
