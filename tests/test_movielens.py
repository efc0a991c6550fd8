"""hyrank import movielens-100k: the sequence builder and a hand-made dataset (always), then the real MovieLens-100K
(skipped when ../shared/data/movielens-100k is absent): every rating is a row, sequences hold only strictly earlier
ratings (checked against a plain-Python reference), days are complete, a re-run is identical, and
jobs/configs/movielens.toml reads the import and trains on it."""

import datetime as dt
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from hyrank.pipeline.cli import main
from hyrank.pipeline.config import load_config
from hyrank.pipeline.data.days import DayRange, discover_days
from hyrank.pipeline.data.importers.movielens import (DEFAULT_MAX_LEN, NUM_AGE_BUCKETS, NUM_YEAR_BUCKETS, earlier_events,
                                               import_movielens, primary_genres, year_buckets)
from hyrank.pipeline.data.validate import check_schema, validate_rows
from hyrank.pipeline.files import sha256

from conftest import ROOT

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens-100k"
CONFIG = ROOT / "jobs" / "configs" / "movielens.toml"
needs_data = pytest.mark.skipif(
    not (DATA / "u.data").is_file(),
    reason=f"MovieLens-100K not found at {DATA}: it is research-use data, never committed or downloaded; put the "
    "GroupLens ml-100k folder there to run these tests")
D0 = 883612800  # 1998-01-01 00:00 UTC


# -- the sequence builder ------------------------------------------------------------------------------------------


def _sequences(lengths, index, values):
    off = np.concatenate([[0], np.cumsum(lengths)])
    return [values[index[a:b]].tolist() for a, b in zip(off[:-1], off[1:])]


def test_earlier_events_takes_strictly_earlier_ones_and_keeps_the_most_recent():
    # events sorted by (user, ts); user 1 rated items 10 and 11 in the same second
    user = np.array([1, 1, 1, 1, 2])
    ts = np.array([5, 7, 7, 9, 3])
    item = np.array([10, 11, 12, 13, 20])
    rows_user, rows_ts = np.array([1, 1, 1, 1, 2, 2, 3]), np.array([7, 7, 9, 100, 3, 4, 50])  # any order
    got = _sequences(*earlier_events(user, ts, rows_user, rows_ts, max_len=10), item)
    assert got == [[10], [10], [10, 11, 12], [10, 11, 12, 13], [], [20], []]
    got = _sequences(*earlier_events(user, ts, rows_user, rows_ts, max_len=2), item)
    assert got == [[10], [10], [11, 12], [12, 13], [], [20], []]  # the most recent two, oldest first


def test_earlier_events_refuses_unsorted_events_and_a_bad_max_len():
    with pytest.raises(ValueError, match="sorted by"):
        earlier_events(np.array([2, 1]), np.array([1, 1]), np.array([1]), np.array([5]), max_len=3)
    with pytest.raises(ValueError, match="max_len"):
        earlier_events(np.array([1]), np.array([1]), np.array([1]), np.array([5]), max_len=0)


def test_primary_genre_is_the_rarest_and_year_buckets():
    flags = np.array([[0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 1], [1, 0, 0, 0]], dtype=bool)  # genre counts 1,1,2,2
    assert primary_genres(flags).tolist() == [1, 2, 3, 0]  # 2 vs 3: a tie, the lower id
    assert year_buckets(np.array([0, 1922, 1940, 1989, 1990, 1995, 1998, 2003])).tolist() == [0, 1, 2, 6, 7, 12,
                                                                                              15, 15]


# -- a hand-made dataset ---------------------------------------------------------------------------------------------


def _write_tiny(src: Path, data_lines: list[str]) -> Path:
    src.mkdir(parents=True, exist_ok=True)
    (src / "u.genre").write_text("unknown|0\nAction|1\nComedy|2\nDrama|3\n\n")
    (src / "u.occupation").write_text("other\nwriter\n")
    (src / "u.user").write_text("1|30|M|writer|12345\n2|17|F|other|T8H1N\n")
    (src / "u.item").write_text("1|A (1995)|01-Jan-1995||u|0|1|1|0\n2|B (1960)|4-Feb-1960||u|0|0|0|1\n"
                                "3|C|||u|0|0|0|0\n4|D (1998)|01-Jan-1998||u|0|0|1|1\n")
    (src / "u.data").write_text("".join(line + "\n" for line in data_lines))
    return src


TINY_RATINGS = [f"1\t1\t5\t{D0 + 100}", f"1\t2\t3\t{D0 + 100}", f"1\t3\t4\t{D0 + 200}", f"1\t4\t1\t{D0 + 86405}",
                f"2\t2\t4\t{D0 + 50}", f"2\t1\t2\t{D0 + 86405}"]


