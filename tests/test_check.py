"""`hyrank check`: schema problems named by file, column and both types (the same files the reader refuses), missing
days, the rank split, and a profile whose counts are checked against hand-made values; the verb's exit codes."""

import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hyrank.pipeline.cli import main
from hyrank.pipeline.config import load_config
from hyrank.pipeline.data.check import check_days, check_range, profile_days, require_schema
from hyrank.pipeline.data.days import DayPartition, DayRange
from hyrank.pipeline.data.options import ReaderOptions
from hyrank.pipeline.data.split import read_footers

from conftest import DEFAULT_CONFIG

DAY = "2026-11-01"
CONFIG = """\
name = "check"
out_dir = "{root}/run"
[data]
root = "{root}"
batch_size_per_rank = 4
[model]
name = "dlrm_mlp"
[features]
label = "click"
group = "qid"
tables = [
  {{ name = "user", num_embeddings = 10, dim = 4 }},
  {{ name = "city", num_embeddings = 2, dim = 4 }},
  {{ name = "item", num_embeddings = 100, dim = 4 }},
  {{ name = "cat", num_embeddings = 8, dim = 4 }},
]
sparse = [{{ name = "user_id", table = "user", oov = "error" }}, {{ name = "city", table = "city" }}]
dense = [{{ name = "act", norm = "log1p" }}, {{ name = "vec", size = 2 }}]
[[features.sequences]]
name = "hist"
ids = "hist_ids"
table = "item"
max_len = 3
side = [{{ column = "hist_cats", table = "cat" }}]
"""


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "check.toml"
    path.write_text(CONFIG.format(root=tmp_path / "logs"))
    return path


@pytest.fixture
def spec(config):
    return load_config(config).features


def _rows(n: int = 6, **columns) -> pa.Table:
    """n clean rows of the spec's columns; `columns` replaces some (an array, or None to leave one out)."""
    base = {
        "click": pa.array([i % 2 for i in range(n)], pa.int8()),
        "qid": pa.array(range(n), pa.int64()),
        "user_id": pa.array([i % 10 for i in range(n)], pa.int64()),
        "city": pa.array([f"c{i % 3}" for i in range(n)]),
        "act": pa.array([float(i) for i in range(n)], pa.float32()),
        "vec": pa.array([[1.0, 2.0]] * n, pa.list_(pa.float32(), 2)),
        "hist_ids": pa.array([[1, 2]] * n, pa.list_(pa.int64())),
        "hist_cats": pa.array([[3, 4]] * n, pa.list_(pa.int64())),
    }
    base.update(columns)
    return pa.table({k: v for k, v in base.items() if v is not None})


def _day(root, day: str = DAY, *tables: pa.Table, success: bool = True, row_group_size: int | None = None):
    path = root / f"day={day}"
    path.mkdir(parents=True)
    for i, table in enumerate(tables or (_rows(),)):
        pq.write_table(table, path / f"part-{i:05d}.parquet", row_group_size=row_group_size)
    if success:
        (path / "_SUCCESS").touch()
    return DayPartition(dt.date.fromisoformat(day), path, success)


def _check(spec, tmp_path, days=DAY, **kw):
    return check_range(spec, tmp_path / "logs", DayRange.parse(days), **kw)


def _refused_by_reader(spec, day: DayPartition) -> bool:
    try:
        read_footers(day, spec)
    except ValueError:
        return True
    return False


def test_clean_day_passes_with_its_rows_and_split(spec, tmp_path):
    day = _day(tmp_path / "logs", DAY, _rows(6), _rows(5), row_group_size=2)
    report = _check(spec, tmp_path, world_size=2, batch_size=4)
    assert report.problems == [] and report.readable == [day]
    (info,) = report.days
    assert (info.files, info.row_groups, info.rows, info.rows_per_rank) == (2, 6, 11, [5, 6])
    require_schema(spec, [day], world_size=2, batch_size=4)  # raises nothing
    assert not _refused_by_reader(spec, day)


