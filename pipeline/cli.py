"""`hyrank <verb>`: the command line of the hyrank training pipeline.

    hyrank gen-logs --out data/synth --days 4       # 150k rows a day (--rows-per-day, --long-len)
    hyrank train --config jobs/configs/default.toml --days 2026-11-01..2026-11-03 --eval-day 2026-11-04 \
        --nproc-per-node 2
    hyrank <verb> --help
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import warnings
from pathlib import Path

EPILOG = """\
A typical day-one session:
  hyrank gen-logs --out data/synth --days 4                       # synthetic click logs (the built-in data)
  hyrank train --config jobs/configs/default.toml \\
      --days 2026-11-01..2026-11-03 --eval-day 2026-11-04 --nproc-per-node 2

Configs are TOML files (jobs/configs/*.toml); change any value without editing a file with
--set section.key=value (e.g. --set train.lr=0.01 --set model.options.hidden=[128,64]).
"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        logging.getLogger("hyrank").error("%s", e)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyrank",
        description="Train CTR ranking models on day-partitioned Parquet logs: TorchRec sharded embeddings, "
        "HyFormer/HHFT/Hiformer towers, distributed training, daily retraining.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(title="verbs", metavar="<verb>")
    _add_gen_logs(verbs)
    _add_train(verbs)
    _add_models(verbs)
    _add_bench(verbs)
    return parser


# -- gen-logs ------------------------------------------------------------------------------------------------------


def _add_gen_logs(verbs) -> None:
    from pipeline.data.synth import SynthConfig

    d = SynthConfig()
    p = verbs.add_parser(
        "gen-logs",
        help="write synthetic click logs with known structure (the built-in default data)",
        description="Write day-partitioned synthetic click logs: <out>/day=YYYY-MM-DD/part-*.parquet plus _SUCCESS. "
        "The true click probability is stored as `_oracle_p`, so every day's oracle AUC is known. "
        "Same seed, identical files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, help="dataset root to write under")
    p.add_argument("--days", type=int, default=d.num_days, help="number of days")
    p.add_argument("--rows-per-day", type=int, default=d.rows_per_day)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--start-day", type=dt.date.fromisoformat, default=d.start_day, help="first day, YYYY-MM-DD")
    p.add_argument("--long-len", type=_int_range, default=f"{d.long_len_min}..{d.long_len_max}",
                   help="long sequence length per row, MIN..MAX (paper scale: 1000..3000)")
    p.add_argument("--short-len", type=int, default=d.short_len, help="length of the two short sequences")
    p.add_argument("--partition-key", default=d.partition_key, help="folder key: <key>=YYYY-MM-DD")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4),
                   help="days written in parallel processes (files are identical for any value)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_gen_logs)


def _int_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("..")
    try:
        return int(lo), int(hi or lo)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected MIN..MAX, got {text!r}") from e


def _gen_logs(args) -> int:
    import time

    from pipeline.data.synth import SynthConfig, generate_logs, oracle_auc

    lo, hi = args.long_len
    cfg = SynthConfig(rows_per_day=args.rows_per_day, num_days=args.days, start_day=args.start_day, seed=args.seed,
                      long_len_min=lo, long_len_max=hi, short_len=args.short_len, partition_key=args.partition_key)
    start = time.perf_counter()
    days = generate_logs(cfg, args.out, workers=min(args.workers, cfg.num_days), progress=not args.quiet)
    seconds = time.perf_counter() - start
    rows = cfg.rows_per_day * cfg.num_days
    for path in days:
        print(f"{path}  oracle AUC {oracle_auc(path):.4f}")
    print(f"wrote {rows} rows in {seconds:.1f} s ({rows / seconds:,.0f} rows/s)")
    return 0


# -- train ---------------------------------------------------------------------------------------------------------


def _add_train(verbs) -> None:
    p = verbs.add_parser(
        "train",
        help="train on a range of days, evaluate on another",
        description="Train the configured model on --days and report exact metrics (AUC, query-level AUC, "
        "logloss, calibration) on --eval-day. Runs on every rank of a torchrun job; with --nproc-per-node N "
        "it launches that job itself on this machine.",
        epilog="Example:\n  hyrank train --config jobs/configs/default.toml --days 2026-11-01..2026-11-03 "
        "--eval-day 2026-11-04 --nproc-per-node 2 --set train.lr=0.002\n"
        "  hyrank train --config jobs/configs/default.toml --days 2026-11-01..2026-11-05 --nproc-per-node 2 "
        "--resume latest   # after a stop",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, type=Path, help="run config (TOML), e.g. jobs/configs/default.toml")
    p.add_argument("--days", required=True, help="training days: YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD")
    p.add_argument("--eval-day", help="evaluation day YYYY-MM-DD (default: none)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.01 (repeatable)")
    p.add_argument("--nproc-per-node", type=int, default=0,
                   help="launch N local ranks with torchrun (default: run in this process / the current torchrun job)")
    p.add_argument("--resume", metavar="latest|PATH",
                   help="continue from a checkpoint: 'latest' under checkpoint.dir, or a step-N folder. Finished "
                   "days are skipped and a day stopped part-way continues from its reader cursor. A torchelastic "
                   "restart (--max-restarts) resumes from 'latest' by itself")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)


def _train(args) -> int:
    if args.nproc_per_node and "TORCHELASTIC_RUN_ID" not in os.environ:
        return _relaunch_with_torchrun(args.nproc_per_node)
    from pipeline.config import load_config, save_resolved
    from pipeline.data.days import DayRange, discover_days, find_day
    from pipeline.distributed.env import init_distributed
    from pipeline.train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    days = discover_days(cfg.data.root, DayRange.parse(args.days), partition_key=cfg.data.partition_key,
                         require_success=cfg.data.require_success)
    if not days:
        raise FileNotFoundError(f"no complete day in {args.days} under {cfg.data.root}")
    eval_day = None
    if args.eval_day:
        eval_day = find_day(cfg.data.root, dt.date.fromisoformat(args.eval_day),
                            partition_key=cfg.data.partition_key, require_success=cfg.data.require_success)
    env = init_distributed(cfg.train.backend, cfg.train.pg_timeout_s)
    if env.is_main:
        save_resolved(cfg, cfg.out_dir)
    trainer = Trainer(cfg, env, progress=not args.quiet)
    resume = _resume(args.resume, trainer)
    if resume is not None:
        days = [d for d in days if str(d.day) not in resume.days_done]

    def reader_state(day):  # the cursor of the day a mid-day checkpoint stopped in
        return resume.reader_state if resume is not None and str(day.day) == resume.day else None

    if days:
        trainer.plan_lr(days, reader_state(days[0]))
    for day in days:
        stats = trainer.train_day(day, reader_state=reader_state(day))
        if env.is_main:
            print(f"train {stats.day}: {stats.steps} steps, {stats.rows} rows, mean loss {stats.mean_loss:.4f}, "
                  f"{stats.rows / max(stats.seconds, 1e-9):,.0f} rows/s")
    if eval_day is not None:
        m = trainer.evaluate(eval_day)
        if env.is_main:
            oracle = f" (oracle AUC {m.oracle_auc:.4f})" if m.oracle_auc is not None else ""
            print(f"eval {eval_day.day}: AUC {m.auc:.4f}{oracle}, query-AUC {m.query_auc:.4f} over "
                  f"{m.num_queries} queries, logloss {m.logloss:.4f}, NE {m.ne:.4f}, calibration {m.calibration:.3f}")
            print(f"outputs: {cfg.out_dir} (config.resolved.toml, train/, metrics/, tensorboard/, checkpoints/)")
    trainer.close()
    if env.is_main and trainer.checkpointer.latest() is not None:
        print(f"checkpoint: {trainer.checkpointer.latest()}")
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


def _resume(where: str | None, trainer):
    """Load the checkpoint `--resume` names (or, on a torchelastic restart, the latest one); None: fresh run."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if where is None and not restarted:
        return None
    path = trainer.checkpointer.latest() if where in (None, "latest") else Path(where)
    if path is None:
        if where == "latest":
            raise FileNotFoundError(f"--resume latest: no complete checkpoint under {trainer.checkpointer.root}")
        return None  # restarted before the first checkpoint: start over
    return trainer.checkpointer.load(trainer, path)


# -- models --------------------------------------------------------------------------------------------------------


def _add_models(verbs) -> None:
    p = verbs.add_parser(
        "models",
        help="the registered towers: dense params and training FLOPs; --table for the paper-shaped comparison",
        description="List the registered dense towers with their parameter count and training FLOPs per sample "
        "(forward + backward, counted on the meta device) for the inputs of a run config. --table prints the "
        "paper-shaped HyFormer / LONGER+RankMixer / unified comparison next to the HyFormer paper's Table 1.",
    )
    p.add_argument("--config", type=Path, default=Path("jobs/configs/default.toml"),
                   help="run config whose feature spec sets the input shapes")
    p.add_argument("--table", action="store_true", help="paper-shaped params/FLOPs table with the paper's figures")
    p.set_defaults(func=_models)


def _models(args) -> int:
    from models import MODELS
    from models.accounting import model_cost, paper_table

    if args.table:
        print(paper_table())
        return 0
    from pipeline.config import load_config

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


# -- bench ---------------------------------------------------------------------------------------------------------

# name -> (module under bench/, one-line help); each module has add_arguments(parser) and run(args) -> int
BENCHES = {
    "async": ("bench.async_bench", "sync vs one-step-stale allreduce: step time, hidden share, AUC parity"),
    "overlap": ("bench.overlap", "the share of the dense allreduce the stale hook hides: a tower alone, CPU or GPU, "
                                 "torch only"),
    "dedup": ("bench.dedup", "plain vs deduplicated sequence lookup: time and host->device bytes per unique ratio"),
    "reader": ("bench.reader", "DayReader rows/s against a raw pyarrow scan of the same files and columns"),
}


def _add_bench(verbs) -> None:
    p = verbs.add_parser(
        "bench",
        help="benchmarks that print ratios measured side by side in one run",
        description="Benchmarks print ratios measured side by side in one run (absolute times on a shared "
        "machine are noise; ratios of neighbours are not).",
    )
    kinds = p.add_subparsers(title="benchmarks", metavar="<benchmark>")
    for name, (module, help_text) in BENCHES.items():
        sub = kinds.add_parser(name, help=help_text, description=help_text,
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.set_defaults(func=_run_bench, bench_module=module)
        import importlib

        importlib.import_module(module).add_arguments(sub)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _run_bench(args) -> int:
    import importlib

    return importlib.import_module(args.bench_module).run(args)


def _relaunch_with_torchrun(nproc: int) -> int:
    """Re-run this very command under torchrun with `nproc` local ranks (single node)."""
    from torch.distributed.run import main as torchrun

    argv = [a for a in sys.argv[1:]]
    i = next(i for i, a in enumerate(argv) if a.startswith("--nproc-per-node"))
    del argv[i:i + (1 if "=" in argv[i] else 2)]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torchrun(["--standalone", f"--nproc_per_node={nproc}", "-m", "pipeline.cli", *argv])
    return 0


def _setup_logging(args) -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None else ""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("hyrank", "pipeline", "embeddings", "models", "jobs"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:
        silence_known_noise()


# Known-harmless messages from TorchRec / torch on this stack (../shared/docs/torchrec-on-cpu.md, pitfall 17).
_NOISE = ("Sharding spec not found", "is_fx_tracing will return true", "topology was constructed directly")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_NOISE) and "is_fx_tracing" not in record.getMessage()


def silence_known_noise() -> None:
    """Drop the stack's harmless warnings so that a user sees hyrank's own messages."""
    for name in ("torchrec", "torch.distributed", "torch.fx", "fbgemm_gpu"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
    warnings.filterwarnings("ignore", message=".*an autograd kernel was not registered.*")
    warnings.filterwarnings("ignore", message=".*NumPy array is not writable.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="torchrec")


if __name__ == "__main__":
    sys.exit(main())