def test_a_hand_made_dataset_imports_exactly(tmp_path):
    src = _write_tiny(tmp_path / "src", TINY_RATINGS)
    summary = import_movielens(src, tmp_path / "out", max_len=2)
    assert [(str(d), n) for d, n in summary.days] == [("1998-01-01", 4), ("1998-01-02", 2)]
    day0 = pq.read_table(tmp_path / "out" / "day=1998-01-01" / "part-00000.parquet").to_pydict()
    day1 = pq.read_table(tmp_path / "out" / "day=1998-01-02" / "part-00000.parquet").to_pydict()
    assert (tmp_path / "out" / "day=1998-01-02" / "_SUCCESS").exists()
    assert day0["user_id"] == [2, 1, 1, 1] and day0["item_id"] == [2, 1, 2, 3]  # by (ts, user, item)
    assert day0["click"] == [1, 1, 0, 1]
    assert day0["hist_item_ids"] == [[], [], [], [1, 2]]  # items 1 and 2 share a second: not in each other's
    assert day0["click_item_ids"] == [[], [], [], [1]]
    assert day1["user_id"] == [1, 2]
    assert day1["hist_item_ids"] == [[2, 3], [2]]  # user 1 rated 1, 2, 3 before: the last two kept
    assert day1["click_item_ids"] == [[1, 3], [2]]
    # genre counts: unknown 1 (item 3 has none), Action 1, Comedy 2, Drama 2 -> primary: 1 Action, 2 Drama, ...
    assert day1["hist_item_genres"] == [[3, 0], [3]] and day1["click_item_genres"] == [[1, 0], [3]]
    assert day0["item_genres"] == [[3], [1, 2], [3], [0]] and day0["item_primary_genre"] == [3, 1, 3, 0]
    assert day0["item_year_bucket"] == [4, 12, 4, 0]
    assert day0["user_prior_ratings"] == [0, 0, 0, 2] and day0["item_prior_ratings"] == [0, 0, 1, 0]
    assert day0["user_age_bucket"] == [0, 2, 2, 2] and day0["user_gender"] == [1, 0, 0, 0]
    assert day0["user_occupation"] == [0, 1, 1, 1] and day0["user_zip3"] == [1, 0, 0, 0]  # "123" < "T8H"
    assert day1["hour"] == [0, 0] and day1["weekday"] == [4, 4]  # 1998-01-02 was a Friday
    manifest = json.loads((tmp_path / "out" / "_import.json").read_text())
    assert manifest["rows"] == 6 and manifest["vocabularies"]["user_zip3"] == ["123", "T8H"]


