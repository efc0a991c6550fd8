"""DayReader: equal batch counts, every row exactly once across ranks, bit-for-bit resume, validation and
quarantine, corrupt files, the error budget, streaming discovery. Crafted days are cut from the small synthetic
logs, with `query_id` replaced by a row index so every trained row can be identified (it is Batch.group_ids)."""

import datetime as dt
import os
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hyrank.pipeline.config import load_config
from hyrank.pipeline.data.days import discover_days, next_complete_day, scan_days
from hyrank.pipeline.data.fingerprint import file_changes, file_fingerprint
from hyrank.pipeline.data.options import ReaderOptions
from hyrank.pipeline.data.reader import DayReader

from conftest import DEFAULT_CONFIG
from dist import run_distributed

SPEC = load_config(DEFAULT_CONFIG).features
DAY = dt.date(2026, 11, 1)


@pytest.fixture(scope="module")
def source(synth_root) -> pa.Table:
    """3000 synthetic rows whose query_id is the row index."""
    table = pq.read_table(discover_days(synth_root)[0].path).slice(0, 3000)
    return table.set_column(table.schema.get_field_index("query_id"), "query_id", pa.array(np.arange(3000)))


def write_day(root, parts: list[tuple[pa.Table, int]], day: dt.date = DAY):
    """One file per (table, row group size); returns the DayPartition."""
    path = root / f"day={day.isoformat()}"
    path.mkdir(parents=True)
    for i, (table, rg) in enumerate(parts):
        pq.write_table(table, path / f"part-{i}.parquet", row_group_size=rg)
    (path / "_SUCCESS").touch()
    return next(d for d in discover_days(root) if d.day == day)


def even_day(root, source):
    """Row groups 1000, 500, 500, 300, 300, 200, 200 in four files: each of 2 ranks gets exactly 1500 rows."""
    return write_day(root, [(source.slice(0, 1000), 1000), (source.slice(1000, 1000), 500),
                            (source.slice(2000, 600), 300), (source.slice(2600, 400), 200)])


def real_ids(batch) -> list[int]:
    """The row ids of a batch's real rows (filler rows, weight 0, repeat a real one)."""
    ids = batch.group_ids if batch.weights is None else batch.group_ids[batch.weights > 0]
    return ids.tolist()


def _rows_of(rank, world_size, day, options, seed=0, batch_size=100):
    reader = DayReader(day, SPEC, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, options=options)
    batches = list(reader)
    assert all(b.batch_size == batch_size for b in batches)  # every rank's step gets a full batch
    return len(batches), [real_ids(b) for b in batches]


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_ranks_read_every_row_exactly_once(source, tmp_path, shuffle):
    day = even_day(tmp_path, source)
    opts = ReaderOptions(shuffle=shuffle, shuffle_buffer_rows=250, error_budget=0.0, num_workers=2)
    results = run_distributed(_rows_of, day, opts)
    (n0, ids0), (n1, ids1) = results
    assert n0 == n1 == len(ids0) == len(ids1) == 15
    rows = [r for batch in ids0 + ids1 for r in batch]
    assert sorted(rows) == list(range(3000))  # every row once, none twice
    if shuffle:
        assert [r for b in ids0 for r in b] != sorted(r for b in ids0 for r in b)


def _lagging_consumer(rank, world_size, day):
    """Rank 1 spends 30 ms on each batch, rank 0 none: rank 0 waits for rank 1 at every batch's agreement."""
    reader = DayReader(day, SPEC, batch_size=100, rank=rank, world_size=world_size, options=ReaderOptions())
    for _ in reader:
        if rank == 1:
            time.sleep(0.03)
    return reader.agree_wait_s


def test_the_agreement_wait_is_the_wait_for_the_slower_rank(source, tmp_path):
    """DayReader.agree_wait_s (the part of the trainer's input wait that is rank skew, `hyrank bench e2e`): the
    rank that is ahead waits inside the per-batch flags' all_reduce for the one behind, about its lag per batch."""
    wait0, wait1 = run_distributed(_lagging_consumer, even_day(tmp_path, source))
    assert wait0 >= 14 * 0.03 * 0.8, (wait0, wait1)  # 15 batches: rank 1's lag before the 2nd to the 15th
    assert wait1 < wait0 / 3, (wait0, wait1)
    reader = DayReader(even_day(tmp_path / "one", source), SPEC, batch_size=100)
    assert sum(1 for _ in reader) == 30 and reader.agree_wait_s == 0.0  # one rank: no collective, no wait


