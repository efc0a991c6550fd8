"""Object storage (s3://) against a real S3-protocol server started by the tests (tests/s3.py): discovery and
reading give what local disk gives, and a missing bucket or refused credentials are one clear line."""

from __future__ import annotations

import datetime as dt

import pytest
import torch

from hyrank.pipeline.config import load_config
from hyrank.pipeline.data.days import DayRange, discover_days, find_day, next_complete_day, scan_days
from hyrank.pipeline.data.reader import DayReader
from hyrank.pipeline.data.synth import generate_logs
from hyrank.pipeline.storage import StorageError, location

from conftest import DEFAULT_CONFIG, FIRST_DAY, small_synth

SPEC = load_config(DEFAULT_CONFIG).features


@pytest.fixture(scope="module")
def two_days(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3days")
    generate_logs(small_synth(num_days=2, rows_per_day=1500, rows_per_chunk=500), root)
    return root


def _batches(day):
    reader = DayReader(day, SPEC, batch_size=256, seed=3)
    return [(b.labels.clone(), b.dense.clone()) for b in reader], reader.day_rows


def test_s3_discovery_and_reading_match_local_disk(two_days, s3):
    root = s3.upload(two_days, "logs")
    first_file = sorted((two_days / "day=2026-11-01").glob("*.parquet"))[0]
    s3.put("logs/day=2026-11-03/part-0.parquet", first_file.read_bytes())  # no _SUCCESS yet: not complete
    local = discover_days(two_days)
    remote = discover_days(root)
    assert [d.day for d in remote] == [d.day for d in local] == [FIRST_DAY, FIRST_DAY + dt.timedelta(days=1)]
    assert [f.name for f in remote[0].files] == [f.name for f in local[0].files]
    scan = scan_days(root, DayRange.parse("2026-11-01..2026-11-03"))
    assert [s.reason for s in scan.skipped] == ["no _SUCCESS marker: the day is not complete"]
    (want, rows), (got, remote_rows) = _batches(local[1]), _batches(remote[1])
    assert rows == remote_rows == 1500 and len(got) == len(want)
    for (a, b), (c, d) in zip(want, got):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert find_day(root, FIRST_DAY).path == location(f"{root}/day=2026-11-01")
    assert next_complete_day(root, FIRST_DAY + dt.timedelta(days=1), timeout_s=0) is None
    s3.put("logs/day=2026-11-03/_SUCCESS", b"")  # the day completes: polling the listing finds it
    assert next_complete_day(root, FIRST_DAY + dt.timedelta(days=1), timeout_s=5, poll_s=0.1).day == \
        FIRST_DAY + dt.timedelta(days=2)


def test_s3_missing_bucket_and_bad_credentials_are_one_clear_line(s3, monkeypatch):
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket-here/logs: bucket 'no-such-bucket-here' does not "
                                           r"exist$"):
        discover_days("s3://no-such-bucket-here/logs")
    s3.put("logs/day=2026-11-01/_SUCCESS", b"")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    s3.server.check_credentials(True)  # moto accepts any key unless told to check
    try:
        with pytest.raises(StorageError) as e:
            discover_days(f"{s3.url}/logs")
    finally:
        s3.server.check_credentials(False)
    assert str(e.value).startswith(f"{s3.url}/logs: access denied") and "\n" not in str(e.value), str(e.value)


def test_s3_bench_storage_runs(s3, capsys):
    from hyrank.pipeline.cli import main

    assert main(["bench", "storage", "--bucket", s3.name, "--rows", "1000", "--checkpoint-mb", "2",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "reader rows/s (DayReader)" in out and "checkpoint save s" in out and "checkpoint load s" in out, out
    assert s3.keys("checkpoints/latest") and s3.keys("logs/day=2026-11-01/_SUCCESS")
