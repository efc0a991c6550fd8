"""`hyrank check`: a run's feature spec against its logs, in seconds, before any training. The checks live in
pipeline/data/check.py (which the training verbs call too); this verb prints them as tables and a verdict."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from hyrank.pipeline.cli import verb


def add_verbs(verbs) -> None:
    p = verb(verbs, "check", _check)
    p.add_argument("--config", required=True, type=Path, help="run config (TOML), e.g. jobs/configs/default.toml")
    p.add_argument("--days", help="YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD (default: every day under data.root)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set features.sequences.0.max_len=256 (repeatable)")
    p.add_argument("--unset", dest="unsets", action="append", default=[], metavar="KEY",
                   help="remove a key the config inherits through `extends`, e.g. --unset features.group (repeatable)")
    p.add_argument("--world-size", type=int, default=1,
                   help="ranks the run will have: how each day's rows split, and whether a rank gets less than a batch")
    p.add_argument("--max-rows-per-day", type=int, default=0,
                   help="profile whole row groups, drawn at random, until this many rows a day (0: every row)")
    p.add_argument("--schema-only", action="store_true", help="the footers only: no profile of the values")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write everything found as JSON to PATH")


def _check(args) -> int:
    """Check a run's feature spec against its logs in seconds, before any training.

    Schema (Parquet footers only): every column the spec reads is in every file of every day, with a type its
    kind accepts (an error names the file, the column, the type the spec needs and the type found); side-info
    lists are lists like their sequence's ids; the files of a day agree on the types; each day's rows, row groups
    and split over --world-size ranks (a warning when a rank gets fewer rows than data.batch_size_per_rank);
    missing or incomplete days of the range (warnings: one per day, or over a sparse calendar one line with how
    many, the first and last few and the longest gap).

    Profile (reads the spec's columns; --max-rows-per-day samples whole row groups): per feature its null share;
    for ids the distinct count against the table's num_embeddings and the ids outside [0, num_embeddings): hashed
    (oov = "hash"; string ids always are) or refused (oov = "error", and negative ids under any policy); for
    sequences the length quantiles against max_len and the share truncated; for dense values min/max/mean and the
    values the norm refuses (below 0 under log1p); the label's positive rate; the group column's distinct count;
    and the rows the reader's validation would drop per day, against data.error_budget.

    Exit status: 0 when the schema is right (warnings allowed), 2 when not, with one line per problem.

    Examples:
      hyrank check --config jobs/configs/default.toml --days 2026-11-01..2026-11-04
      hyrank check --config jobs/configs/default.toml --world-size 8 --set data.batch_size_per_rank=4096
      hyrank check --config my_logs.toml --days 2026-11-01 --max-rows-per-day 200000 --json check.json
      hyrank check --config my_logs.toml --schema-only        # footers only: every day under data.root
    """
    start = time.perf_counter()
    from hyrank.pipeline.config import load_config
    from hyrank.pipeline.data.check import check_range, profile_days
    from hyrank.pipeline.data.days import DayRange

    cfg = load_config(args.config, args.overrides, args.unsets)
    d = cfg.data
    days = DayRange.parse(args.days) if args.days else None
    if args.world_size <= 0 or args.max_rows_per_day < 0:
        raise ValueError("--world-size must be > 0 and --max-rows-per-day >= 0")
    report = check_range(cfg.features, d.root, days, partition_key=d.partition_key,
                         require_success=d.require_success, options=d, world_size=args.world_size,
                         batch_size=d.batch_size_per_rank)
    print(f"hyrank check: {args.config} on {d.root}, {days or 'every day'}, {args.world_size} rank(s) of "
          f"{d.batch_size_per_rank} rows a batch\n")
    profile = None
    if not report.errors and not args.schema_only and report.readable:
        profile = profile_days(cfg.features, report.readable, options=d, max_rows_per_day=args.max_rows_per_day,
                               seed=cfg.seed)
        report.problems += profile.problems(d.error_budget)
    if report.days:
        print(_days_table(report, profile) + "\n")
    if profile:
        print(_columns_table(profile) + "\n")
    seconds = time.perf_counter() - start
    for problem in report.warnings + report.errors:  # the errors last, next to the verdict
        print(f"{problem.severity}: {problem.message}")
    if report.problems:
        print()
    print(_verdict(report, profile, seconds))
    if args.json:
        from hyrank.pipeline.files import write_json

        write_json(args.json, _as_json(args, report, profile, seconds))
        print(f"written: {args.json}")
    return 2 if report.errors else 0


def _days_table(report, profile, edge: int = 6) -> str:
    """A line per day (the first and last `edge` of a long range: --json has them all) and their total."""
    read = {p.day: p for p in profile.days} if profile else {}
    days = report.days
    shown = days if len(days) <= 2 * edge + 1 else [*days[:edge], None, *days[-edge:]]
    rows = [("day", "files", "row groups", "rows", "rows/rank", "read", "dropped")]
    for f in shown:
        if f is None:
            rows.append((f"({len(days) - 2 * edge} more)",) + ("",) * 6)
            continue
        p, ranks = read.get(f.day), f.rows_per_rank or [0]
        rows.append((f.day, f"{f.files}", f"{f.row_groups}", f"{f.rows:,}",
                     f"{min(ranks):,}" + ("" if min(ranks) == max(ranks) else f"-{max(ranks):,}"),
                     f"{p.rows_read:,}" if p else "-", f"{p.bad_rows:,}" if p else "-"))
    if len(days) > 1:
        rows.append((f"{len(days)} days", f"{sum(f.files for f in days)}", f"{sum(f.row_groups for f in days)}",
                     f"{sum(f.rows for f in days):,}", "", f"{sum(p.rows_read for p in read.values()):,}" if read
                     else "-", f"{sum(p.bad_rows for p in read.values()):,}" if read else "-"))
    return _aligned(rows, left=1)


def _columns_table(profile) -> str:
    rows = [("column", "kind", "null", "distinct / table", "hashed", "refused", "detail")]
    for c in profile.columns:
        ids = bool(c.table)
        size = "managed" if c.num_embeddings == (1 << 63) - 1 else f"{c.num_embeddings:,}"  # managed: a row per id
        distinct = "-" if c.distinct is None else f"{c.distinct:,}" + (f" / {size}" if ids else "")
        rows.append((c.column, c.kind, f"{c.null_share:.2%}", distinct, f"{c.hashed:,}" if ids else "-",
                     f"{c.refused:,}" if ids else "-", _detail(c)))
    return _aligned(rows, left=2, last_free=True)


def _detail(c) -> str:
    parts = []
    if c.positive_rate is not None:
        parts.append(f"positive rate {c.positive_rate:.4f}")
    if c.not_binary:
        parts.append(f"{c.not_binary:,} not 0/1")
    if c.string_ids:
        parts.append("strings: hashed")
    if c.lengths:
        q = c.lengths
        parts.append(f"length p50 {q['p50']} p90 {q['p90']} p99 {q['p99']} max {q['max']} vs max_len {c.max_len}: "
                     f"{c.truncated_share:.1%} truncated")
    if c.misaligned_rows:
        parts.append(f"{c.misaligned_rows:,} row(s) misaligned with the ids")
    if c.mean is not None:
        parts.append(f"min {c.min:.4g} max {c.max:.4g} mean {c.mean:.4g}")
    if c.out_of_domain:
        parts.append(f"{c.out_of_domain:,} below 0 (norm = {c.norm!r} refuses them)")
    if c.non_finite:
        parts.append(f"{c.non_finite:,} NaN/Inf")
    if c.wrong_size_rows:
        parts.append(f"{c.wrong_size_rows:,} row(s) of the wrong size")
    return "; ".join(parts)


def _aligned(rows: list[tuple[str, ...]], *, left: int, last_free: bool = False) -> str:
    """Columns padded to their widest cell: the first `left` left-aligned, the others right-aligned, and the last
    one left as it is when `last_free` (free text)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.ljust(w) if i < left or (last_free and i == len(r) - 1) else c.rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _verdict(report, profile, seconds: float) -> str:
    rows = sum(f.rows for f in report.days)
    where = f"{len(report.days)} day(s), {sum(f.files for f in report.days)} file(s), {rows:,} rows"
    warned = f", {len(report.warnings)} warning(s)" if report.warnings else ""
    if report.errors:
        return (f"FAILED: {len(report.errors)} error(s){warned} in {where} ({seconds:.1f} s): the reader would "
                "refuse these logs; fix the feature spec (or --set it) or the data, then the values are profiled")
    read = f"; profiled {sum(p.rows_read for p in profile.days):,} rows" if profile else ""
    return f"OK: the feature spec matches {where}{warned}{read} ({seconds:.1f} s)"


def _as_json(args, report, profile, seconds: float) -> dict:
    columns = None
    if profile:
        columns = [asdict(c) | {"null_share": c.null_share, "truncated_share": c.truncated_share}
                   for c in profile.columns]
    return {
        "config": str(args.config), "range": args.days or "every day", "world_size": args.world_size,
        "ok": not report.errors,
        "seconds": round(seconds, 3),
        "errors": [asdict(p) for p in report.errors], "warnings": [asdict(p) for p in report.warnings],
        "footers": [asdict(f) for f in report.days],  # per day: files, row groups, rows, rows per rank
        "profile": None if profile is None else {"days": [asdict(d) | {"bad_rows": d.bad_rows} for d in profile.days],
                                                 "columns": columns},
    }
