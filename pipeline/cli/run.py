"""The verbs that run training jobs: train, stream, export. Under torchrun (TORCHELASTIC_RUN_ID) they run as ranks;
with --nproc-per-node N they launch that torchrun job themselves on this machine."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import time
from pathlib import Path

from pipeline.cli import verb


# -- train ---------------------------------------------------------------------------------------------------------


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """What every verb that runs training takes: the config, overrides, local ranks, quiet."""
    p.add_argument("--config", required=True, type=Path, help="run config (TOML), e.g. jobs/configs/default.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.01 (repeatable)")
    p.add_argument("--nproc-per-node", type=int, default=0,
                   help="launch N local ranks with torchrun (default: run in this process / the current torchrun job)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_train(verbs) -> None:
    p = verb(verbs, "train", _train)
    _add_run_arguments(p)
    p.add_argument("--days", required=True, help="training days: YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD")
    p.add_argument("--eval-day", help="evaluation day YYYY-MM-DD (default: none)")
    p.add_argument("--resume", metavar="latest|PATH",
                   help="continue from a checkpoint: 'latest' under checkpoint.dir, or a step-N folder. Finished "
                   "days are skipped and a day stopped part-way continues from its reader cursor. A torchelastic "
                   "restart (--max-restarts) resumes from 'latest' by itself. 'latest' skips, with a warning, "
                   "checkpoints that fail their checksums or do not load")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow --resume PATH outside checkpoint.dir: a checkpoint is code (DCP unpickles it), so "
                   "only for checkpoints whose writer you trust")


def _train(args) -> int:
    """Train on a range of days, evaluate on another.

    Trains the configured model on --days and reports exact metrics (AUC, query-level AUC, logloss, calibration)
    on --eval-day. Runs on every rank of a torchrun job; with --nproc-per-node N it launches that job itself on
    this machine.

    Examples:
      hyrank train --config jobs/configs/default.toml --days 2026-11-01..2026-11-03 --eval-day 2026-11-04 \\
          --nproc-per-node 2 --set train.lr=0.002
      hyrank train --config jobs/configs/default.toml --days 2026-11-01..2026-11-05 --nproc-per-node 2 \\
          --resume latest      # after a stop
    """
    if args.nproc_per_node and "TORCHELASTIC_RUN_ID" not in os.environ:
        return _relaunch_with_torchrun(args.nproc_per_node)
    import torch.distributed as dist

    from pipeline.config import load_config
    from pipeline.data.days import find_day
    from pipeline.distributed.env import init_distributed
    from pipeline.train.resume import check_resumable
    from pipeline.train.trainer import RunPlan, Trainer

    cfg = load_config(args.config, args.overrides)
    d = cfg.data
    days = _training_days(d, args.days)
    eval_days = [find_day(d.root, dt.date.fromisoformat(args.eval_day), partition_key=d.partition_key,
                          require_success=d.require_success)] if args.eval_day else []
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0  # resumes from its own checkpoints
    plan = RunPlan(days, eval_days, resume=args.resume or ("latest-if-any" if restarted else None),
                   trust_checkpoint=args.trust_checkpoint)
    check_resumable(cfg, plan.resume)  # before any collective: a checkpoint of another model, with its diff
    env = init_distributed(cfg.train.backend, cfg.train.pg_timeout_s)
    trainer = Trainer(cfg, env, progress=not args.quiet)
    result = trainer.run(plan)
    trainer.close()
    if env.is_main:
        _print_result(result, cfg.out_dir)
    dist.destroy_process_group()
    return 0


def _training_days(d, days: str) -> list:
    """The days of `--days` to train on, `d` being cfg.data. Before any training, one warning names every day of
    the range that is missing or incomplete and why (pipeline.data.days.discover_days): a range with holes is
    not trained across the gap without a word. None left to train on is an error."""
    from pipeline.data.days import DayRange, discover_days

    found = discover_days(d.root, DayRange.parse(days), partition_key=d.partition_key,
                          require_success=d.require_success)
    if not found:
        raise FileNotFoundError(f"no complete day in {days} under {d.root}")
    return found


def _print_result(result, out_dir: str) -> None:
    for s in result.trained:
        print(f"train {s.day}: {s.steps} steps, {s.rows} rows, mean loss {s.mean_loss:.4f}, {s.rows_per_s:,.0f} rows/s")
    for day, m in result.metrics.items():
        oracle = f" (oracle AUC {m.oracle_auc:.4f})" if m.oracle_auc is not None else ""
        print(f"eval {day}: AUC {m.auc:.4f}{oracle}, query-AUC {m.query_auc:.4f} over {m.num_queries} queries, "
              f"logloss {m.logloss:.4f}, NE {m.ne:.4f}, calibration {m.calibration:.3f}")
    if result.metrics:
        print(f"outputs: {out_dir} (config.resolved.toml, train/, metrics/, tensorboard/, checkpoints/)")
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
    if result.stopped:
        print(f"stopped by {result.stopped}: continue with the same command and --resume latest")


# -- stream --------------------------------------------------------------------------------------------------------


def add_stream(verbs) -> None:
    p = verb(verbs, "stream", _stream)
    _add_run_arguments(p)
    p.add_argument("--from", dest="first", type=dt.date.fromisoformat,
                   help="first day of a fresh run, YYYY-MM-DD (default: the earliest complete day)")
    p.add_argument("--until", type=dt.date.fromisoformat, help="last day to train, YYYY-MM-DD (default: none)")
    p.add_argument("--follow", action="store_true", help="wait for days that are not complete yet (bounded back-off)")
    p.add_argument("--skip-gaps", action="store_true",
                   help="skip a missing or incomplete day once a later day is complete (logged in history.jsonl)")
    p.add_argument("--poll-s", type=float, default=5.0, help="first wait between looks at the data root")
    p.add_argument("--max-poll-s", type=float, default=60.0, help="longest wait between looks")
    p.add_argument("--export-to", type=Path, help="publish each day's model to this root (hyrank export's "
                   "parity gate, and a quality gate against the published one)")
    p.add_argument("--quality-margin", type=float, default=0.01,
                   help="with --export-to: do not publish a model whose held-out AUC is more than this below the "
                   "published one's on the same rows")
    p.add_argument("--warm-start", choices=["dense", "tables", "matching"],
                   help="the run's latest checkpoint is of another model (a table added or resized, the tower "
                   "changed): start this model from its dense weights, its tables, or every tensor whose name and "
                   "shape match, instead of refusing (optimizer state starts fresh)")


def _stream(args) -> int:
    """Retrain day after day: evaluate each complete day with the current model, then train on it.

    Progressive validation: each day's metrics are those of the model before it saw the day. Warm-starts from the
    run's latest checkpoint, so the same command continues after any stop or crash and trains every row once
    (ledger/ records which rows each rank trained). After each day: report/days.csv and days.png, status.json.

    Examples:
      hyrank stream --config jobs/configs/default.toml --nproc-per-node 2
      hyrank stream --config jobs/configs/default.toml --nproc-per-node 2 --follow    # and keep following
      hyrank stream --config ... --from 2026-11-01 --until 2026-11-30 --skip-gaps

    Outputs under out_dir: report/days.csv + days.png, status.json, history.jsonl (every start, every skipped
    day), ledger/, checkpoints/, metrics/progressive-<day>.json.
    """
    if args.nproc_per_node and "TORCHELASTIC_RUN_ID" not in os.environ:
        return _relaunch_with_torchrun(args.nproc_per_node)
    import torch.distributed as dist

    from pipeline.config import load_config
    from pipeline.distributed.env import init_distributed
    from pipeline.stream import StreamOptions, stream

    cfg = load_config(args.config, args.overrides)
    options = StreamOptions(first=args.first, until=args.until, follow=args.follow, skip_gaps=args.skip_gaps,
                            poll_s=args.poll_s, max_poll_s=args.max_poll_s, warm_start=args.warm_start,
                            export_to=args.export_to, quality_margin=args.quality_margin)
    env = init_distributed(cfg.train.backend, cfg.train.pg_timeout_s)
    result = stream(cfg, env, options, progress=not args.quiet)
    if env.is_main:
        for day, m in result.progressive.items():
            oracle = f" (oracle AUC {m.oracle_auc:.4f})" if m is not None and m.oracle_auc is not None else ""
            print(f"{day}: progressive AUC {m.auc:.4f}{oracle}, logloss {m.logloss:.4f}" if m is not None
                  else f"{day}: no progressive metric (the first day of a fresh run has no model yet)")
        _print_result(result, cfg.out_dir)
        print(f"report: {Path(cfg.out_dir) / 'report' / 'days.csv'} and days.png; status: "
              f"{Path(cfg.out_dir) / 'status.json'}")
    dist.destroy_process_group()
    return 0


# -- export --------------------------------------------------------------------------------------------------------


def add_export(verbs) -> None:
    p = verb(verbs, "export", _export)
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a checkpoint folder (step-N) written on any number of ranks; checkpoints are trusted input")
    p.add_argument("--out", required=True, type=Path, help="publish root: versions/<version>/ and `latest`")
    p.add_argument("--tables", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="table precision: fp16, or int8 row-wise (a scale and bias per row), each gated against "
                   "the fp32 model on the held-out rows (pipeline/serving/export.py QUANTIZATION_BOUNDS)")
    p.add_argument("--holdout", type=int, default=2048, help="held-out rows the parity gate scores both ways")
    p.add_argument("--aoti", action="store_true",
                   help="also an AOTInductor package (model.aoti.pt2) for a C++ runtime, under the same parity gate "
                   "(fp32 tables; about a minute and a half of compiling for a small model on CPU)")


def _export(args) -> int:
    """Export a checkpoint to a serving artifact, check it scores like the model, publish it atomically.

    One process, no GPU or process group needed: the checkpoint's tables are gathered whole, the model is traced
    with torch.export (model.pt2, with manifest.json: model, feature spec and its Arrow types, days trained, the
    stack's versions, git commit, sha256 of every file), loaded back as a server loads it, and held-out rows are
    scored through it and through the eager model. Beyond the tolerance (fp32: 1e-5 on logits) nothing is
    published; else the version folder is renamed into place and `latest` repointed.

    Examples:
      hyrank export --checkpoint runs/default/checkpoints/step-000002344 --out exports/default
      hyrank export --checkpoint "runs/default/checkpoints/$(cat runs/default/checkpoints/latest)" --out exports/default
    """
    from pipeline.serving.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out, tables=args.tables, holdout=args.holdout, aoti=args.aoti)
    p = result.parity
    print(f"published {result.path} ({args.out / 'latest'} -> {result.version})")
    print(f"parity on {p['rows']} held-out rows of {p['day']}: max |logit diff| {p['max_abs_logit_diff']:.3g} "
          f"(tolerance {p['tolerance']:g}), AUC model {p['auc_model']:.4f} artifact {p['auc_artifact']:.4f}")
    if "aoti_max_abs_logit_diff" in p:
        print(f"AOTInductor package: max |logit diff| {p['aoti_max_abs_logit_diff']:.3g} on the same rows")
    if "auc_fp32" in p:
        print(f"{p['tables']} tables against fp32: max |logit diff| {p['max_abs_logit_diff_vs_fp32']:.3g}, AUC "
              f"{p['auc_fp32']:.4f} -> {p['auc_artifact']:.4f} (bounds {p['bound']})")
    return 0


def _relaunch_with_torchrun(nproc: int) -> int:
    """Re-run this very command under torchrun with `nproc` local ranks (single node).

    SIGTERM / SIGINT to this process: torchelastic forwards it to the ranks, which finish their step and checkpoint
    (Trainer.run); this process then exits 0 if they recorded the stop (`<out_dir>/stopped.json`), 1 if not.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    argv = [a for a in sys.argv[1:]]
    i = next(i for i, a in enumerate(argv) if a.startswith("--nproc-per-node"))
    del argv[i:i + (1 if "=" in argv[i] else 2)]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.time()
    try:
        torchrun(["--standalone", f"--nproc_per_node={nproc}", "-m", "pipeline.cli", *argv])
    except SignalException as e:
        return _report_stop(e.sigval.name, started)
    return 0


def _report_stop(signal_name: str, since: float) -> int:
    """After the ranks were stopped by a signal: 0 if they checkpointed and recorded it, else 1."""
    from pipeline.cli import build_parser
    from pipeline.config import load_config

    args = build_parser().parse_args(sys.argv[1:])
    record = Path(load_config(args.config, args.overrides).out_dir) / "stopped.json"
    if record.is_file() and record.stat().st_mtime >= since:
        stop = json.loads(record.read_text())
        print(f"stopped by {signal_name} at step {stop['step']}: checkpoint {stop['checkpoint']}; continue with "
              "the same command and --resume latest")
        return 0
    logging.getLogger("hyrank").error("stopped by %s before the ranks could checkpoint", signal_name)
    return 1


