"""The verbs that run training jobs: train, stream, evaluate, export. Under torchrun they run as ranks; with
--nproc-per-node N they launch that torchrun job themselves on this machine (pipeline/distributed/launch.py: each
verb hands its pre-launch check and its job to one Launcher)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from hyrank.pipeline.cli import verb
from hyrank.pipeline.serving.publish import QUALITY_MARGIN
from hyrank.pipeline.storage import location, size


# -- train ---------------------------------------------------------------------------------------------------------


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """What every verb that runs training takes: the config, overrides, local ranks, quiet."""
    p.add_argument("--config", required=True, type=Path, help="run config (TOML), e.g. jobs/configs/default.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.01 (repeatable)")
    _add_launch_arguments(p)
    p.add_argument("--unset", dest="unsets", action="append", default=[], metavar="KEY",
                   help="remove a key the config inherits through `extends`, e.g. --unset features.group (the "
                   "field falls back to its default; in a file: unset = [\"features.group\"]) (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_launch_arguments(p: argparse.ArgumentParser) -> None:
    from hyrank.pipeline.distributed.launch import add_launch_arguments

    add_launch_arguments(p)


def _launcher(args, cfg, resume_hint: str = ""):
    from hyrank.pipeline.distributed.launch import Launcher

    return Launcher.from_args(args, out_dir=cfg.out_dir if cfg is not None else None, resume_hint=resume_hint)


def _load(args):
    from hyrank.pipeline.config import load_config

    return load_config(args.config, args.overrides, args.unsets)


def _schema_check(cfg, days: list):
    """The pre-launch check of a job verb: the feature spec against the footers of `days` (hyrank check's schema
    part: seconds), so a wrong column stops the job in one line before any rank builds a sharding plan."""
    def check(world_size: int, log_warnings: bool) -> None:
        from hyrank.pipeline.data.check import require_schema

        require_schema(cfg.features, days, options=cfg.data, world_size=world_size, log_warnings=log_warnings)

    return check


def add_train(verbs) -> None:
    p = verb(verbs, "train", _train)
    _add_run_arguments(p)
    p.add_argument("--days", required=True, help="training days: YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD")
    p.add_argument("--eval-days", "--eval-day", dest="eval_days", action="append", default=[], metavar="A..B",
                   help="evaluate on these days after training, as one set: exact AUC over all their rows, "
                   "query-level AUC per group across the days (repeatable: one result per span)")
    p.add_argument("--valid-days", metavar="A..B",
                   help="validation span, evaluated after each pass (train.passes): the best pass by "
                   "checkpoint.best_metric is kept and is the model --eval-days are scored with; train.patience "
                   "passes without a better one stop the run")
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
    on --eval-days. Bounded data (a data set of its own, not daily logs) takes several passes (train.passes) and
    a validation span that picks the pass to keep (--valid-days, train.patience). Runs on every rank of a torchrun
    job; with --nproc-per-node N it launches that job itself on this machine, after checking the feature spec
    against the files (hyrank check's schema part).

    Examples:
      hyrank train --config jobs/configs/default.toml --days 2026-11-01..2026-11-03 --eval-days 2026-11-04 \\
          --nproc-per-node 2 --set train.lr=0.002
      hyrank train --config jobs/configs/default.toml --days 2026-11-01..2026-11-05 --nproc-per-node 2 \\
          --resume latest      # after a stop
      hyrank train --config jobs/configs/movielens.toml --days 1997-09-20..1998-03-07 \\
          --valid-days 1998-03-08..1998-03-31 --eval-days 1998-04-01..1998-04-22 --set train.passes=5

    A run that stopped (SIGTERM, a crash) continues with the same command and --resume latest, mid-pass and
    mid-day included.
    """
    cfg = _load(args)
    launcher = _launcher(args, cfg, resume_hint="and --resume latest")
    day_texts = [args.days, *args.eval_days, *([args.valid_days] if args.valid_days else [])]

    def train(env) -> int:
        from hyrank.pipeline.train.resume import check_resumable
        from hyrank.pipeline.train.trainer import RunPlan, Trainer

        days = _training_days(cfg.data, args.days)
        eval_days = [_span(cfg.data, text, "--eval-days") for text in args.eval_days]
        valid = _span(cfg.data, args.valid_days, "--valid-days") if args.valid_days else None
        plan = RunPlan(days, eval_days, resume=args.resume or ("latest-if-any" if launcher.restarted else None),
                       trust_checkpoint=args.trust_checkpoint, valid_days=valid)
        check_resumable(cfg, plan.resume)  # before any collective: a checkpoint of another model, with its diff
        trainer = Trainer(cfg, env, progress=not args.quiet)
        result = trainer.run(plan)
        trainer.close()
        if env.is_main:
            _print_result(result, cfg.out_dir, resume_hint="and --resume latest")
            if result.valid:
                from hyrank.pipeline.pass_report import write_pass_report

                report = write_pass_report(Path(cfg.out_dir))
                print(f"validation curve: {report.csv_path} and {report.png_path}")
        return 0

    return launcher.run(job=train, check=_schema_check(cfg, _scan(cfg.data, day_texts)), backend=cfg.train.backend,
                        timeout_s=cfg.train.pg_timeout_s)


