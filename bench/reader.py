"""Reader throughput against a raw pyarrow scan of the same files and columns, measured side by side in one run.

    hyrank bench reader                          # 30k synthetic rows, 1000-event long sequences, in a temp dir
    hyrank bench reader --data data/bench --rows 40000 --workers 1 2 4

Prints rows/s of DayReader (decode + validate + convert to Batch, prefetched by loader threads) for each worker
count, of `pyarrow.parquet.read_table` with its own thread pool and with one thread, and the ratios. The reader
is measured end to end, as the trainer sees it: time from the first `iter()` to the last batch.
"""

from __future__ import annotations

import argparse
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


def run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.data import discover_days

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
        raw = {threads: _best(args.repeats, lambda t=threads: _raw_scan(files, spec.columns(), t))
               for threads in (True, False)}
        reader = {w: _best(args.repeats, lambda w=w: _reader_pass(day, spec, args.batch_size, w))
                  for w in args.workers}
    print(f"{'what':<38}{'rows/s':>12}{'x raw (threads)':>17}{'x raw (1 thread)':>18}")
    rows = [("raw pyarrow read_table, its threads", raw[True]), ("raw pyarrow read_table, 1 thread", raw[False])]
    rows += [(f"DayReader, {w} worker{'s' if w > 1 else ''}", reader[w]) for w in args.workers]
    for name, rate in rows:
        print(f"{name:<38}{rate:>12,.0f}{rate / raw[True]:>17.2f}{rate / raw[False]:>18.2f}")
    if len(args.workers) > 1:
        w0, w1 = args.workers[0], args.workers[-1]
        print(f"scaling {w0} -> {w1} workers: {reader[w1] / reader[w0]:.2f}x")
    return 0


def _generate(out: Path, rows: int, long_len: int) -> Path:
    from pipeline.synth import SynthConfig, generate_logs

    start = time.perf_counter()
    cfg = SynthConfig(rows_per_day=rows, num_days=1, long_len_min=long_len, long_len_max=long_len,
                      rows_per_chunk=2048, chunks_per_file=4)
    generate_logs(cfg, out)
    print(f"generated {rows} rows with {long_len}-event long sequences in {time.perf_counter() - start:.1f} s")
    return out


def _best(repeats: int, fn) -> float:
    return max(fn() for _ in range(repeats))


def _raw_scan(files: list[Path], columns: list[str], use_threads: bool) -> float:
    start = time.perf_counter()
    rows = sum(pq.read_table(f, columns=columns, use_threads=use_threads).num_rows for f in files)
    return rows / (time.perf_counter() - start)


def _reader_pass(day, spec, batch_size: int, workers: int) -> float:
    from pipeline.data import DayReader, ReaderOptions

    start = time.perf_counter()
    reader = DayReader(day, spec, batch_size=batch_size, options=ReaderOptions(num_workers=workers,
                                                                               prefetch_batches=4 * workers))
    rows = sum(b.batch_size for b in reader)
    return rows / (time.perf_counter() - start)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
