"""The daily run report: the CSV says exactly what the day files say (gaps stay gaps), the PNG is a real image,
reruns replace both, and `hyrank report` prints where they are."""

import json
import math
import re

import pytest

from hyrank.pipeline.cli import main
from hyrank.pipeline.report import COLUMNS, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train(run, day, **fields):
    """A train/day-*.json as DayStats.to_dict writes it; a field set to None is left out (a legacy file)."""
    data = {"day": day, "steps": 40, "rows": 2560, "seconds": 2.5, "rows_per_s": 1024.0, "mean_loss": 0.41,
            "bad_rows": {"label_not_0_or_1": 3, "sequence_too_long": 1}, "losses": [0.45, 0.37]}
    data.update(fields)
    (run / "train").mkdir(parents=True, exist_ok=True)
    (run / "train" / f"day-{day}.json").write_text(json.dumps({k: v for k, v in data.items() if v is not None}))


def _progressive(run, day, metrics, note=""):
    (run / "metrics").mkdir(parents=True, exist_ok=True)
    (run / "metrics" / f"progressive-{day}.json").write_text(
        json.dumps({"day": day, "model_step": 40, "metrics": metrics, "note": note}))


def _metrics(auc, *, oracle_auc=0.8123, query_auc=0.6012, logloss=0.4421, calibration=1.0312):
    return {"num_rows": 2560, "ctr": 0.12, "auc": auc, "query_auc": query_auc, "num_queries": 77, "logloss": logloss,
            "ne": 0.93, "calibration": calibration, "oracle_auc": oracle_auc}


@pytest.fixture
def run(tmp_path):
    """Five days covering every shape a run's files take."""
    run = tmp_path / "stream-run"
    _train(run, "2026-11-01", rows_per_s=1111.14)
    _progressive(run, "2026-11-01", None, note="first day of a fresh run: no model to evaluate yet")
    _train(run, "2026-11-02", bad_rows={})
    _progressive(run, "2026-11-02", _metrics(0.7012345678))
    _train(run, "2026-11-03", rows_per_s=None, bad_rows=None)  # written before DayStats had these fields
    _progressive(run, "2026-11-03", _metrics(0.7234, oracle_auc=None, query_auc=math.nan))  # real logs: no oracle
    _train(run, "2026-11-04", rows=3000, steps=47)  # trained, not evaluated
    _progressive(run, "2026-11-05", _metrics(0.74, logloss=0.4301, calibration=0.98))  # evaluated, not yet trained
    (run / "train" / "day-2026-11-06.json.tmp").write_text("{half a fi")  # a writer's temporary: not a day
    return run


EXPECTED_CSV = """\
day,rows,steps,rows_per_s,progressive_auc,query_auc,logloss,calibration,oracle_auc,bad_rows
2026-11-01,2560,40,1111.1,,,,,,4
2026-11-02,2560,40,1024.0,0.701235,0.601200,0.442100,1.031200,0.812300,0
2026-11-03,2560,40,,0.723400,,0.442100,1.031200,,
2026-11-04,3000,47,1024.0,,,,,,4
2026-11-05,,,,0.740000,0.601200,0.430100,0.980000,0.812300,
"""


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_csv_cells_are_exact_and_unknowns_are_empty(run):
    report = write_report(run)
    assert report.csv_path == run / "report" / "days.csv"
    assert report.csv_path.read_text() == EXPECTED_CSV
    assert EXPECTED_CSV.splitlines()[0] == ",".join(COLUMNS)
    assert [r.day for r in report.rows] == ["2026-11-01", "2026-11-02", "2026-11-03", "2026-11-04", "2026-11-05"]
    legacy = report.rows[2]
    assert legacy.rows_per_s is None and legacy.bad_rows is None and legacy.query_auc is None  # missing, not zero


def test_png_is_a_real_image(run):
    report = write_report(run)
    assert report.png_path == run / "report" / "days.png"
    assert _is_png(report.png_path)


def test_a_single_day_still_plots(tmp_path):
    run = tmp_path / "fresh"
    _train(run, "2026-11-01")
    _progressive(run, "2026-11-01", None, note="no model yet")
    report = write_report(run)
    assert report.csv_path.read_text().splitlines()[1] == "2026-11-01,2560,40,1024.0,,,,,,4"
    assert _is_png(report.png_path)


def test_rerun_replaces_both_files_and_leaves_no_temporaries(run):
    first = write_report(run)
    png_before = first.png_path.read_bytes()
    _train(run, "2026-11-05", rows=999)  # the stream trained the evaluated day
    _progressive(run, "2026-11-06", _metrics(0.75))
    second = write_report(run)
    lines = second.csv_path.read_text().splitlines()
    assert lines[5].startswith("2026-11-05,999,40,1024.0,0.740000,")
    assert lines[6].startswith("2026-11-06,,,,0.750000,")
    assert len(lines) == 7
    assert second.png_path.read_bytes() != png_before and _is_png(second.png_path)
    assert sorted(p.name for p in (run / "report").iterdir()) == ["days.csv", "days.png"]


def test_a_run_without_day_files_is_a_clear_error(tmp_path):
    empty = tmp_path / "not-a-run"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match=re.escape(f"{empty}: no day files")):
        write_report(empty)
    assert not (empty / "report").exists()


def test_a_corrupt_day_file_names_the_file(run):
    bad = run / "metrics" / "progressive-2026-11-02.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        write_report(run)


def test_hyrank_report_prints_the_paths_and_the_table(run, capsys):
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert str(run / "report" / "days.csv") in out and str(run / "report" / "days.png") in out
    assert "progressive_auc" in out and "0.701235" in out
    assert _is_png(run / "report" / "days.png")


def test_hyrank_report_on_an_empty_dir_is_one_line(tmp_path, caplog):
    assert main(["report", str(tmp_path)]) == 2
    assert "no day files" in caplog.text


def test_hyrank_report_has_help(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "usage: hyrank report" in capsys.readouterr().out