def _training_days(d, days: str) -> list:
    """The days of `--days` to train on, `d` being cfg.data. Before any training, one warning names every day of
    the range that is missing or incomplete and why (pipeline.data.days.discover_days): a range with holes is
    not trained across the gap without a word. None left to train on is an error."""
    from hyrank.pipeline.data.days import DayRange, discover_days

    found = discover_days(d.root, DayRange.parse(days), partition_key=d.partition_key,
                          require_success=d.require_success)
    if not found:
        raise FileNotFoundError(f"no complete day in {days} under {d.root}")
    return found


def _span(d, text: str, what: str):
    """The days of `text` (YYYY-MM-DD or A..B) under cfg.data `d`, read as one set; missing days are named in a
    warning, none at all is an error."""
    from hyrank.pipeline.data.days import DayRange, as_span, discover_days

    found = discover_days(d.root, DayRange.parse(text), partition_key=d.partition_key,
                          require_success=d.require_success)
    if not found:
        raise FileNotFoundError(f"{what} {text}: no complete day under {d.root}")
    return as_span(found)


def _scan(d, day_texts: list[str]) -> list:
    """The complete days of these texts (YYYY-MM-DD or A..B) under cfg.data `d`, without a word about missing ones
    (the ranks say that once)."""
    from hyrank.pipeline.data.days import DayRange, scan_days

    return [day for text in day_texts for day in scan_days(
        d.root, DayRange.parse(text), partition_key=d.partition_key, require_success=d.require_success).found]