@pytest.mark.parametrize("line, message", [
    ("1\t1\t7\t883612800", r"u\.data:2: rating 7 is not in 1\.\.5"),
    ("9\t1\t4\t883612800", r"u\.data:2: user id 9 is not in u\.user"),
    ("1\t1\t4", r"u\.data: .*"),
])
def test_a_bad_rating_line_is_named(tmp_path, line, message):
    src = _write_tiny(tmp_path / "src", [TINY_RATINGS[0], line])
    with pytest.raises(ValueError, match=message):
        import_movielens(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_cli_imports_and_prints_the_summary(tmp_path, capsys):
    src = _write_tiny(tmp_path / "src", TINY_RATINGS)
    assert main(["import", "movielens-100k", "--src", str(src), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "wrote 2 days" in out and "6 rows" in out and "positive rate 0.5000" in out
    assert "train     1997-09-20..1998-03-07" in out
    assert main(["import", "movielens-100k", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2


# -- the real MovieLens-100K ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    if not (DATA / "u.data").is_file():
        pytest.skip(f"MovieLens-100K not found at {DATA}")
    out = tmp_path_factory.mktemp("ml100k")
    summary = import_movielens(DATA, out)
    return out, summary, pq.read_table(out)  # every day, with its partition column `day`


@pytest.fixture(scope="module")
def ratings():
    """u.data, u.item and u.genre read in plain Python: the reference."""
    data = [tuple(map(int, line.split("\t"))) for line in (DATA / "u.data").read_text().splitlines()]
    items = [line.split("|") for line in (DATA / "u.item").read_text(encoding="latin-1").splitlines()]
    flags = {int(f[0]): [g for g, v in enumerate(f[5:]) if v == "1"] or [0] for f in items}
    count = {g: sum(g in gs for gs in flags.values()) for g in range(19)}
    primary = {i: min(gs, key=lambda g: (count[g], g)) for i, gs in flags.items()}
    by_user: dict[int, list] = {}
    for user, item, rating, ts in data:
        by_user.setdefault(user, []).append((ts, item, rating))
    return data, primary, {u: sorted(events) for u, events in by_user.items()}


@needs_data
def test_every_rating_is_a_row_with_its_label(imported, ratings):
    _, summary, table = imported
    data, _, _ = ratings
    assert summary.rows == table.num_rows == len(data) == 100_000
    got = np.stack([table.column(c).to_numpy() for c in ("user_id", "item_id", "rating", "ts")], axis=1)
    assert sorted(map(tuple, got.tolist())) == sorted(data)  # nothing dropped, nothing invented
    assert (table.column("click").to_numpy() == (got[:, 2] >= 4)).all()
    assert summary.positives == sum(r >= 4 for _, _, r, _ in data) == 55_375
    assert [str(d) for d in summary.empty_days] == ["1997-12-11", "1997-12-16"]
    assert summary.split_rows() == {"train": 80_253, "validate": 10_388, "test": 9_359}


@needs_data
def test_days_are_utc_dates_and_complete(imported):
    out, summary, table = imported
    rows = table.select(["ts", "day", "hour", "weekday"]).to_pydict()
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == [f"day={d}" for d, _ in summary.days] and len(folders) == 213
    assert all(sorted(f.name for f in (out / name).iterdir()) == ["_SUCCESS", "part-00000.parquet"]
               for name in folders)
    utc = [dt.datetime.fromtimestamp(t, dt.timezone.utc) for t in rows["ts"]]
    assert [str(u.date()) for u in utc] == rows["day"]
    assert rows["hour"] == [u.hour for u in utc] and rows["weekday"] == [u.weekday() for u in utc]
    assert len(discover_days(out, DayRange.parse("1997-09-20..1998-03-07"))) == 169 - 2  # less the two empty days


@needs_data
def test_sequences_hold_only_strictly_earlier_ratings_of_the_user(imported, ratings):
    _, _, table = imported
    _, primary, by_user = ratings
    sample = random.Random(0).sample(range(table.num_rows), 400)
    rows = table.take(sample).to_pydict()
    truncated = 0
    for i in range(len(sample)):
        user, ts = rows["user_id"][i], rows["ts"][i]
        earlier = [(t, item, r) for t, item, r in by_user[user] if t < ts]  # (ts, item) order
        hist = [item for _, item, _ in earlier][-DEFAULT_MAX_LEN:]
        clicks = [item for _, item, r in earlier if r >= 4][-DEFAULT_MAX_LEN:]
        assert rows["hist_item_ids"][i] == hist, f"row {i} (user {user}, ts {ts})"
        assert rows["click_item_ids"][i] == clicks, f"row {i} (user {user}, ts {ts})"
        assert rows["hist_item_genres"][i] == [primary[item] for item in hist]
        assert rows["click_item_genres"][i] == [primary[item] for item in clicks]
        assert rows["user_prior_ratings"][i] == len(earlier)
        truncated += len(earlier) > DEFAULT_MAX_LEN
    assert truncated > 50, "the sample should hold rows whose history was cut to the most recent events"


@needs_data
def test_a_rerun_replaces_days_whole_and_is_identical(imported):
    out, _, _ = imported
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "_import.json")
    before = {p: sha256(p) for p in files}
    (out / "day=1997-09-20.tmp").mkdir()  # what a crash mid-day leaves
    (out / "day=1997-09-20" / "part-00001.parquet").write_bytes(b"an older import's file")
    import_movielens(DATA, out)
    assert not (out / "day=1997-09-20.tmp").exists()
    assert not (out / "day=1997-09-20" / "part-00001.parquet").exists()
    assert {p: sha256(p) for p in files} == before


@needs_data
def test_the_shipped_config_reads_every_row_of_the_import(imported):
    out, _, _ = imported
    cfg = load_config(CONFIG)
    assert cfg.features.group == "user_id" and cfg.features.oracle is None
    assert "user_id" in {f.name for f in cfg.features.sparse}
    tables = cfg.features.table_by_name
    assert (tables["age"].num_embeddings, tables["year"].num_embeddings) == (NUM_AGE_BUCKETS, NUM_YEAR_BUCKETS)
    table = pq.read_table(out, partitioning=None)
    check_schema(cfg.features, table.schema, source=str(out))
    verdict = validate_rows(table, cfg.features, max_list_len=cfg.data.max_list_len)
    assert verdict.counts() == {}  # every id inside its table, every list and float valid


def _train_two_days(rank, world_size, cfg):
    from hyrank.pipeline.distributed.env import env_of_current_group
    from hyrank.pipeline.train.trainer import RunPlan, Trainer

    days = discover_days(cfg.data.root)
    result = Trainer(cfg, env_of_current_group()).run(RunPlan(train_days=days[:2], eval_days=[days[2]]))
    return [(s.rows, s.losses) for s in result.trained], result.metrics[str(days[2].day)]


@needs_data
@pytest.mark.dist
def test_a_short_training_run_on_the_import(imported, tmp_path):
    from dist import run_distributed

    out, summary, _ = imported
    cfg = load_config(CONFIG, [f'data.root="{out}"', f'out_dir="{tmp_path / "run"}"', "model.options.hidden=[32]",
                               "train.tensorboard=false"])
    [(trained, metrics)] = run_distributed(_train_two_days, cfg, world_size=1, timeout_s=300)
    (n0, n1, n2) = (n for _, n in summary.days[:3])
    assert sum(rows for rows, _ in trained) == n0 + n1  # every row of 1997-09-20 and -21
    losses = [loss for _, day_losses in trained for loss in day_losses]
    assert len(losses) >= -(-(n0 + n1) // 128) and all(0 < loss < 2 for loss in losses)
    assert metrics.num_rows == n2 and 0 < metrics.auc < 1 and metrics.num_queries > 1
