"""Synthetic logs: the declared schema, determinism, the long sequence's unique ratio, a learnable label."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from hyrank.pipeline.config import load_config
from hyrank.pipeline.data.days import discover_days
from hyrank.pipeline.data.split import row_groups
from hyrank.pipeline.data.synth import generate_logs, oracle_auc
from hyrank.pipeline.data.validate import check_schema

from conftest import DEFAULT_CONFIG, small_synth


def test_layout_and_success_markers(synth_root):
    days = discover_days(synth_root)
    assert [d.path.name for d in days] == ["day=2026-11-01", "day=2026-11-02", "day=2026-11-03"]
    for d in days:
        assert (d.path / "_SUCCESS").exists() and d.files
        assert sum(r.num_rows for r in row_groups(d)) == 6000
    assert not list(synth_root.glob("*.tmp"))


def test_every_declared_column_exists_with_its_type(synth_root):
    spec = load_config(DEFAULT_CONFIG).features
    for day in discover_days(synth_root):
        for f in day.files:
            check_schema(spec, pq.read_schema(f), str(f))


def test_missing_column_names_column_and_file(synth_root):
    spec = load_config(DEFAULT_CONFIG).features
    file = discover_days(synth_root)[0].files[0]
    schema = pq.read_schema(file).remove(pq.read_schema(file).get_field_index("item_tags"))
    with pytest.raises(ValueError, match=rf"{file}: missing column 'item_tags'"):
        check_schema(spec, schema, str(file))


def test_wrong_type_names_column(synth_root):
    spec = load_config(DEFAULT_CONFIG).features
    file = discover_days(synth_root)[0].files[0]
    schema = pq.read_schema(file)
    i = schema.get_field_index("long_item_ids")
    import pyarrow as pa
    schema = schema.set(i, pa.field("long_item_ids", pa.list_(pa.float32())))
    with pytest.raises(ValueError, match=r"column 'long_item_ids' has type list<item: float>.*list<int64>"):
        check_schema(spec, schema, str(file))


def test_same_seed_gives_identical_files(tmp_path):
    cfg = small_synth(rows_per_day=1500, num_days=2)
    a = generate_logs(cfg, tmp_path / "a")
    b = generate_logs(cfg, tmp_path / "b")
    for da, db in zip(a, b):
        for fa, fb in zip(sorted(da.glob("*.parquet")), sorted(db.glob("*.parquet"))):
            assert fa.read_bytes() == fb.read_bytes()
    c = generate_logs(small_synth(rows_per_day=1500, num_days=1, seed=8), tmp_path / "c")
    assert not pq.read_table(c[0]).equals(pq.read_table(a[0]))


def test_long_sequence_holds_about_a_quarter_unique_ids(tmp_path):
    day = generate_logs(small_synth(rows_per_day=1000, num_days=1, long_len_min=400, long_len_max=600), tmp_path)[0]
    seqs = pq.read_table(day, columns=["long_item_ids"]).column("long_item_ids").to_pylist()
    ratios = [len(set(s)) / len(s) for s in seqs]
    assert all(400 <= len(s) <= 600 for s in seqs)
    assert 0.22 <= float(np.mean(ratios)) <= 0.28


def test_side_info_is_aligned(synth_root):
    t = pq.read_table(discover_days(synth_root)[0].path, columns=["long_item_ids", "long_item_cats", "long_ts", "ts"])
    ids, cats, ts = (t.column(c).to_pylist()[:50] for c in ("long_item_ids", "long_item_cats", "long_ts"))
    for i, c, s, now in zip(ids, cats, ts, t.column("ts").to_pylist()):
        assert len(i) == len(c) == len(s)
        assert s == sorted(s) and s[-1] < now  # oldest first, all before the request


def test_oracle_auc_is_informative_but_not_perfect(synth_root):
    for day in discover_days(synth_root):
        value = oracle_auc(day.path)
        assert 0.7 < value < 0.95
    labels = pq.read_table(discover_days(synth_root)[0].path, columns=["click"]).column("click").to_numpy()
    assert 0.05 < labels.mean() < 0.4


def test_parallel_workers_write_the_same_files(tmp_path):
    cfg = small_synth(rows_per_day=800, num_days=2)
    serial = generate_logs(cfg, tmp_path / "serial")
    parallel = generate_logs(cfg, tmp_path / "parallel", workers=2)
    for a, b in zip(serial, parallel):
        assert pq.read_table(a).equals(pq.read_table(b))