def test_missing_column_names_file_and_column(spec, tmp_path):
    day = _day(tmp_path / "logs", DAY, _rows(), _rows(act=None))
    (p,) = _check(spec, tmp_path).errors
    assert (p.file, p.column, p.found, p.expected) == (str(day.path / "part-00001.parquet"), "act", "missing",
                                                       "one float or integer per row")
    assert "part-00001.parquet: missing column 'act'" in p.message
    with pytest.raises(ValueError, match="part-00001.parquet: missing column 'act'"):
        require_schema(spec, [day])


def test_wrong_types_name_file_column_expected_and_found(spec, tmp_path):
    day = _day(tmp_path / "logs", DAY, _rows(user_id=pa.array([0.5] * 6), act=pa.array(["x"] * 6)))
    errors = _check(spec, tmp_path).errors
    assert [(p.column, p.found) for p in errors] == [("user_id", "double"), ("act", "string")]  # all, not the first
    assert errors[0].expected == "integer or string ids, or lists of them"
    assert errors[1].expected == "one float or integer per row"
    for p in errors:
        assert p.file == str(day.path / "part-00000.parquet") and p.file in p.message and p.found in p.message
        assert p.expected in p.message
    assert _refused_by_reader(spec, day)


def test_side_info_that_is_not_a_list_like_its_ids(spec, tmp_path):
    day = _day(tmp_path / "logs", DAY, _rows(hist_cats=pa.array([3] * 6, pa.int64())))
    (p,) = _check(spec, tmp_path).errors
    assert (p.column, p.found) == ("hist_cats", "int64")
    assert "side-info of sequence 'hist'" in p.message and "'hist_ids', which is list<element: int64>" in p.message
    assert _refused_by_reader(spec, day)


def test_files_of_a_day_that_disagree_are_named_both(spec, tmp_path):
    day = _day(tmp_path / "logs", DAY, _rows(), _rows(user_id=pa.array(range(6), pa.int32())), _rows())
    (p,) = _check(spec, tmp_path).errors
    assert p.file == str(day.path / "part-00001.parquet")
    assert "'user_id' is int32" in p.message and "part-00000.parquet has it as int64" in p.message
    assert _refused_by_reader(spec, day)


def test_days_that_disagree_on_a_type_are_a_warning(spec, tmp_path):
    _day(tmp_path / "logs", "2026-11-01")
    _day(tmp_path / "logs", "2026-11-02", _rows(user_id=pa.array(range(6), pa.int32())))
    report = _check(spec, tmp_path, "2026-11-01..2026-11-02")
    assert report.errors == [] and [p.message for p in report.warnings] == [
        "day 2026-11-02: 'user_id' is int32, another type than on day 2026-11-01: days trained as one unit "
        "(train.min_unit_rows) must agree"]


def test_missing_and_incomplete_days_are_warnings_and_no_day_is_an_error(spec, tmp_path):
    root = tmp_path / "logs"
    _day(root, "2026-11-01")
    _day(root, "2026-11-03")
    _day(root, "2026-11-04", success=False)
    report = _check(spec, tmp_path, "2026-11-01..2026-11-04")
    assert report.errors == [] and [d.day for d in report.days] == ["2026-11-01", "2026-11-03"]
    assert [(p.day, p.message.split(": ", 1)[1]) for p in report.warnings] == [
        ("2026-11-02", "no folder day=2026-11-02"), ("2026-11-04", "no _SUCCESS marker: the day is not complete")]
    (p,) = _check(spec, tmp_path, "2026-12-01..2026-12-02").errors
    assert p.message.startswith("no complete day in 2026-12-01..2026-12-02 under")


