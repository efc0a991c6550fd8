"""Model-quality tables: every (model, variant, seed) trained by a real `hyrank train` run, metrics read from its files.

    hyrank bench quality --config jobs/configs/movielens.toml --days 1997-09-20..1998-03-07 \\
        --valid-days 1998-03-08..1998-03-31 --eval-days 1998-04-01..1998-04-22 \\
        --models dlrm_mlp,hyformer --seeds 3 --set train.passes=6 --set train.patience=2 --set data.shuffle=true \\
        --variant base --variant emb_lr_0.05:embeddings.lr=0.05 --nproc 2 --json /tmp/q/ml.json --markdown /tmp/q/ml.md
    hyrank bench quality ... --models all --seeds 1            # every registered tower (models.MODELS)

Each run is `python -m hyrank.pipeline.cli train --config C --days ... --quiet [--nproc-per-node N] --set model.name=M
--set seed=S --set out_dir=<runs>/<M>-<variant>-s<S> ...`, one at a time, its output in `<runs>/<...>.log`. The
metrics come from the run's own files, not its output: `metrics/eval-<span>.json` (AUC, query-AUC, logloss and the
oracle AUC of synthetic data), `metrics/best.json` (the pass kept on --valid-days), `train/*.json` (rows/s over
every pass) and `config.resolved.toml` (dense parameters via models.accounting, embedding parameters from the
tables). A config whose `model.options` belong to another model gets `model.options={}` for every other tower
(its Config defaults); `--model-set M:KEY=VAL` gives one tower its own settings.

Override order, later wins: model.name (+ model.options={}), --set, --model-set of that model, the variant's,
then seed and out_dir. A variant is `NAME` (no change) or `NAME:KEY=VAL,KEY=VAL` (commas inside [..], {..} or
quotes belong to the value: `wide:model.options.hidden=[256,128]`).

Resumable: with --json, runs already recorded there as done are not rerun (a long table can be stopped and the
same command continues); a run that failed is rerun, and one stopped part-way continues from its checkpoint
(`--resume latest-if-any`). A recorded run whose settings differ from this command's is an error: name the
variant differently or use another --json. The table is mean +- standard error over seeds (s.e. = sample
standard deviation / sqrt(n); n/a for one seed); failed runs are skipped, listed with their log.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="run config, e.g. jobs/configs/movielens.toml")
    p.add_argument("--days", required=True, help="training days, A..B")
    p.add_argument("--valid-days", metavar="A..B", help="validation span choosing the pass to keep (train.passes)")
    p.add_argument("--eval-days", required=True, metavar="A..B", help="the span the table reports, as one set")
    p.add_argument("--models", default="dlrm_mlp", help="comma-separated towers, or 'all' (hyrank models)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of every (model, variant)")
    p.add_argument("--variant", dest="variants", action="append", default=[], metavar="NAME[:KEY=VAL,...]",
                   help="a named set of overrides (repeatable; default: one variant 'base' with none)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run (repeatable)")
    p.add_argument("--unset", dest="unsets", action="append", default=[], metavar="KEY",
                   help="config key removed for every run (repeatable)")
    p.add_argument("--model-set", dest="model_sets", action="append", default=[], metavar="MODEL:KEY=VALUE",
                   help="override for one tower's runs, e.g. hyformer:model.options.d_model=64 (repeatable)")
    p.add_argument("--nproc", type=int, default=2,
                   help="ranks per run: 0 runs the one rank in the train process itself, N >= 1 launches torchrun")
    p.add_argument("--runs-dir", type=Path,
                   help="where run folders and logs go (default: <json>-runs beside --json, else a new temp dir)")
    p.add_argument("--timeout-s", type=float, default=None, help="a run longer than this is stopped and failed")
    p.add_argument("--json", type=Path, help="the record: every run, the table; read back to skip done runs")
    p.add_argument("--markdown", type=Path, help="also write the table as markdown")


# -- command line pieces ---------------------------------------------------------------------------------------------


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """`text` split at `sep` outside brackets, braces and quotes: 'a=[1,2],b="x,y"' -> ['a=[1,2]', 'b="x,y"']."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth or quote:
        raise ValueError(f"unbalanced brackets or quotes in {text!r}")
    parts.append(text[start:])
    return [s.strip() for s in parts if s.strip()]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'NAME' or 'NAME:KEY=VAL,KEY=VAL' -> (NAME, ['KEY=VAL', ...])."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name or not all(c.isalnum() or c in "._-" for c in name):
        raise ValueError(f"--variant {text!r}: the name must be letters, digits, '.', '_' or '-'")
    sets = split_top_level(rest)
    bad = [s for s in sets if "=" not in s]
    if bad:
        raise ValueError(f"--variant {text!r}: {bad} is not KEY=VALUE")
    return name, sets