def _one_rank_signalled(rank, world_size, day):
    """Rank 1 is asked to stop once it has taken 3 batches; rank 0 never is. Then each rank resumes from its
    cursor in a new reader and reads the rest."""
    taken = []
    reader = DayReader(day, SPEC, batch_size=100, rank=rank, world_size=world_size,
                       should_stop=lambda: rank == 1 and len(taken) >= 3)
    for batch in reader:
        taken.append(real_ids(batch))
    state = reader.state_dict()
    rest = DayReader(day, SPEC, batch_size=100, rank=rank, world_size=world_size)
    rest.load_state_dict(state)
    return reader.stopped, len(taken), [r for b in taken for r in b], [r for b in rest for r in real_ids(b)]


def test_a_stop_on_one_rank_ends_the_day_on_every_rank_at_the_same_batch(source, tmp_path):
    """The stop signal rides in the reader's per-batch flags (the step's one collective): no rank takes the batch
    after the one at which any rank was signalled, and the cursors resume exactly there, every row once."""
    (stop0, n0, before0, after0), (stop1, n1, before1, after1) = run_distributed(_one_rank_signalled,
                                                                               even_day(tmp_path, source))
    assert stop0 and stop1 and n0 == n1 == 3
    assert sorted(before0 + after0 + before1 + after1) == list(range(3000))


def test_the_data_config_is_what_the_reader_takes(source, tmp_path):
    """DataConfig is a ReaderOptions: every `data.*` reader key reaches the reader, with no copy to forget."""
    day = even_day(tmp_path, source)
    keys = {"shuffle": True, "shuffle_buffer_rows": 250, "error_budget": 0.0, "num_workers": 2}
    cfg = load_config(DEFAULT_CONFIG, [f"data.{k}={str(v).lower()}" for k, v in keys.items()])
    assert isinstance(cfg.data, ReaderOptions)
    from_config = _rows_of(0, 1, day, cfg.data)
    assert from_config == _rows_of(0, 1, day, ReaderOptions(**keys))
    assert from_config != _rows_of(0, 1, day, ReaderOptions(**{**keys, "shuffle": False}))


def test_uneven_files_give_equal_counts_on_two_ranks_and_every_row_once(source, tmp_path):
    """2970 rows: 1485 a rank, 15 batches of 100 each, the last one holding 85 real rows and 15 of filler."""
    day = write_day(tmp_path, [(source.slice(0, 2500), 1000), (source.slice(2500, 300), 300),
                               (source.slice(2800, 170), 170)])
    (n0, ids0), (n1, ids1) = run_distributed(_rows_of, day, ReaderOptions())
    assert n0 == n1 == 15
    assert sorted(r for batch in ids0 + ids1 for r in batch) == list(range(2970))
    assert [len(b) for b in ids0] == [100] * 14 + [85]