def _print_result(result, out_dir: str, resume_hint: str = "") -> None:
    passes = len({s.pass_index for s in result.trained}) > 1
    for s in result.trained:
        where = f"pass {s.pass_index + 1} " if passes else ""
        print(f"train {where}{s.day}: {s.steps} steps, {s.rows} rows, mean loss {s.mean_loss:.4f}, "
              f"{s.rows_per_s:,.0f} rows/s")
    for v in result.valid:
        query = "n/a" if v["query_auc"] is None else f"{v['query_auc']:.4f}"
        print(f"valid pass {v['pass'] + 1} ({v['days']}): AUC {v['auc']:.4f}, query-AUC {query}, "
              f"logloss {v['logloss']:.4f}")
    if result.early_stop:
        print(result.early_stop)
    if result.best is not None:
        print(f"kept pass {result.best['pass'] + 1}: checkpoint {result.best['checkpoint']} (metrics/best.json)")
    for day, m in result.metrics.items():
        print(f"eval {day}: {m.summary()}")
    if result.metrics:
        print(f"outputs: {out_dir} (config.resolved.toml, train/, metrics/, tensorboard/, checkpoints/)")
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
    if result.stopped:
        print(f"stopped by {result.stopped}: continue with the same command{' ' + resume_hint if resume_hint else ''}")


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
    p.add_argument("--export-to", type=location, help="publish each day's model to this root (hyrank export's "
                   "parity gate, and a quality gate against the published one)")
    p.add_argument("--quality-margin", type=float, default=QUALITY_MARGIN,
                   help="with --export-to: do not publish a model whose held-out AUC is more than this below the "
                   "published one's on the same rows")
    p.add_argument("--export-delta", type=int, default=0, metavar="N",
                   help="with --export-to: publish each day as a delta of the version `latest` names (the table rows "
                   "and remap slots that changed, the dense weights: hyrank export --delta-from), and in full once "
                   "N deltas lie on the last full export (0: always in full)")
    p.add_argument("--eval-days", dest="eval_days", action="append", default=[], metavar="A..B",
                   help="once the stream stops (--until reached, or no --follow and no complete day left), evaluate "
                   "the model on these days as one set (repeatable: one result per span)")
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
      hyrank stream --config ... --until 2026-11-20 --eval-days 2026-11-21..2026-11-30   # then a held-out span

    Outputs under out_dir: report/days.csv + days.png, status.json, history.jsonl (every start, every skipped
    day), ledger/, checkpoints/, metrics/progressive-<day>.json.
    """
    cfg = _load(args)
    until = args.until or (args.first and dt.date.today())
    # the stream from wherever its checkpoint stands: the newest day shows a spec that does not fit
    days = _scan(cfg.data, ([f"{args.first}..{until}"] if args.first else []) + args.eval_days) or _newest_day(cfg.data)

    def stream_days(env) -> int:
        from hyrank.pipeline.stream import StreamOptions, stream

        options = StreamOptions(first=args.first, until=args.until, follow=args.follow, skip_gaps=args.skip_gaps,
                                poll_s=args.poll_s, max_poll_s=args.max_poll_s, warm_start=args.warm_start,
                                export_to=args.export_to, quality_margin=args.quality_margin,
                                export_delta=args.export_delta,
                                eval_days=tuple(_span(cfg.data, text, "--eval-days") for text in args.eval_days))
        result = stream(cfg, env, options, progress=not args.quiet)
        if env.is_main:
            for day, m in result.progressive.items():
                print(f"{day}: progressive {m.summary()}" if m is not None
                      else f"{day}: no progressive metric (the first day of a fresh run has no model yet)")
            _print_result(result, cfg.out_dir)
            print(f"report: {Path(cfg.out_dir) / 'report' / 'days.csv'} and days.png; status: "
                  f"{Path(cfg.out_dir) / 'status.json'}")
        return 0

    # a stream always continues from its own latest checkpoint: the same command, nothing to add
    return _launcher(args, cfg).run(job=stream_days, check=_schema_check(cfg, days), backend=cfg.train.backend,
                                    timeout_s=cfg.train.pg_timeout_s)


# -- evaluate ------------------------------------------------------------------------------------------------------


def add_evaluate(verbs) -> None:
    p = verb(verbs, "evaluate", _evaluate)
    p.add_argument("--checkpoint", required=True, type=location, help="a checkpoint folder (step-N), e.g. "
                   "runs/default/checkpoints/step-000002344, or a file naming one: a run's checkpoints/latest, or "
                   "the metrics/best.json of a run with --valid-days (its best pass)")
    p.add_argument("--days", required=True, action="append", metavar="A..B",
                   help="days to evaluate as one set (repeatable: one result per span)")
    p.add_argument("--config", type=Path, help="run config to read the data with (default: the one the checkpoint "
                   "was trained with, from its meta.json); its model must be the checkpoint's")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.root=/logs/other (repeatable)")
    p.add_argument("--unset", dest="unsets", action="append", default=[], metavar="KEY",
                   help="remove a config key, e.g. --unset features.group (repeatable)")
    p.add_argument("--out", type=Path, help="also write the metrics here as JSON")
    _add_launch_arguments(p)
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a checkpoint outside the config's checkpoint.dir (DCP unpickles what it finds)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _evaluate(args) -> int:
    """Evaluate a checkpoint on a span of days: exact metrics over all of its rows.

    The same code as train's --eval-days (Trainer.evaluate): AUC over every row of the span, query-level AUC per
    group across its days, logloss, NE, calibration, and the oracle AUC where the data has one. Metrics that do not
    apply say so (no group column: query-AUC n/a). Reads nothing but the checkpoint and the days: it can run beside
    the job that is training the same run.

    Examples:
      hyrank evaluate --checkpoint runs/default/checkpoints/latest --days 2026-11-04
      hyrank evaluate --checkpoint runs/movielens/metrics/best.json --days 1998-04-01..1998-04-22 \\
          --days 1998-03-08..1998-03-31 --out test-metrics.json
    """
    checkpoint = _resolve_checkpoint(args.checkpoint)
    from hyrank.pipeline.config import with_values

    cfg = with_values(_checkpoint_config(args, checkpoint), {"train.tensorboard": False})  # writes nothing into the run

    def evaluate(env) -> int:
        from hyrank.pipeline.files import write_json
        from hyrank.pipeline.train.trainer import Trainer

        spans = [_span(cfg.data, text, "--days") for text in args.days]
        trainer = Trainer(cfg, env, progress=not args.quiet)
        trainer.checkpointer.load(checkpoint, trust=args.trust_checkpoint)
        results = {span.label: trainer.evaluate(span, kind="evaluate") for span in spans}
        trainer.close()
        if env.is_main:
            for label, m in results.items():
                print(f"evaluate {label} with {checkpoint.name} (step {trainer.global_step}): {m.summary()}")
            if args.out:
                write_json(args.out, {"checkpoint": str(checkpoint), "step": trainer.global_step,
                                      "metrics": {label: m.to_dict() for label, m in results.items()}})
        return 0

    # reads the checkpoint and the days, writes nothing into the run: no run folder, no log folder
    return _launcher(args, None).run(job=evaluate, backend=cfg.train.backend, timeout_s=cfg.train.pg_timeout_s)


def _resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder as given, or the one a pointer file names: a run's `checkpoints/latest`, or the
    `metrics/best.json` of a run with --valid-days."""
    if not path.is_file():
        return path
    if path.suffix == ".json":
        picked = json.loads(path.read_text()).get("checkpoint")
        if not picked:
            raise ValueError(f"{path} names no checkpoint (expected a run's metrics/best.json)")
        return location(picked)
    return path.parent / path.read_text().strip()