def parse_models(text: str) -> list[str]:
    from hyrank.models import MODELS

    names = list(MODELS) if text.strip() == "all" else split_top_level(text)
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        raise ValueError(f"--models: unknown tower(s) {unknown}; registered: {list(MODELS)} (or 'all')")
    return names


def parse_model_sets(items: list[str], models: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        model, _, kv = item.partition(":")
        if model not in models or "=" not in kv:
            raise ValueError(f"--model-set {item!r}: expected MODEL:KEY=VALUE with MODEL one of {models}")
        out.setdefault(model, []).append(kv)
    return out


def run_overrides(config_model: str, model: str, common: list[str], model_sets: list[str],
                  variant: list[str], seed: int) -> list[str]:
    """The --set list of one run (out_dir aside), in the order of precedence the module docstring gives."""
    switch = [f"model.name={model}"] + (["model.options={}"] if model != config_model else [])
    return [*switch, *common, *model_sets, *variant, f"seed={seed}", "train.tensorboard=false"]


# -- one run -----------------------------------------------------------------------------------------------------------


def train_command(args, overrides: list[str], out_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "hyrank.pipeline.cli", "train", "--config", str(args.config), "--days", args.days,
           "--eval-days", args.eval_days, "--quiet"]
    if args.valid_days:
        cmd += ["--valid-days", args.valid_days]
    if args.nproc > 0:
        cmd += ["--nproc-per-node", str(args.nproc)]
    if (out_dir / "checkpoints" / "latest").exists():  # stopped part-way before (same settings: check_folder)
        cmd += ["--resume", "latest-if-any"]
    for key in args.unsets:
        cmd += ["--unset", key]
    for item in [*overrides, f'out_dir="{out_dir}"']:
        cmd += ["--set", item]
    return cmd


def read_run(out_dir: Path, eval_days: str) -> dict:
    """A finished run's metrics from its files (see the module docstring); ValueError naming what is missing."""
    import json

    metrics_dir = out_dir / "metrics"
    path = metrics_dir / f"eval-{eval_days}.json"
    if not path.is_file():  # the span's label names the days found, which can be narrower than the text asked
        found = sorted(metrics_dir.glob("eval-*.json"))
        if len(found) != 1:
            raise ValueError(f"{out_dir}: no metrics/eval-{eval_days}.json (found {[p.name for p in found]})")
        path = found[0]
    m = json.loads(path.read_text())
    best = metrics_dir / "best.json"
    chosen = json.loads(best.read_text())["pass"] + 1 if best.is_file() else None
    trained = [json.loads(p.read_text()) for p in sorted((out_dir / "train").glob("*.json"))]
    seconds = sum(t["seconds"] for t in trained)
    rows = sum(t["rows"] for t in trained)
    return {"auc": m["auc"], "query_auc": m.get("query_auc"), "logloss": m["logloss"], "ne": m.get("ne"),
            "calibration": m.get("calibration"), "oracle_auc": m.get("oracle_auc"), "eval_rows": m.get("num_rows"),
            "eval_file": str(path), "chosen_pass": chosen, "passes_trained": len({t.get("pass", 0) for t in trained}),
            "train_rows": rows, "rows_per_s": rows / seconds if seconds > 0 else None, **run_params(out_dir)}


def run_params(out_dir: Path) -> dict:
    """Dense parameters and training FLOPs per row (models.accounting, on meta: every sequence full) and embedding
    parameters of the run's resolved config."""
    from hyrank.models.accounting import model_cost
    from hyrank.pipeline.config import load_config

    cfg = load_config(out_dir / "config.resolved.toml")
    cost = model_cost(cfg.model.name, cfg.model.options, cfg.features.input_shape())
    return {"dense_params": cost.params, "train_flops_per_row": cost.train_flops_per_sample,
            "embedding_params": sum(t.num_embeddings * t.dim for t in cfg.features.tables)}


def run_paths(runs_dir: Path, key: dict) -> tuple[Path, Path]:
    """The run folder and the log of one (model, variant, seed)."""
    name = f"{key['model']}-{key['variant']}-s{key['seed']}"
    return runs_dir / name, runs_dir / f"{name}.log"


def check_folder(out_dir: Path, overrides: list[str]) -> None:
    """A run folder left by an earlier command is continued only if it was started with the same settings
    (`bench-quality.json` in it): resuming another run's checkpoints would report that run's model."""
    import json

    marker = out_dir / MARKER
    if out_dir.exists() and any(out_dir.iterdir()):
        old = json.loads(marker.read_text()).get("overrides") if marker.is_file() else None
        if old != overrides:
            raise ValueError(f"{out_dir} holds a run with other settings ({old}, now {overrides}): delete the folder "
                             "or use another --runs-dir")


MARKER = "bench-quality.json"  # in each run folder: the overrides it was started with


def run_one(args, key: dict, overrides: list[str], runs_dir: Path) -> dict:
    """Train one (model, variant, seed) in a subprocess; its record, status 'ok' with metrics or 'failed'."""
    from hyrank.pipeline.files import write_json

    out_dir, log = run_paths(runs_dir, key)
    cmd = train_command(args, overrides, out_dir)
    env = dict(os.environ)
    if args.nproc >= 2:
        env.setdefault("OMP_NUM_THREADS", "1")
    record = {**key, "overrides": overrides, "out_dir": str(out_dir), "log": str(log), "command": cmd}
    start = time.perf_counter()
    write_json(out_dir / MARKER, {**key, "overrides": overrides})
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=args.timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = f"timed out after {args.timeout_s:g} s"
    record["wall_s"] = round(time.perf_counter() - start, 1)
    if rc != 0:
        return {**record, "status": "failed", "error": f"exit code {rc}" if isinstance(rc, int) else rc}
    try:
        return {**record, "status": "ok", **read_run(out_dir, args.eval_days)}
    except (ValueError, FileNotFoundError, KeyError) as e:
        return {**record, "status": "failed", "error": f"metrics unreadable: {e}"}


# -- the table ---------------------------------------------------------------------------------------------------------


def mean_se(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and standard error (sample std / sqrt(n)) of the values; (None, None) if any is None or none given,
    (mean, None) for one value."""
    if not values or any(v is None for v in values):
        return None, None
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (model, variant), in the order first run: mean +- s.e. over its successful seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["variant"]), [])
        if r["status"] == "ok":
            groups[(r["model"], r["variant"])].append(r)
    rows = []
    for (model, variant), ok in groups.items():
        row = {"model": model, "variant": variant, "seeds": [r["seed"] for r in ok]}
        for metric in ("auc", "query_auc", "logloss", "oracle_auc", "rows_per_s"):
            row[metric], row[f"{metric}_se"] = mean_se([r[metric] for r in ok])
        row["dense_params"] = ok[0]["dense_params"] if ok else None
        row["embedding_params"] = ok[0]["embedding_params"] if ok else None
        row["train_flops_per_row"] = ok[0].get("train_flops_per_row") if ok else None
        row["chosen_pass"] = [r["chosen_pass"] for r in ok]
        rows.append(row)
    return rows


def _pm(mean, se, digits: int = 4) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def _cells(row: dict, oracle: bool) -> list[str]:
    passes = ",".join("-" if p is None else str(p) for p in row["chosen_pass"]) or "-"
    cells = [row["model"], row["variant"], str(len(row["seeds"])), _pm(row["auc"], row["auc_se"]),
             _pm(row["query_auc"], row["query_auc_se"]), _pm(row["logloss"], None)]
    if oracle:
        cells.append(_pm(row["oracle_auc"], None))
    count = (lambda v: "n/a" if v is None else f"{v:,}")
    rate = "n/a" if row["rows_per_s"] is None else f"{row['rows_per_s']:,.0f}"
    return cells + [count(row["dense_params"]), count(row["embedding_params"]), rate, passes]


def _header(oracle: bool) -> list[str]:
    return (["model", "variant", "seeds", "AUC", "query-AUC", "logloss"] + (["oracle AUC"] if oracle else [])
            + ["dense params", "emb params", "train rows/s", "kept pass"])


def format_table(rows: list[dict]) -> str:
    """The table as aligned text."""
    oracle = any(r["oracle_auc"] is not None for r in rows)
    lines = [_header(oracle)] + [_cells(r, oracle) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


def format_markdown(rows: list[dict], runs: list[dict], args) -> str:
    oracle = any(r["oracle_auc"] is not None for r in rows)
    head = _header(oracle)
    out = [f"Config `{args.config}`, train `{args.days}`"
           + (f", validation `{args.valid_days}`" if args.valid_days else "") + f", test `{args.eval_days}`. "
           "Mean ± standard error over seeds; `kept pass` is the pass chosen on the validation span, per seed.", "",
           "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(_cells(r, oracle)) + " |" for r in rows]
    failed = [r for r in runs if r["status"] != "ok"]
    if failed:
        out += ["", "Failed runs (skipped in the table):"]
        out += [f"- {r['model']} / {r['variant']} / seed {r['seed']}: {r['error']} (log `{r['log']}`)" for r in failed]
    out += ["", "Overrides of each (model, variant) (the last seed's; `seed=` differs per run):"]
    out += [f"- `{r['model']}` / `{r['variant']}`: `{' '.join(r['overrides'])}`"
            for r in {(r["model"], r["variant"]): r for r in runs}.values()]
    return "\n".join(out) + "\n"


# -- the runner --------------------------------------------------------------------------------------------------------


def _load_record(path: Path | None) -> dict:
    import json

    if path is None or not path.is_file():
        return {"bench": "quality", "runs": []}
    record = json.loads(path.read_text())
    if record.get("bench") != "quality" or not isinstance(record.get("runs"), list):
        raise ValueError(f"{path}: not a `hyrank bench quality` record (no 'bench': 'quality' with a 'runs' list)")
    return record


def _merged(old: list[dict], new: list[dict]) -> list[dict]:
    """The recorded runs this command did not plan (kept as they were), then this command's runs."""
    planned = {(r["model"], r["variant"], r["seed"]) for r in new}
    return [r for r in old if (r["model"], r["variant"], r["seed"]) not in planned] + new


def run(args: argparse.Namespace) -> int:
    runs = execute(args, plan_runs(args))
    rows = aggregate(runs)
    print(format_table(rows))
    finish(args, runs, rows)
    if args.markdown:
        from hyrank.pipeline.files import write_atomic

        write_atomic(args.markdown, format_markdown(rows, runs, args))
        print(f"markdown: {args.markdown}")
    return 0 if all(r["status"] == "ok" for r in runs) else 1


Plan = tuple[dict, list[str]]  # ({"model", "variant", "seed"}, the run's --set list)


def plan_runs(args: argparse.Namespace) -> list[Plan]:
    """Every (model, variant, seed) of the command line with its overrides, checked to load."""
    models = parse_models(args.models)
    variants = dict(parse_variant(v) for v in (args.variants or ["base"]))
    model_sets = parse_model_sets(args.model_sets, models)
    plans = []
    for model in models:
        for variant, sets in variants.items():
            plans += plan_seeds(args, model, variant, [*model_sets.get(model, []), *sets])
    return plans


def plan_seeds(args: argparse.Namespace, model: str, variant: str, sets: list[str]) -> list[Plan]:
    """Seeds 0..args.seeds-1 of one (model, variant); its settings are loaded once here, so a typo fails before hours
    of runs, naming the key."""
    from hyrank.pipeline.config import load_config

    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    config_model = load_config(args.config, [], args.unsets).model.name  # whose options the file's are
    plans = []
    for seed in range(args.seeds):
        overrides = run_overrides(config_model, model, args.overrides, [], sets, seed)
        if seed == 0:
            try:
                load_config(args.config, overrides, args.unsets)
            except ValueError as e:
                raise ValueError(f"{model} / variant {variant}: {e}") from e
        plans.append(({"model": model, "variant": variant, "seed": seed}, overrides))
    return plans


def execute(args: argparse.Namespace, plans: list[Plan]) -> list[dict]:
    """Run the planned runs one at a time (those --json records as done are not rerun); every run's record."""
    from hyrank.pipeline.files import write_json

    if args.runs_dir is None:
        args.runs_dir = (args.json.with_name(args.json.stem + "-runs") if args.json
                         else Path(tempfile.mkdtemp(prefix="hyrank-quality-")))
    runs_dir = args.runs_dir
    record = _load_record(args.json)
    done = {(r["model"], r["variant"], r["seed"]): r for r in record["runs"] if r["status"] == "ok"}
    record.update({"config": str(args.config), "days": args.days, "valid_days": args.valid_days,
                   "eval_days": args.eval_days, "nproc": args.nproc, "runs_dir": str(runs_dir)})
    for key, overrides in plans:  # before any run: every folder to be (re)used fits this command
        if (key["model"], key["variant"], key["seed"]) not in done:
            check_folder(run_paths(runs_dir, key)[0], overrides)
    runs = []
    for i, (key, overrides) in enumerate(plans, 1):
        old = done.get((key["model"], key["variant"], key["seed"]))
        what = f"[{i}/{len(plans)}] {key['model']} / {key['variant']} / seed {key['seed']}"
        if old is not None:
            if old["overrides"] != overrides:
                raise ValueError(f"{args.json}: {what} was measured with other settings ({old['overrides']}, now "
                                 f"{overrides}): give the variant another name or use another --json")
            print(f"{what}: done before (AUC {old['auc']:.4f}), not rerun", flush=True)
            runs.append(old)
            continue
        print(f"{what}: training, log {run_paths(runs_dir, key)[1]}", flush=True)
        r = run_one(args, key, overrides, runs_dir)
        if r["status"] == "ok":
            print(f"    AUC {r['auc']:.4f}, query-AUC {_pm(r['query_auc'], None)}, logloss {r['logloss']:.4f}, "
                  f"kept pass {r['chosen_pass'] or '-'}, {r['wall_s']:.0f} s", flush=True)
        else:
            print(f"    FAILED ({r['error']}): skipped; log {r['log']}", flush=True)
        runs.append(r)
        if args.json:  # after every run: a stopped table loses at most the run in progress
            write_json(args.json, {**record, "runs": _merged(record["runs"], runs), "table": aggregate(runs)})
    return runs


def finish(args: argparse.Namespace, runs: list[dict], rows: list[dict]) -> None:
    """Name the failed runs; write the record with the table to --json."""
    from hyrank.pipeline.files import write_json

    for r in runs:
        if r["status"] != "ok":
            print(f"skipped {r['model']} / {r['variant']} / seed {r['seed']}: {r['error']}; log {r['log']}")
    if args.json:
        record = _load_record(args.json)
        write_json(args.json, {**record, "runs": _merged(record["runs"], runs), "table": rows})
        print(f"record: {args.json}")
