"""Day discovery and rank splitting (more of the reader in test_reader.py)."""

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.data.days import DayRange, discover_days, find_day
from pipeline.data.reader import DayReader
from pipeline.data.split import batches_per_rank, row_groups, split_row_groups

from conftest import DEFAULT_CONFIG


def test_day_range_parsing():
    r = DayRange.parse("2026-11-01..2026-11-03")
    assert dt.date(2026, 11, 2) in r and dt.date(2026, 11, 4) not in r
    assert DayRange.parse("2026-11-05").first == dt.date(2026, 11, 5)
    for bad in ("2026-11-03..2026-11-01", "yesterday", "2026-11-01..2026-11-02..2026-11-03"):
        with pytest.raises(ValueError, match="bad day range"):
            DayRange.parse(bad)


def test_incomplete_days_are_skipped_unless_asked(tmp_path):
    for day, done in (("2026-11-01", True), ("2026-11-02", False)):
        (tmp_path / f"dt={day}").mkdir()
        if done:
            (tmp_path / f"dt={day}" / "_SUCCESS").touch()
    (tmp_path / "notes").mkdir()
    assert [d.day.day for d in discover_days(tmp_path, partition_key="dt")] == [1]
    assert [d.complete for d in discover_days(tmp_path, partition_key="dt", require_success=False)] == [True, False]
    with pytest.raises(FileNotFoundError, match="no _SUCCESS marker"):
        find_day(tmp_path, dt.date(2026, 11, 2), partition_key="dt")
    with pytest.raises(FileNotFoundError, match="data root not found"):
        discover_days(tmp_path / "missing")


def test_uneven_row_groups_give_equal_batch_counts(synth_root, tmp_path):
    # three files of very different sizes
    src = pq.read_table(discover_days(synth_root)[0].path)
    day = tmp_path / "day=2026-11-01"
    day.mkdir()
    for i, (start, n, rg) in enumerate([(0, 2500, 1000), (2500, 300, 300), (2800, 1700, 500)]):
        pq.write_table(src.slice(start, n), day / f"part-{i}.parquet", row_group_size=rg)
    (day / "_SUCCESS").touch()
    partition = discover_days(tmp_path)[0]
    refs = row_groups(partition)
    shares = split_row_groups(refs, 2)
    key = lambda r: (str(r.file), r.index)  # noqa: E731
    assert sorted((r for share in shares for r in share), key=key) == sorted(refs, key=key)
    rows = [sum(r.num_rows for r in s) for s in shares]
    assert abs(rows[0] - rows[1]) <= max(r.num_rows for r in refs)
    spec = load_config(DEFAULT_CONFIG).features
    readers = [DayReader(partition, spec, batch_size=200, rank=r, world_size=2) for r in range(2)]
    counts = [sum(1 for _ in rd) for rd in readers]
    # each rank keeps error_budget (1%) of its rows in reserve for rows that validation may drop
    assert counts[0] == counts[1] == len(readers[0]) == batches_per_rank(rows, 200, 0.01) == (min(rows) - 22) // 200
    assert readers[0].rows_dropped == 4500 - counts[0] * 200 * 2


def test_corrupt_file_is_reported_with_its_path(tmp_path):
    day = tmp_path / "day=2026-11-01"
    day.mkdir()
    (day / "part-0.parquet").write_bytes(b"not parquet at all")
    (day / "_SUCCESS").touch()
    with pytest.raises(ValueError, match=r"part-0.parquet: cannot read the Parquet footer"):
        row_groups(discover_days(tmp_path)[0])