def _checkpoint_config(args, checkpoint: Path):
    """--config (with --set / --unset), or the config saved in the checkpoint's meta.json."""
    from hyrank.pipeline.config import RunConfig, apply_override, from_dict, unset_key

    if args.config:
        return _load(args)
    from hyrank.pipeline.train.checkpoint import read_meta

    raw = read_meta(checkpoint).config
    for item in args.overrides:
        apply_override(raw, item, source=f"{checkpoint}/meta.json")
    for key in args.unsets:
        unset_key(raw, key, source="--unset")
    return from_dict(RunConfig, raw, source=f"{checkpoint}/meta.json")


# -- export --------------------------------------------------------------------------------------------------------


def add_export(verbs) -> None:
    p = verb(verbs, "export", _export)
    p.add_argument("--checkpoint", required=True, type=location,
                   help="a checkpoint folder (step-N) written on any number of ranks, where its run keeps it (the "
                   "checkpoint folder its config names); anywhere else needs --trust-checkpoint")
    p.add_argument("--out", required=True, type=location,
                   help="publish root: versions/<run id>-step-N/, `latest`, history.jsonl")
    p.add_argument("--quality-margin", type=float, default=QUALITY_MARGIN,
                   help="do not publish a model whose held-out AUC is more than this below that of the version "
                   "`latest` names, on the same rows (as stream --export-to)")
    p.add_argument("--skip-quality-gate", action="store_true",
                   help="publish without comparing with the published version: recorded, with who chose it, in the "
                   "manifest and the root's history.jsonl")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a checkpoint that is not where its run keeps it: a checkpoint is code (DCP unpickles "
                   "it), so only for checkpoints whose writer you trust")
    p.add_argument("--tables", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="table precision: fp16, or int8 row-wise (a scale and bias per row), each gated against "
                   "the fp32 model on the held-out rows (pipeline/serving/export.py QUANTIZATION_BOUNDS)")
    p.add_argument("--holdout", type=int, default=2048, help="held-out rows the parity gate scores both ways")
    p.add_argument("--delta-from", metavar="VERSION",
                   help="publish a delta of this version of --out (its base): only the table rows and managed remap "
                   "slots that changed since, and the dense weights; a server loads the base, then the delta; the "
                   "gates score it so (pipeline/serving/delta.py)")
    p.add_argument("--aoti", action="store_true",
                   help="also an AOTInductor package (model.aoti.pt2) for a C++ runtime, under the same parity gate "
                   "(fp32 tables; about a minute and a half of compiling for a small model on CPU)")


