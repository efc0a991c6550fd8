"""validate_rows: each reason on a hand-made table, first reason wins, the fast path, budget errors."""

import pyarrow as pa
import pytest

from hyrank.pipeline.data.features import DenseFeature, FeatureSpec, SequenceFeature, SideInfo, SparseFeature, TableSpec
from hyrank.pipeline.data.validate import REASONS, DayValidation, check_schema, validate_rows


def _spec() -> FeatureSpec:
    return FeatureSpec(
        label="y", group="q", tables=[TableSpec("t", 10, 4), TableSpec("c", 5, 4)],
        sparse=[SparseFeature("a", "t", oov="error"), SparseFeature("s", "t")],
        dense=[DenseFeature("x"), DenseFeature("v", size=2)],
        sequences=[SequenceFeature("hist", "h", "t", max_len=2, side=[SideInfo("hc", "c")])])


def _table(**cols) -> pa.Table:
    n = 9
    base = dict(
        y=pa.array([1, None, 2, 0, 0, 0, 0, 0, 1], pa.int8()),
        q=pa.array(range(n)),
        a=pa.array([1, 2, 3, -1, 12, 4, 5, 6, 7]),
        s=pa.array(["u"] * 5 + [None] + ["u"] * 3),
        x=pa.array([0.5] * 6 + [float("nan")] + [0.5] * 2, pa.float32()),
        v=pa.array([[1.0, 2.0]] * 7 + [[1.0]] + [[1.0, 2.0]], pa.list_(pa.float32())),
        h=pa.array([[1, 2]] * 8 + [[1, 2, 3, 4]]),
        hc=pa.array([[0, 1]] * 8 + [[0, 1, 2]]),
    )
    base.update(cols)
    return pa.table(base)


def test_each_row_gets_its_first_reason():
    verdict = validate_rows(_table(), _spec(), max_list_len=3)
    assert verdict.reasons().tolist() == ["", "null", "label_not_binary", "negative_id", "id_out_of_range", "null",
                                          "not_finite", "dense_wrong_size", "list_too_long"]
    assert verdict.column_B.tolist()[1:] == ["y", "y", "a", "a", "s", "x", "v", "h"]
    assert verdict.counts() == {"null": 2, "label_not_binary": 1, "negative_id": 1, "id_out_of_range": 1,
                                "not_finite": 1, "dense_wrong_size": 1, "list_too_long": 1}
    assert verdict.good_B.tolist() == [True] + [False] * 8


def test_side_info_mismatch_and_null_elements():
    table = _table(h=pa.array([[1, 2]] * 7 + [[1, None], [1, 2]]), hc=pa.array([[0, 1]] * 8 + [[0]]),
                   v=pa.array([[1.0, 2.0]] * 9, pa.list_(pa.float32())), y=pa.array([1] * 9, pa.int8()),
                   a=pa.array([1] * 9), s=pa.array(["u"] * 9), x=pa.array([0.5] * 9, pa.float32()))
    assert validate_rows(table, _spec(), max_list_len=10).reasons().tolist() == [""] * 7 + ["null", "side_length_mismatch"]


def test_clean_table_and_sliced_lists():
    table = _table().slice(0, 1)
    assert validate_rows(table, _spec(), max_list_len=10).num_bad == 0
    tail = pa.concat_tables([_table().slice(0, 1)] * 3).slice(1)  # offsets that do not start at 0
    assert validate_rows(tail, _spec(), max_list_len=10).counts() == {}


def test_budget_report_and_schema():
    v = DayValidation("2026-11-01", quarantine="/runs/q/day=2026-11-01")
    v.add(1000, {"null": 8, "negative_id": 4})
    assert v.over_budget(0.01) and not v.over_budget(0.02)
    assert DayValidation.from_vector(v.day, v.as_vector()).bad == v.bad
    with pytest.raises(ValueError, match=r"day 2026-11-01: 12 of 1000 rows \(1.20%\).*'negative_id': 4.*/runs/q"):
        raise v.budget_error(0.01)
    with pytest.raises(ValueError, match=r"f.parquet: missing column 'hc'"):
        check_schema(_spec(), _table().drop_columns(["hc"]).schema, "f.parquet")
    assert len(REASONS) == len(set(REASONS))


def test_id_max_bounds_every_integer_id_column():
    verdict = validate_rows(_table(), _spec(), max_list_len=3)
    # over all rows, bad ones included (a: 12 is out of range); string ids (s) are hashed, so no bound
    assert verdict.id_max == {"a": 12, "h": 4, "hc": 2}


def test_float_labels_and_dictionary_encoded_integer_ids():
    """Float labels are labels (0.0/1.0; anything else is a bad row), and integer ids keep their range checks
    when dictionary-encoded: the converter takes them as rows, like plain integers."""
    table = _table().slice(0, 1)
    n = 4
    table = pa.table({**{c: pa.concat_arrays([table.column(c).chunk(0)] * n) for c in table.column_names},
                      "y": pa.array([1.0, 0.0, 0.5, float("nan")]),
                      "a": pa.array([1, 2, 3, -1]).dictionary_encode()})
    check_schema(_spec(), table.schema, "f.parquet")
    assert validate_rows(table, _spec(), max_list_len=10).reasons().tolist() == \
        ["", "", "label_not_binary", "label_not_binary"]
    table = table.set_column(table.schema.get_field_index("y"), "y", pa.array([1.0] * n))
    verdict = validate_rows(table, _spec(), max_list_len=10)
    assert verdict.reasons().tolist() == ["", "", "", "negative_id"] and verdict.id_max["a"] == 3
