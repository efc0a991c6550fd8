"""Day discovery and rank splitting (more of the reader in test_reader.py)."""

import datetime as dt

import pyarrow.parquet as pq
import pytest

from hyrank.pipeline.config import load_config
from hyrank.pipeline.data.days import DayRange, discover_days, find_day
from hyrank.pipeline.data.reader import DayReader
from hyrank.pipeline.data.split import row_groups, split_rows

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


def test_rows_are_split_in_equal_contiguous_ranges(synth_root, tmp_path):
    # three files of very different sizes: 4500 rows, 2250 a rank, the cut inside part-0's third row group
    src = pq.read_table(discover_days(synth_root)[0].path)
    day = tmp_path / "day=2026-11-01"
    day.mkdir()
    for i, (start, n, rg) in enumerate([(0, 2500, 1000), (2500, 300, 300), (2800, 1700, 500)]):
        pq.write_table(src.slice(start, n), day / f"part-{i}.parquet", row_group_size=rg)
    (day / "_SUCCESS").touch()
    partition = discover_days(tmp_path)[0]
    refs = row_groups(partition)
    for world in (1, 2, 3, 7):
        shares = split_rows(refs, world)
        sizes = [sum(r.num_rows for r in s) for s in shares]
        assert sum(sizes) == 4500 and max(sizes) - min(sizes) <= 1
        # together the ranges cover each row group exactly once, in order
        covered = {}
        for share in shares:
            for r in share:
                covered.setdefault((str(r.file), r.index), []).append((r.start, r.stop))
        for ref in refs:
            spans = sorted(covered[(str(ref.file), ref.index)])
            assert spans[0][0] == 0 and spans[-1][1] == ref.num_rows
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    first, second = split_rows(refs, 2)
    assert (first[-1].file.name, first[-1].index, first[-1].start, first[-1].stop) == ("part-0.parquet", 2, 0, 250)
    assert (second[0].start, second[0].stop) == (250, 500)
    spec = load_config(DEFAULT_CONFIG).features
    readers = [DayReader(partition, spec, batch_size=200, rank=r, world_size=2) for r in range(2)]
    assert len(readers[0]) == len(readers[1]) == -(-2250 // 200)


def test_corrupt_file_is_reported_with_its_path(tmp_path):
    day = tmp_path / "day=2026-11-01"
    day.mkdir()
    (day / "part-0.parquet").write_bytes(b"not parquet at all")
    (day / "_SUCCESS").touch()
    with pytest.raises(ValueError, match=r"part-0.parquet: cannot read the Parquet footer"):
        row_groups(discover_days(tmp_path)[0])
