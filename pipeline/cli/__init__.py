"""`hyrank <verb>`: the command line of the hyrank training pipeline. Each verb parses its arguments, loads the
config, makes one call and prints; the verbs live beside this front door by what they run:

    run.py       train, stream, evaluate, export: the jobs that train and publish (launch torchrun themselves)
    tools.py     gen-logs, models, report, bench (a benchmark's module is imported only when it runs)
    check.py     check: a run's feature spec against its logs
    importers.py import: public datasets as day-partitioned logs
    jobs.py      submit, status, logs: torchx
    serving.py   serve, predict

    hyrank gen-logs --out data/synth --days 4       # 150k rows a day (--rows-per-day, --long-len)
    hyrank stream --config jobs/configs/default.toml --nproc-per-node 2
    hyrank <verb> --help
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
from pathlib import Path

from hyrank.pipeline.logs import setup_logging

EPILOG = """\
A typical day-one session:
  hyrank gen-logs --out data/synth --days 4                       # synthetic click logs (the built-in data)
  hyrank stream --config jobs/configs/default.toml --nproc-per-node 2      # train day after day, evaluate first
  hyrank export --checkpoint "runs/default/checkpoints/$(cat runs/default/checkpoints/latest)" --out exports/default
  hyrank serve --artifact exports/default --port 8080             # JSON rows in, probabilities out

Configs are TOML files (jobs/configs/*.toml); change any value without editing a file with
--set section.key=value (e.g. --set train.lr=0.01 --set model.options.hidden=[128,64]).
"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unparsed = parser.parse_known_args(argv)
    if hasattr(args, "unparsed_args"):  # a verb that parses the rest itself (a benchmark: tools.add_bench)
        args.unparsed_args = unparsed
    elif unparsed:
        parser.error(f"unrecognized arguments: {' '.join(unparsed)}")  # what parse_args would say
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    setup_logging(verbose=args.verbose)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        if not report_rank_error(e):
            logging.getLogger("hyrank").error("%s", e)
        return 2


def report_rank_error(e: BaseException) -> bool:
    """On a rank that `hyrank ... --nproc-per-node N` launched: hand the error to the launcher, which prints it
    once for all ranks (pipeline/cli/run.py), and append the full traceback to `$HYRANK_LOG_DIR/rank-R.log`.
    False elsewhere (a rank of a plain torchrun or torchx job, or no rank): the caller prints the line itself."""
    error_file, log_dir = os.environ.get("TORCHELASTIC_ERROR_FILE"), os.environ.get("HYRANK_LOG_DIR")
    if not (error_file and log_dir):
        return False
    import time
    import traceback

    from hyrank.pipeline.train.run_lock import RunDirInUse

    log_file = None
    if not isinstance(e, RunDirInUse):  # a start refused by the run's holder writes nothing into that run
        log_file = Path(log_dir) / f"rank-{os.environ.get('RANK', '0')}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {' '.join(sys.argv)}\n")
            f.write("".join(traceback.format_exception(e)) + "\n")
    with open(error_file, "w") as f:  # torchelastic's error file: ChildFailedError.failures[rank].message
        json.dump({"message": str(e), "timestamp": int(time.time()), "hyrank": True,
                   "log": str(log_file) if log_file else None}, f)
    return True


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
    from hyrank.pipeline.cli import check, importers, jobs, run, serving, tools

    tools.add_gen_logs(verbs)
    importers.add_verbs(verbs)
    check.add_verbs(verbs)
    run.add_train(verbs)
    run.add_stream(verbs)
    run.add_evaluate(verbs)
    run.add_export(verbs)
    serving.add_verbs(verbs)
    tools.add_models(verbs)
    tools.add_report(verbs)
    tools.add_bench(verbs)
    jobs.add_job_verbs(verbs, verb)  # submit, status, logs (imports torchx only when they run)
    return parser


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written (their examples keep their lines), options with their defaults (when they have one:
    no "(default: None)" noise)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, False, []):
            return action.help
        return super()._get_help_string(action)


def verb(verbs, name: str, handler) -> argparse.ArgumentParser:
    """The parser of a verb run by `handler`: its docstring's first line is the one-line help, all of it the
    description, examples included (so the text that teaches a verb sits beside the code that runs it)."""
    doc = inspect.cleandoc(handler.__doc__)
    p = verbs.add_parser(name, help=doc.splitlines()[0].rstrip("."), description=doc, formatter_class=_HelpFormatter)
    p.set_defaults(func=handler)
    return p


