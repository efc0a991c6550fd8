"""A range of days with holes is not trained across the gap without a word: missing_days names every day of the
range that is missing or incomplete, and `hyrank train` says so before training."""

import datetime as dt
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hyrank.pipeline import cli
from hyrank.pipeline.cli import run as cli_run
from hyrank.pipeline.config import load_config
from hyrank.pipeline.data.days import DayRange, MissingDay, describe_missing, discover_days, missing_days, scan_days

from conftest import DEFAULT_CONFIG

RANGE = "2026-11-01..2026-11-05"


def _logs(root, *, success=("01", "02", "05"), files=("01", "02", "04", "05"), folders=("01", "02", "04", "05")):
    """Days of 2026-11: 03 has no folder, 04 no _SUCCESS (by default)."""
    for d in folders:
        path = root / f"day=2026-11-{d}"
        path.mkdir(parents=True)
        if d in files:
            pq.write_table(pa.table({"x": [1]}), path / "part-0.parquet")
        if d in success:
            (path / "_SUCCESS").touch()
    return root


def test_missing_days_names_each_hole_and_why(tmp_path):
    root = _logs(tmp_path, success=("01", "02", "05", "06"), files=("01", "04", "05", "06"),
                 folders=("01", "02", "04", "05", "06"))
    days = DayRange.parse(RANGE)
    assert [d.day for d in days.dates()] == [1, 2, 3, 4, 5] and str(days) == RANGE
    scan = scan_days(root, days)
    assert missing_days(days, scan) == [
        MissingDay(dt.date(2026, 11, 2), "no .parquet files in its folder"),
        MissingDay(dt.date(2026, 11, 3), "no folder day=2026-11-03"),
        MissingDay(dt.date(2026, 11, 4), "no _SUCCESS marker: the day is not complete"),
    ]
    lenient = scan_days(root, days, require_success=False)
    assert missing_days(days, lenient)[2] == \
        MissingDay(dt.date(2026, 11, 4), "no _SUCCESS marker: read as it is (require_success is off)")
    assert missing_days(DayRange.parse("2026-11-05..2026-11-06"), scan_days(root)) == []


def test_discover_days_warns_once_naming_the_holes(tmp_path, caplog):
    root = _logs(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hyrank.pipeline.data.days"):
        found = discover_days(root, DayRange.parse(RANGE))
    assert [d.day.day for d in found] == [1, 2, 5]
    assert [r.getMessage() for r in caplog.records] == [
        f"2 of the 5 day(s) of {RANGE} under {root} are missing or incomplete: 2026-11-03: no folder day=2026-11-03; "
        "2026-11-04: no _SUCCESS marker: the day is not complete"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hyrank.pipeline.data.days"):
        discover_days(root, DayRange.parse("2026-11-01..2026-11-02"))
    assert not caplog.records  # no hole, no word


def test_hyrank_train_names_the_holes_before_training(tmp_path, caplog):
    root = _logs(tmp_path / "logs")
    cfg = load_config(DEFAULT_CONFIG, [f'data.root="{root}"'])
    with caplog.at_level(logging.WARNING, logger="hyrank.pipeline.data.days"):
        days = cli_run._training_days(cfg.data, RANGE)  # what _train trains on
    assert [d.day.day for d in days] == [1, 2, 5]
    assert "2026-11-03: no folder day=2026-11-03; 2026-11-04: no _SUCCESS marker" in caplog.text
    caplog.clear()
    # the command itself, where no day is left: one error line after the warning, before any process group
    rc = cli.main(["train", "--config", str(DEFAULT_CONFIG), "--days", "2026-11-03..2026-11-04",
                   "--set", f'data.root="{root}"'])
    assert rc == 2
    assert "2 of the 2 day(s) of 2026-11-03..2026-11-04" in caplog.text
    assert f"no complete day in 2026-11-03..2026-11-04 under {root}" in caplog.text
    with pytest.raises(FileNotFoundError, match="no complete day"):
        cli_run._training_days(cfg.data, "2026-11-03")


def test_a_sparse_calendar_is_summarised_in_one_line(tmp_path, caplog):
    """Over many missing days (ml-latest-small: 22 years of daily folders, most days without one) the warning says
    how many, the first and last few, the longest gap and the reasons, in one line; one or two are still named."""
    days = [dt.date(2001, 1, 1) + dt.timedelta(days=k) for k in (0, 1, 5, 40, 41, 400, 730)]
    for day in days:
        (tmp_path / f"day={day}").mkdir()
        pq.write_table(pa.table({"x": [1]}), tmp_path / f"day={day}" / "part-0.parquet")
        (tmp_path / f"day={day}" / "_SUCCESS").touch()
    (tmp_path / "day=2001-06-01").mkdir()  # inside the longest gap, not complete
    summary = ("724 days, first 2001-01-03, 2001-01-04, 2001-01-05, last 2002-12-29, 2002-12-30, 2002-12-31; "
               "longest gap 2001-02-12..2002-02-04 (358 day(s)); no folder: 723; no _SUCCESS marker: the day is not "
               "complete: 1")
    cfg = load_config(DEFAULT_CONFIG, [f'data.root="{tmp_path}"'])
    with caplog.at_level(logging.WARNING, logger="hyrank.pipeline.data.days"):
        found = cli_run._training_days(cfg.data, "2001-01-01..2002-12-31")  # what `hyrank train --days` reads
    assert [r.getMessage() for r in caplog.records] == [
        f"724 of the 730 day(s) of 2001-01-01..2002-12-31 under {tmp_path} are missing or incomplete: {summary}"]
    assert [d.day for d in found] == days[:6]
    scan = scan_days(tmp_path)
    assert describe_missing(missing_days(DayRange.parse("2001-01-01..2001-01-04"), scan)) == \
        "2001-01-03: no folder day=2001-01-03; 2001-01-04: no folder day=2001-01-04"
    assert describe_missing(missing_days(DayRange.parse("2001-05-31..2001-06-01"), scan)) == \
        "2001-05-31: no folder day=2001-05-31; 2001-06-01: no _SUCCESS marker: the day is not complete"


@pytest.mark.parametrize("rank, shown", [("0", True), ("1", False), (None, True)])
def test_only_rank_0_warns_about_the_shared_data_root(monkeypatch, rank, shown):
    """Every rank discovers the same days: under torchrun the holes are named once, by rank 0 (a launch of 2
    ranks printed each warning twice)."""
    from hyrank.pipeline.logs import SHARED_INPUT_LOGGERS, setup_logging

    loggers = [logging.getLogger(n) for n in ("pipeline", *SHARED_INPUT_LOGGERS)]
    levels = [lg.level for lg in loggers]
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    try:
        setup_logging(verbose=False)
        assert logging.getLogger("hyrank.pipeline.data.days").isEnabledFor(logging.WARNING) is shown
        assert logging.getLogger("hyrank.pipeline.data.days").isEnabledFor(logging.ERROR)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