def test_a_sparse_calendar_is_one_warning_line_not_one_per_missing_day(config, spec, tmp_path, capsys):
    """ml-latest-small's 22 years of daily partitions printed one warning per missing day (about 4,000 lines) before
    the table: over many missing days, one line says how many, the first and last few and the longest gap."""
    days = [dt.date(2001, 1, 1) + dt.timedelta(days=k) for k in (0, 1, 5, 40, 41, 400, 730)]
    for day in days:
        _day(tmp_path / "logs", str(day))
    (p,) = check_range(spec, tmp_path / "logs", None).warnings  # every day there: the span first..last found
    assert p.message == ("724 of the 731 day(s) of 2001-01-01..2003-01-01 are missing or incomplete: 724 days, first "
                         "2001-01-03, 2001-01-04, 2001-01-05, last 2002-12-29, 2002-12-30, 2002-12-31; longest gap "
                         "2001-02-12..2002-02-04 (358 day(s)); no folder: 724")
    assert main(["check", "--config", str(config), "--schema-only"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("warning:")] == [f"warning: {p.message}"]
    # a day or two missing are still named, each with its reason
    names = [(w.day, w.message) for w in _check(spec, tmp_path, "2001-01-01..2001-01-06").warnings]
    assert names == [(f"2001-01-0{d}", f"day 2001-01-0{d} of 2001-01-01..2001-01-06 is missing or incomplete: "
                      f"no folder day=2001-01-0{d}") for d in (3, 4, 5)]


def test_empty_and_corrupt_days(spec, tmp_path):
    root = tmp_path / "logs"
    empty = _day(root, "2026-11-01")
    (empty.path / "part-00000.parquet").unlink()
    bad = _day(root, "2026-11-02", _rows(), _rows())
    (bad.path / "part-00001.parquet").write_bytes(b"not parquet")
    errors = _check(spec, tmp_path, "2026-11-01..2026-11-02").errors
    assert [(p.day, p.file) for p in errors] == [("2026-11-01", ""),
                                                 ("2026-11-02", str(bad.path / "part-00001.parquet"))]
    assert "holds no .parquet files" in errors[0].message and "cannot read the Parquet footer" in errors[1].message
    assert _refused_by_reader(spec, bad)
    lenient = check_days(spec, [bad], options=ReaderOptions(on_corrupt_file="skip", max_corrupt_files=1))
    assert lenient.errors == [] and len(lenient.warnings) == 1 and lenient.days[0].rows == 6


def test_warns_when_a_rank_gets_less_than_a_batch(spec, tmp_path):
    _day(tmp_path / "logs", DAY, _rows(6))
    (p,) = _check(spec, tmp_path, world_size=4, batch_size=4).warnings
    assert p.message.startswith("1 of 1 day(s) leave a rank fewer rows than one batch of 4 (data.batch_size_per_rank) "
                                "over 4 rank(s): 2026-11-01 (1): ")
    assert _check(spec, tmp_path, world_size=1, batch_size=4).problems == []


def test_profile_counts_nulls_hashed_refused_and_truncated(spec, tmp_path):
    day = _day(tmp_path / "logs", DAY, _rows(
        6,
        click=pa.array([1, 0, 0, 1, 1, 0], pa.int8()),
        qid=pa.array([7, 7, 8, 9, 9, 10]),
        user_id=pa.array([0, 3, 12, -1, None, 3]),  # table of 10, oov = "error": 12 and -1 refused
        city=pa.array(["a", "b", "a", None, "c", "c"]),  # strings: hashed into a table of 2
        act=pa.array([0.5, -0.5, 2.0, None, 1.0, 0.0], pa.float32()),  # log1p: -0.5 is out of its domain
        vec=pa.array([[1, 2], [1, 2], [1, 2, 3], [1, 2], [1, 2], [1, 2]], pa.list_(pa.float32())),
        hist_ids=pa.array([[1, 2, 3, 4, 5], [1], [], [7, 8, 9, 10], [200, 1], None]),  # max_len 3, table of 100
        hist_cats=pa.array([[1, 1, 2, 2, 3], [1], [], [2, 2, 2], [1, 1], None]),  # row 3: 3 events, not 4
    ))
    profile = profile_days(spec, [day])
    c = {p.column: p for p in profile.columns}
    assert [p.column for p in profile.columns] == ["click", "qid", "user_id", "city", "act", "vec", "hist_ids",
                                                   "hist_cats"]
    assert c["click"].positive_rate == 0.5 and c["qid"].distinct == 4
    u = c["user_id"]
    assert (u.null_rows, u.ids, u.distinct, u.negative, u.out_of_range, u.hashed, u.refused) == (1, 5, 4, 1, 1, 0, 2)
    city = c["city"]
    assert (city.null_share, city.string_ids, city.ids, city.distinct, city.hashed, city.refused) == \
        (1 / 6, True, 5, 3, 5, 0)
    a = c["act"]
    assert (a.null_rows, a.min, a.max, a.mean, a.out_of_domain) == (1, -0.5, 2.0, 0.6, 1)
    assert c["vec"].wrong_size_rows == 1
    h = c["hist_ids"]
    assert (h.null_rows, h.ids, h.distinct, h.hashed, h.refused) == (1, 12, 10, 1, 0)
    assert h.lengths == {"p50": 2, "p90": 5, "p99": 5, "max": 5}
    assert (h.truncated_rows, h.truncated_share) == (2, 0.4)
    assert (c["hist_cats"].misaligned_rows, c["hist_cats"].distinct) == (1, 3)
    # the rows the reader's validation drops, each under its first reason (label, group, sparse, dense, sequences)
    (d,) = profile.days
    assert (d.rows, d.rows_read) == (6, 6)
    assert d.bad == {"norm_out_of_domain": 1, "id_out_of_range": 1, "negative_id": 1, "null": 2}
    warnings = [p.message for p in profile.problems(error_budget=0.01)]
    assert warnings[0] == ("validation would drop 5 of the 6 rows read, in 1 day(s) (null 2, negative_id 1, "
                           "id_out_of_range 1, norm_out_of_domain 1); over data.error_budget = 1.00%, where the run "
                           "would stop: 2026-11-01 (83.33%)")
    assert warnings[1].startswith("column 'user_id': 2 id(s) refused (1 negative, 1 >= num_embeddings 10")
    assert warnings[2].startswith("column 'city': 3 distinct ids share the 2 rows of table 'city'")
    assert warnings[3].startswith("column 'hist_ids': 1 id(s) >= num_embeddings 100 are hashed")
    assert len(warnings) == 4


def test_profile_merges_days_and_samples_whole_row_groups(spec, tmp_path):
    root = tmp_path / "logs"
    first = _day(root, "2026-11-01", _rows(40, user_id=pa.array([i % 5 for i in range(40)], pa.int32())),
                 row_group_size=10)
    second = _day(root, "2026-11-02", _rows(8, user_id=pa.array([i % 10 for i in range(8)], pa.int64())))
    profile = profile_days(spec, [first, second])
    assert [(d.rows, d.rows_read) for d in profile.days] == [(40, 40), (8, 8)]
    assert {p.column: p.distinct for p in profile.columns}["user_id"] == 8  # 0..4 and 0..7 in another int type
    sampled = profile_days(spec, [first], max_rows_per_day=15)
    assert [(d.rows, d.rows_read) for d in sampled.days] == [(40, 20)]  # two whole row groups of 10
    assert sampled.columns[0].rows == 20


def test_cli_exits_0_on_a_good_spec_and_2_on_a_bad_one(config, tmp_path, capsys):
    _day(tmp_path / "logs", DAY, _rows(6, act=pa.array([-1.0, 0, 1, 2, 3, 4], pa.float32())))
    out = tmp_path / "check.json"
    assert main(["check", "--config", str(config), "--days", DAY, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "hist_ids" in text and "OK: the feature spec matches 1 day(s), 1 file(s), 6 rows" in text
    assert "warning: validation would drop 1 of the 6 rows read, in 1 day(s) (norm_out_of_domain 1)" in text
    found = json.loads(out.read_text())
    assert found["ok"] and found["errors"] == [] and found["footers"][0]["rows"] == 6
    assert {c["column"]: c["out_of_domain"] for c in found["profile"]["columns"]}["act"] == 1

    rc = main(["check", "--config", str(config), "--days", DAY, "--set", 'features.sparse.0.name="uid"',
               "--set", 'features.dense.1.name="vector"'])
    text = capsys.readouterr().out
    assert rc == 2
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "missing column 'uid'" in errors[0] and "missing column 'vector'" in errors[1]
    assert "FAILED: 2 error(s)" in text


def test_shipped_default_config_checks_clean_on_the_synthetic_logs(synth_root):
    cfg = load_config(DEFAULT_CONFIG, [f'data.root="{synth_root}"'])
    report = check_range(cfg.features, synth_root, None, options=cfg.data, world_size=2,
                         batch_size=cfg.data.batch_size_per_rank)
    assert report.problems == [] and len(report.readable) == 3
    profile = profile_days(cfg.features, report.readable, options=cfg.data, max_rows_per_day=2000)
    assert all(d.bad == {} for d in profile.days)
    assert all(c.refused == 0 and c.null_rows == 0 for c in profile.columns)