@pytest.mark.parametrize("world_size", [2, 3])
def test_fewer_row_groups_than_ranks_still_trains_every_row(source, tmp_path, world_size):
    """One file of one row group (the 5000-rows-a-day case of issue 14 that trained 0 steps on 2 ranks): rows are
    split by range, so every rank trains its share; counted per rank against the file."""
    day = write_day(tmp_path, [(source.slice(0, 1000), 1000)])
    results = run_distributed(_rows_of, day, ReaderOptions(), 0, 64, world_size=world_size)
    assert len({n for n, _ in results}) == 1 and results[0][0] == -(-(-(-1000 // world_size)) // 64)
    per_rank = [sum(len(b) for b in ids) for _, ids in results]
    assert sorted(per_rank) == sorted(1000 * (r + 1) // world_size - 1000 * r // world_size for r in range(world_size))
    assert sorted(r for _, ids in results for b in ids for r in b) == list(range(1000))


def test_a_day_with_no_row_is_an_error_not_done(source, tmp_path):
    day = write_day(tmp_path, [(source.slice(0, 0), 100)])
    with pytest.raises(ValueError, match="no valid row"):
        _rows_of(0, 1, day, ReaderOptions())


def _batch_tensors(b) -> list[torch.Tensor]:
    return [b.pooled.values(), b.pooled.lengths(), b.sequence.values(), b.sequence.lengths(), b.dense, b.labels,
            b.group_ids, b.oracle_p]


@pytest.mark.parametrize("stop_after", [1, 4, 5, 9])
def test_resume_reproduces_the_remaining_batches_bit_for_bit(source, tmp_path, stop_after):
    bad = source.slice(0, 1000)
    click = bad.column("click").to_numpy().copy()
    click[[10, 400, 990]] = 3  # a few bad rows: the counts must survive the resume too
    bad = bad.set_column(bad.schema.get_field_index("click"), "click", pa.array(click, pa.int8()))
    day = write_day(tmp_path, [(bad, 300), (source.slice(1000, 2000), 400)])
    opts = ReaderOptions(shuffle=True, shuffle_buffer_rows=450, num_workers=1)  # blocks of 500 rows

    def reader(workers=1):
        o = ReaderOptions(**{**opts.__dict__, "num_workers": workers})
        return DayReader(day, SPEC, batch_size=100, rank=0, world_size=2, seed=3, options=o)  # the bad rows' rank

    full = reader()
    expected = [_batch_tensors(b) for b in full]
    first = reader()
    for i, _ in enumerate(first):
        if i + 1 == stop_after:
            break
    state = first.state_dict()
    assert state["batches_emitted"] == stop_after and state["file"].endswith(".parquet")
    resumed = reader(workers=2)  # the worker count does not change the plan
    resumed.load_state_dict(state)
    got = [_batch_tensors(b) for b in resumed]
    assert len(got) == len(expected) - stop_after
    for want, have in zip(expected[stop_after:], got):
        for w, h in zip(want, have):
            assert torch.equal(w, h)
    assert resumed.validation.bad == full.validation.bad == {"label_not_binary": 3}
    assert resumed.validation.rows == full.validation.rows


def test_state_of_another_layout_is_refused(source, tmp_path):
    day = even_day(tmp_path, source)
    state = DayReader(day, SPEC, batch_size=100).state_dict()
    with pytest.raises(ValueError, match="batch_size is 100 in the state, 50 here"):
        DayReader(day, SPEC, batch_size=50).load_state_dict(state)


def test_a_file_replaced_with_the_same_layout_has_another_fingerprint(source, tmp_path):
    """The cursor sees only the layout (row groups and their rows), which a file rewritten with other rows keeps: the
    footers pass also takes each file's fingerprint (size, hash of its Parquet footer) for the trainer's ledger."""
    day = write_day(tmp_path, [(source.slice(0, 1000), 500), (source.slice(1000, 1000), 500)])
    file = str(day.path / "part-0.parquet")
    before = DayReader(day, SPEC, batch_size=100)
    assert sorted(before.fingerprints) == [file, str(day.path / "part-1.parquet")]
    assert before.fingerprints[file] == file_fingerprint(file)
    assert before.fingerprints[file].size == os.path.getsize(file)
    pq.write_table(source.slice(2000, 1000), file, row_group_size=500)  # the same layout, other rows
    after = DayReader(day, SPEC, batch_size=100)
    after.load_state_dict(before.state_dict())  # what the cursor alone cannot tell
    old_size, new_size = before.fingerprints[file].size, after.fingerprints[file].size
    assert old_size != new_size and file_changes(before.fingerprints, after.fingerprints) == [
        f"{file}: size {old_size} -> {new_size} bytes"]
    # the same size, other values: the footer's statistics differ
    plain = dict(compression="none", use_dictionary=False, row_group_size=50)
    pq.write_table(pa.table({"x": pa.array(range(100), pa.int64())}), tmp_path / "x.parquet", **plain)
    old = file_fingerprint(tmp_path / "x.parquet")
    pq.write_table(pa.table({"x": pa.array(range(100, 200), pa.int64())}), tmp_path / "x.parquet", **plain)
    assert file_changes({"x": old}, {"x": file_fingerprint(tmp_path / "x.parquet")}) == [
        f"x: same size ({old.size} bytes), another Parquet footer (other row groups or values)"]
    assert file_changes({"x": old}, {"y": old}) == ["x: removed", f"y: added ({old.size} bytes)"]


def _bad_rows(source: pa.Table, max_len_row: int) -> tuple[pa.Table, dict[int, str]]:
    """20 rows; rows 1.. each break one rule. Returns the table and {row: reason}."""
    schema = source.schema.set(source.schema.get_field_index("item_content"),
                               pa.field("item_content", pa.list_(pa.float32())))  # so a wrong size can be written
    rows = source.slice(0, 20).to_pylist()
    want = {}

    def breaks(i, reason, column, value):
        rows[i][column] = value
        want[i] = reason

    breaks(1, "null", "click", None)
    breaks(2, "label_not_binary", "click", 2)
    breaks(3, "not_finite", "item_ctr_prior", float("nan"))
    breaks(4, "not_finite", "item_content", [1.0] * 7 + [float("inf")])
    breaks(5, "dense_wrong_size", "item_content", [1.0] * 7)
    breaks(6, "negative_id", "user_id", -5)
    breaks(7, "id_out_of_range", "device", 9)  # oov = "error", table of 8
    breaks(8, "list_too_long", "long_item_ids", list(range(max_len_row + 1)))
    rows[8]["long_item_cats"] = [0] * (max_len_row + 1)
    breaks(9, "side_length_mismatch", "long_item_cats", rows[9]["long_item_cats"][:-1])
    breaks(10, "null", "item_tags", None)
    breaks(11, "null", "long_item_ids", [1, None, 3])
    rows[11]["long_item_cats"] = [1, 2, 3]
    breaks(12, "null", "user_city", None)
    breaks(13, "negative_id", "click_item_ids", [4, -1] + rows[13]["click_item_ids"][2:])
    breaks(14, "null", "user_activity", None)
    return pa.Table.from_pylist(rows, schema=schema), want


def test_every_reason_is_dropped_counted_and_quarantined(source, tmp_path):
    table, want = _bad_rows(source, max_len_row=500)
    day = write_day(tmp_path / "data", [(table, 20)])
    opts = ReaderOptions(error_budget=0.9, max_list_len=500)
    reader = DayReader(day, SPEC, batch_size=2, options=opts, quarantine_dir=tmp_path / "q")
    seen = [r for b in reader for r in real_ids(b)]
    assert sorted(seen) == sorted(set(range(20)) - set(want))  # the converter saw every good row, and only those
    counts = {}
    for reason in want.values():
        counts[reason] = counts.get(reason, 0) + 1
    assert reader.validation.bad == counts
    q = pq.read_table(tmp_path / "q" / "day=2026-11-01" / "part-0.rg0.parquet")
    got = dict(zip(q.column("_source_row").to_pylist(), q.column("_reason").to_pylist()))
    assert got == want
    assert set(q.column("_source_file").to_pylist()) == {str(day.files[0])}
    assert q.column("query_id").to_pylist() == sorted(want)  # the bad rows themselves, for inspection


def test_over_budget_day_stops_with_a_report(source, tmp_path):
    bad = source.slice(0, 1000)
    label = bad.column("click").to_numpy().copy()
    label[:30] = 7
    bad = bad.set_column(bad.schema.get_field_index("click"), "click", pa.array(label, pa.int8()))
    day = write_day(tmp_path, [(bad, 500)])
    reader = DayReader(day, SPEC, batch_size=100, options=ReaderOptions(error_budget=0.01),
                       quarantine_dir=tmp_path / "q")
    with pytest.raises(ValueError, match=r"day 2026-11-01: 30 of 1000 rows \(3.00%\) failed validation, over the "
                                         r"error budget of 1.00% .*'label_not_binary': 30.*q/day=2026-11-01"):
        list(reader)


def _errors(rank, world_size, day, opts):
    reader = DayReader(day, SPEC, batch_size=100, rank=rank, world_size=world_size, options=opts)
    try:
        for _ in reader:
            pass
    except ValueError as e:
        return str(e)
    return None


def test_a_rank_short_of_valid_rows_fills_up_and_every_valid_row_is_read_once(source, tmp_path):
    """150 bad rows (5% of the day: within budget) all in rank 0's share: rank 0 runs out of rows a batch and a
    half before rank 1, and fills its last batches with weight-0 rows instead of the day dropping rank 1's rest."""
    bad = source.slice(0, 1000)
    label = bad.column("click").to_numpy().copy()
    label[:150] = 5
    bad = bad.set_column(bad.schema.get_field_index("click"), "click", pa.array(label, pa.int8()))
    day = write_day(tmp_path, [(bad, 1000), (source.slice(1000, 1000), 500), (source.slice(2000, 600), 300),
                               (source.slice(2600, 400), 200)])
    (n0, ids0), (n1, ids1) = run_distributed(_rows_of, day, ReaderOptions(error_budget=0.05))
    assert n0 == n1 == 15
    assert [len(b) for b in ids0] == [100] * 13 + [50, 0]
    assert sorted(r for b in ids0 + ids1 for r in b) == list(range(150, 3000))


def test_budget_stop_is_raised_on_every_rank(source, tmp_path):
    bad = source.slice(0, 1000)
    label = bad.column("click").to_numpy().copy()
    label[:100] = 5
    bad = bad.set_column(bad.schema.get_field_index("click"), "click", pa.array(label, pa.int8()))
    day = write_day(tmp_path, [(bad, 1000), (source.slice(1000, 2000), 500)])
    e0, e1 = run_distributed(_errors, day, ReaderOptions(error_budget=0.01))
    assert "over the error budget" in e0 and "over the error budget" in e1


def test_corrupt_files_fail_or_are_skipped_and_counted(source, tmp_path):
    day = write_day(tmp_path, [(source.slice(0, 1000), 500), (source.slice(1000, 1000), 500)])
    (day.path / "part-2.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"part-2.parquet: cannot read the Parquet footer"):
        DayReader(day, SPEC, batch_size=100)
    with pytest.raises(ValueError, match=r"part-2.parquet.*data.max_corrupt_files"):  # its rows are unknown
        DayReader(day, SPEC, batch_size=100, options=ReaderOptions(on_corrupt_file="skip"))
    reader = DayReader(day, SPEC, batch_size=100, options=ReaderOptions(on_corrupt_file="skip", max_corrupt_files=1))
    assert len(list(reader)) == len(reader) == 20
    assert reader.corrupt_files == [str(day.path / "part-2.parquet")]
    assert "rows unknown" in reader.unknown_rows and reader.validation.bad == {}


def test_undecodable_row_group_fails_or_counts_its_rows(source, tmp_path):
    day = write_day(tmp_path, [(source.slice(0, 1000), 500)])
    path = day.files[0]
    data = bytearray(path.read_bytes())
    column = pq.ParquetFile(path).schema_arrow.get_field_index("long_item_ids")
    start = pq.ParquetFile(path).metadata.row_group(0).column(column).data_page_offset
    data[start + 20:start + 2020] = b"\x17" * 2000  # garbage inside the first row group's pages
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"part-0.parquet: row group 0 is unreadable"):
        list(DayReader(day, SPEC, batch_size=100))
    reader = DayReader(day, SPEC, batch_size=100, options=ReaderOptions(on_corrupt_file="skip", error_budget=0.6))
    assert len(list(reader)) == 5  # the 500 rows of row group 1
    assert reader.validation.bad == {"corrupt_row_group": 500}


def test_missing_column_names_the_file_and_column(source, tmp_path):
    day = write_day(tmp_path, [(source.slice(0, 500).drop_columns(["item_author"]), 500)])
    with pytest.raises(ValueError, match=r"part-0.parquet: missing column 'item_author'"):
        DayReader(day, SPEC, batch_size=100)


def test_truncation_keeps_the_most_recent_events(source, tmp_path):
    rows = source.slice(0, 4).to_pylist()
    for r in rows:
        r["long_item_ids"] = list(range(300))
        r["long_item_cats"] = [i % 7 for i in range(300)]
    day = write_day(tmp_path, [(pa.Table.from_pylist(rows, schema=source.schema), 4)])
    batch = next(iter(DayReader(day, SPEC, batch_size=2, options=ReaderOptions(error_budget=0.0))))
    ids = batch.sequence["long_item_ids"]
    max_len = SPEC.sequences[0].max_len
    assert ids.lengths().tolist() == [max_len, max_len]
    assert ids.values()[:max_len].tolist() == list(range(300 - max_len, 300))  # the newest, oldest first


def test_scan_days_reports_what_it_skipped(tmp_path, source):
    for name, done in (("dt=2026-11-01", True), ("dt=2026-11-02", False), ("dt=2026-11-03.tmp", False),
                       ("dt=2026-11-05", True)):
        (tmp_path / name).mkdir()
        pq.write_table(source.slice(0, 10), tmp_path / name / "part-0.parquet")
        if done:
            (tmp_path / name / "_SUCCESS").touch()
    scan = scan_days(tmp_path, None, partition_key="dt")
    assert [d.day.day for d in scan.found] == [1, 5]
    assert {s.path.name: s.reason.split(":")[0] for s in scan.skipped} == {
        "dt=2026-11-02": "no _SUCCESS marker", "dt=2026-11-03.tmp": "'2026-11-03.tmp' is not a YYYY-MM-DD date (an unfinished write?)"}
    assert "skipped dt=2026-11-02" in scan.summary()
    assert [d.complete for d in scan_days(tmp_path, None, partition_key="dt", require_success=False).found] == \
        [True, False, True]


def test_next_complete_day_waits_for_it(tmp_path, source):
    write_day(tmp_path, [(source.slice(0, 10), 10)])
    assert next_complete_day(tmp_path, DAY) is None  # nothing after it, no waiting
    later = DAY + dt.timedelta(days=2)
    timer = threading.Timer(0.2, write_day, args=(tmp_path, [(source.slice(0, 10), 10)], later))
    timer.start()
    start = time.monotonic()
    found = next_complete_day(tmp_path, DAY, timeout_s=10, poll_s=0.05)
    timer.join()
    assert found is not None and found.day == later and time.monotonic() - start < 5
    assert next_complete_day(tmp_path, later, timeout_s=0.1, poll_s=0.05) is None
