"""`hyrank <verb>`: the command line of the hyrank training pipeline. Each verb parses its arguments, loads the
config, makes one call and prints; the verbs live beside this front door by what they run:

    run.py       train, stream, evaluate, export: the jobs that train and publish (launch torchrun themselves)
    tools.py     gen-logs, models, plan, report, bench (a benchmark's module is imported only when it runs)
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
import logging

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
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback (a rank that
        logging.getLogger("hyrank").error("%s", e)  # a hyrank launcher started relays it instead: launch.py)
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
    tools.add_plan(verbs)
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


