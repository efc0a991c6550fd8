"""Reader throughput against a raw pyarrow scan of the same files and columns, measured side by side in one run.

    hyrank bench reader                          # 30k synthetic rows, 1000-event long sequences, in a temp dir
    hyrank bench reader --data data/bench --rows 40000 --workers 1 2 4

Prints rows/s of DayReader (decode + validate + convert to Batch, prefetched by loader threads) for each worker
count, of `pyarrow.parquet.read_table` with use_threads on and off (off still decodes on pyarrow's pool), of
`ParquetFile.read_row_group` on one thread (what a loader thread calls), the ratios, and the CPU cores each kept
busy. The reader is measured end to end, as the trainer sees it: from building the DayReader (footers, schema
checks) to its last batch. Every measurement reads the same files and the same columns (the spec's); the long
sequence's max_len is the generated length, so nothing is truncated. The measurements take turns (each raw scan,
then DayReader per worker count, `--repeats` times) and the best of each is reported, so load from other
processes hits all of them alike; the load average is printed before and after: compare the ratios of one run,
not numbers across runs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=None, help="root of day=... folders (default: generate into a temp dir)")
    parser.add_argument("--rows", type=int, default=30_000, help="rows of the generated day")
    parser.add_argument("--long-len", type=int, default=1000, help="events per long sequence in the generated day")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader thread counts to measure")
    parser.add_argument("--repeats", type=int, default=2, help="passes per measurement; the best is reported")
    parser.add_argument("--shuffle", action="store_true", help="also measure DayReader with data.shuffle on")


def run(args: argparse.Namespace) -> int:
    from hyrank.pipeline.config import load_config
    from hyrank.pipeline.data.days import discover_days

    ROOT = Path(__file__).resolve().parents[1]
    overrides = [f"features.sequences.0.max_len={args.long_len}"]
    spec = load_config(ROOT / "jobs" / "configs" / "default.toml", overrides).features
    with tempfile.TemporaryDirectory(prefix="hyrank-bench-") as tmp:
        root = args.data if args.data is not None else _generate(Path(tmp), args.rows, args.long_len)
        day = discover_days(root)[0]
        files = day.files
        print(f"day {day.day}: {len(files)} files, {sum(pq.ParquetFile(f).metadata.num_rows for f in files)} rows, "
              f"{sum(f.stat().st_size for f in files) / 2**20:.0f} MiB, {len(spec.columns())} columns "
              f"(root {root})")
        shuffles = (False, True) if args.shuffle else (False,)
        runs = {"raw pyarrow read_table, its threads": lambda: _raw_scan(files, spec.columns(), True),
                "raw pyarrow read_table, use_threads=False": lambda: _raw_scan(files, spec.columns(), False),
                "raw pyarrow row groups, 1 thread": lambda: _raw_row_groups(files, spec.columns())}
        runs |= {f"DayReader, {w} worker{'s' if w > 1 else ''}{', shuffle' if sh else ''}":
                 (lambda w=w, sh=sh: _reader_pass(day, spec, args.batch_size, w, sh))
                 for sh in shuffles for w in args.workers}
        print(f"load average before: {_load()}")
        best = dict.fromkeys(runs, (0.0, 0.0))
        for _ in range(args.repeats):  # in turns, so a burst of load from elsewhere does not favour one line
            for name, fn in runs.items():
                best[name] = max(best[name], _measure(fn))
        print(f"load average after:  {_load()}")
    raw_threads = best["raw pyarrow read_table, its threads"][0]
    raw_one = best["raw pyarrow read_table, use_threads=False"][0]
    print(f"{'what':<42}{'rows/s':>10}{'x raw (threads)':>17}{'x raw (use_threads=False)':>27}{'cores busy':>12}")
    for name, (rate, cores) in best.items():
        print(f"{name:<42}{rate:>10,.0f}{rate / raw_threads:>17.2f}{rate / raw_one:>27.2f}{cores:>12.2f}")
    if len(args.workers) > 1:
        w0, w1 = args.workers[0], args.workers[-1]
        for sh in shuffles:
            tag = ", shuffle" if sh else ""
            rate = {w: best[f"DayReader, {w} worker{'s' if w > 1 else ''}{tag}"][0] for w in (w0, w1)}
            print(f"scaling {w0} -> {w1} workers{tag}: {rate[w1] / rate[w0]:.2f}x")
    print("\nraw: pq.read_table of each file, the spec's columns, to an Arrow table (no validation, no tensors); "
          "use_threads=False still decodes on pyarrow's pool (see cores busy). "
          "DayReader: the same files and columns to Batches (KJTs, dense, labels) with row validation, "
          "end to end through its planner and loader threads (each reads a row group with pyarrow's pool). "
          "'row groups, 1 thread': ParquetFile.read_row_group(use_threads=False) of each row group, what a "
          "loader thread calls, on one core. cores busy: this process's CPU seconds / wall seconds of the best pass.")
    return 0


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg()) + f" ({os.cpu_count()} cores)"


def _generate(out: Path, rows: int, long_len: int) -> Path:
    from hyrank.pipeline.data.synth import SynthConfig, generate_logs

    start = time.perf_counter()
    cfg = SynthConfig(rows_per_day=rows, num_days=1, long_len_min=long_len, long_len_max=long_len,
                      rows_per_chunk=2048, chunks_per_file=4)
    generate_logs(cfg, out)
    print(f"generated {rows} rows with {long_len}-event long sequences in {time.perf_counter() - start:.1f} s")
    return out


def _measure(fn) -> tuple[float, float]:
    """(rows/s, CPU seconds of this process per wall second) of one pass of `fn`, which returns rows/s."""
    cpu, wall = time.process_time(), time.perf_counter()
    rate = fn()
    return rate, (time.process_time() - cpu) / (time.perf_counter() - wall)


def _raw_scan(files: list[Path], columns: list[str], use_threads: bool) -> float:
    start = time.perf_counter()
    rows = sum(pq.read_table(f, columns=columns, use_threads=use_threads).num_rows for f in files)
    return rows / (time.perf_counter() - start)


def _raw_row_groups(files: list[Path], columns: list[str]) -> float:
    start = time.perf_counter()
    rows = 0
    for f in files:
        pf = pq.ParquetFile(f)
        rows += sum(pf.read_row_group(i, columns=columns, use_threads=False).num_rows
                    for i in range(pf.num_row_groups))
    return rows / (time.perf_counter() - start)


def _reader_pass(day, spec, batch_size: int, workers: int, shuffle: bool) -> float:
    from hyrank.pipeline.data.options import ReaderOptions
    from hyrank.pipeline.data.reader import DayReader

    start = time.perf_counter()
    reader = DayReader(day, spec, batch_size=batch_size, options=ReaderOptions(
        num_workers=workers, prefetch_batches=4 * workers, shuffle=shuffle))
    rows = sum(b.batch_size for b in reader)
    return rows / (time.perf_counter() - start)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