def _export(args) -> int:
    """Export a checkpoint to a serving artifact, check it scores like the model and no worse than the published
    one, publish it atomically.

    One process, no GPU or process group needed: the checkpoint's tables are gathered whole, the model is traced
    with torch.export (model.pt2, with manifest.json: model, feature spec and its Arrow types, days trained, the
    stack's versions, git commit, sha256 of every file), loaded back as a server loads it, and held-out rows are
    scored through it and through the eager model. Beyond the tolerance (fp32: 1e-5 on logits) nothing is
    published; nor when its held-out AUC is more than --quality-margin below that of the version `latest` names
    (--skip-quality-gate publishes anyway, recorded). Else the version folder, versions/<run id>-step-N, is renamed
    into place and `latest` repointed. A published version is never rewritten: the same checkpoint exported again
    is left as it is. Every publish and refusal is a line of the root's history.jsonl. --delta-from VERSION publishes
    only what changed since that published version (a server loads it on top of its base).

    Examples:
      hyrank export --checkpoint runs/default/checkpoints/step-000002344 --out exports/default
      hyrank export --checkpoint "runs/default/checkpoints/$(cat runs/default/checkpoints/latest)" --out exports/default
      hyrank export --checkpoint /mnt/shared/step-000002344 --out exports/default --trust-checkpoint
      hyrank export --checkpoint runs/drift/checkpoints/step-000004688 --out exports/drift \
          --delta-from "$(cat exports/drift/latest)"
    """
    from hyrank.pipeline.serving.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out, tables=args.tables, holdout=args.holdout, aoti=args.aoti,
                               quality_margin=args.quality_margin, skip_quality_gate=args.skip_quality_gate,
                               trust_checkpoint=args.trust_checkpoint, delta_from=args.delta_from)
    if result.already_published:
        pointer = args.out / "latest"
        latest = pointer.read_text().strip() if pointer.is_file() else "nothing"
        print(f"{result.version} is already published ({result.path}) from this checkpoint: left as it is; "
              f"{pointer} names {latest}")
        return 0
    p, gate = result.parity, result.quality_gate
    print(f"published {result.path} ({args.out / 'latest'} -> {result.version})")
    if args.delta_from:
        carries = json.loads((result.path / "manifest.json").read_text())["delta"]["carries"]
        print(f"a delta of {args.delta_from}: {carries['rows']} table rows, {carries['remapped_slots']} remap slots, "
              f"{carries['whole_tensors']} whole tensors; {_bytes(result.path)} bytes")
    if "auc_published" in gate:
        print(f"quality gate: AUC {gate['auc']:.4f} against the published {gate['published']}'s "
              f"{gate['auc_published']:.4f} on the same rows (margin {gate['margin']:g})")
    else:
        print(f"quality gate: {gate['result']}")
    print(f"parity on {p['rows']} held-out rows of {p['day']}: max |logit diff| {p['max_abs_logit_diff']:.3g} "
          f"(tolerance {p['tolerance']:g}), AUC model {p['auc_model']:.4f} artifact {p['auc_artifact']:.4f}")
    if "aoti_max_abs_logit_diff" in p:
        print(f"AOTInductor package: max |logit diff| {p['aoti_max_abs_logit_diff']:.3g} on the same rows")
    if "auc_fp32" in p:
        print(f"{p['tables']} tables against fp32: max |logit diff| {p['max_abs_logit_diff_vs_fp32']:.3g}, AUC "
              f"{p['auc_fp32']:.4f} -> {p['auc_artifact']:.4f} (bounds {p['bound']})")
    return 0


def _newest_day(d) -> list:
    """The newest complete day under cfg.data `d`, if any (a stream may start before its first day exists)."""
    from hyrank.pipeline.data.days import scan_days

    if not Path(d.root).is_dir():
        return []
    return scan_days(d.root, partition_key=d.partition_key, require_success=d.require_success).found[-1:]


def _bytes(folder) -> int:
    return sum(size(p) for p in folder.iterdir() if p.is_file())
