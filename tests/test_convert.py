"""Arrow -> Batch: KJTs from list offsets, truncation to the most recent events, OOV policy, clear errors."""

import decimal

import numpy as np
import pyarrow as pa
import pytest
import torch

from hyrank.pipeline.data.convert import BatchConverter, stable_hash, truncate_recent
from hyrank.pipeline.data.features import DenseFeature, FeatureSpec, SequenceFeature, SideInfo, SparseFeature, TableSpec


def _spec(**kw) -> FeatureSpec:
    base = dict(
        label="y",
        group="q",
        tables=[TableSpec("t", 10, 4), TableSpec("s", 100, 4), TableSpec("c", 5, 4)],
        sparse=[SparseFeature("a", "t"), SparseFeature("b", "t", oov="error"), SparseFeature("tgt", "s")],
        dense=[DenseFeature("x", norm="log1p"), DenseFeature("v", size=2)],
        sequences=[SequenceFeature("hist", "h", "s", max_len=3, side=[SideInfo("hc", "c")])],
        blocks={"u": ["a", "x"], "i": ["b", "tgt", "v"]},
    )
    base.update(kw)
    return FeatureSpec(**base)


def _table(**cols):
    base = dict(
        y=pa.array([1, 0, 1], pa.int8()),
        q=pa.array([7, 7, 8]),
        a=pa.array([1, 12, 3]),  # 12 is out of range: hashed to 2
        b=pa.array([[1, 2], [], [3]]),
        tgt=pa.array([5, 6, 7]),
        x=pa.array([0.0, 1.0, 3.0], pa.float32()),
        v=pa.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], pa.list_(pa.float32(), 2)),
        h=pa.array([[10, 11, 12, 13, 14], [20], []]),
        hc=pa.array([[0, 1, 2, 3, 4], [1], []]),
    )
    base.update(cols)
    return pa.table(base)


def test_batch_from_arrow():
    b = BatchConverter(_spec())(_table())
    assert b.pooled.keys() == ["a", "b"]
    assert b.pooled["a"].values().tolist() == [1, 2, 3]
    assert b.pooled["b"].lengths().tolist() == [2, 0, 1]
    assert b.sequence.keys() == ["tgt", "h", "hc"]
    assert b.sequence["h"].lengths().tolist() == [3, 1, 0]
    assert b.sequence["h"].values().tolist() == [12, 13, 14, 20]  # the 3 most recent, oldest first
    assert b.sequence["hc"].values().tolist() == [2, 3, 4, 1]
    # dense: block order (u: x, then i: v); log1p applied
    torch.testing.assert_close(b.dense[:, 0], torch.log1p(torch.tensor([0.0, 1.0, 3.0])))
    assert b.dense[:, 1:].tolist() == [[1, 2], [3, 4], [5, 6]]
    assert b.labels.tolist() == [1.0, 0.0, 1.0] and b.group_ids.tolist() == [7, 7, 8]


def test_sliced_arrow_input_respects_offsets():
    full = _table()
    b = BatchConverter(_spec())(full.slice(1, 2))
    assert b.sequence["h"].values().tolist() == [20] and b.pooled["b"].values().tolist() == [3]


@pytest.mark.parametrize("order,expected", [("newest_last", [3, 4, 5, 9]), ("newest_first", [3, 2, 1, 9])])
def test_truncation_keeps_most_recent(order, expected):
    lengths = np.array([5, 1, 0])
    values = np.array([1, 2, 3, 4, 5, 9])
    kept, out = truncate_recent(lengths, values, 3, order)
    assert kept.tolist() == [3, 1, 0] and out.tolist() == expected


def test_oov_error_names_column_and_row():
    with pytest.raises(ValueError, match=r"f.parquet: column 'b', row 12: id 10 >= table size 10"):
        BatchConverter(_spec())(_table(b=pa.array([[1], [2], [3, 10]])), source="f.parquet", first_row=10)


def test_negative_id_is_an_error():
    with pytest.raises(ValueError, match=r"column 'a', row 1: negative id -4"):
        BatchConverter(_spec())(_table(a=pa.array([1, -4, 3])))


def test_string_ids_hash_stably():
    strings = pa.array(["x", "y", "x"])
    h = stable_hash(strings)
    assert h[0] == h[2] != h[1] and (h >= 0).all()
    assert h[0] == stable_hash(pa.array(["x"]))[0]  # same value, same id, in any batch
    b = BatchConverter(_spec())(_table(a=strings))
    assert b.pooled["a"].values().tolist() == (h % 10).tolist()


@pytest.mark.parametrize("cols,message", [
    (dict(y=pa.array([1, 2, 0])), r"column 'y', row 1: label 2.0 is not 0 or 1"),
    (dict(y=pa.array([1, None, 0])), r"column 'y', row 1: is null"),
    (dict(x=pa.array([0.0, float("nan"), 1.0])), r"column 'x', row 1: holds NaN or Inf"),
    (dict(x=pa.array([0.0, -2.0, 1.0])), r"column 'x', row 1: is negative but norm = 'log1p'"),
    (dict(v=pa.array([[1.0, 2.0], [3.0], [5.0, 6.0]])), r"column 'v', row 1: must hold 2 floats"),
    (dict(hc=pa.array([[0, 1, 2, 3, 4], [1, 1], []])), r"column 'hc', row 1: has 2 events but 'h' has 1"),
    (dict(h=pa.array([[10, None], [20], []])), r"column 'h', row 0: holds a null id"),
    # a null value inside a dense list is named as such, not as the NaN it would become
    (dict(v=pa.array([[1, 2], [3, 4], [5, None]])), r"column 'v', row 2: holds a null value"),
    # a valid index to a null dictionary entry is a null (Arrow's null_count says 0): an error, not a crash
    (dict(q=pa.DictionaryArray.from_arrays(pa.array([0, 1, 0], pa.int32()), pa.array(["g", None]))),
     r"column 'q', row 1: is null"),
])
def test_bad_values_are_errors_not_zeros(cols, message):
    with pytest.raises(ValueError, match=message):
        BatchConverter(_spec())(_table(**cols))


def _truncate_reference(lengths, values, max_len, order):
    """Row by row: the `max_len` most recent events of each row, oldest first."""
    out_lengths, out_values, start = [], [], 0
    for n in lengths.tolist():
        row = values[start:start + n].tolist()
        start += n
        kept = row[n - min(n, max_len):] if order == "newest_last" else row[:min(n, max_len)][::-1]
        out_lengths.append(len(kept))
        out_values += kept
    return out_lengths, out_values


@pytest.mark.parametrize("order", ["newest_last", "newest_first"])
def test_truncation_matches_a_row_by_row_reference(order):
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = rng.integers(0, 12, rng.integers(0, 20)).astype(np.int64)
        values = rng.integers(0, 1000, lengths.sum()).astype(np.int64)
        max_len = int(rng.integers(1, 10))
        kept, out = truncate_recent(lengths, values, max_len, order)
        assert (kept.tolist(), out.tolist()) == _truncate_reference(lengths, values, max_len, order)


def test_validated_id_bounds_give_the_same_batch():
    """id_max (from validation) only skips the range pass: the ids are the same, hashed ones included."""
    table = _table()
    plain = BatchConverter(_spec())(table)
    bounds = {"a": 12, "b": 3, "tgt": 7, "h": 20, "hc": 4}  # a: 12 >= 10, so `a` still takes the hashing path
    hinted = BatchConverter(_spec())(table, id_max=bounds)
    for kjt in ("pooled", "sequence"):
        want, got = getattr(plain, kjt), getattr(hinted, kjt)
        assert want.keys() == got.keys()
        assert torch.equal(want.values(), got.values()) and torch.equal(want.lengths(), got.lengths())
    assert hinted.pooled["a"].values().tolist() == [1, 2, 3]


# -- validation and conversion accept the same Arrow types (pipeline/data/schema.py) ------------------------------

_SCALARS = [pa.int8(), pa.int32(), pa.int64(), pa.uint8(), pa.uint64(), pa.bool_(), pa.float16(), pa.float32(),
            pa.float64(), pa.string(), pa.large_string(), pa.dictionary(pa.int32(), pa.string()),
            pa.dictionary(pa.int8(), pa.int64()), pa.binary(), pa.date32(), pa.timestamp("s"),
            pa.decimal128(5, 2), pa.null(), pa.struct([("a", pa.int64())])]
_LISTS = [wrap(v) for wrap in (pa.list_, pa.large_list, lambda v: pa.list_(v, 2))
          for v in (pa.int64(), pa.uint8(), pa.float32(), pa.float64(), pa.string(),
                    pa.dictionary(pa.int32(), pa.string()), pa.bool_())]
_TYPES = _SCALARS + _LISTS + [pa.list_(pa.float32(), 3), pa.list_(pa.list_(pa.int64()))]


def _sample(t: pa.DataType, n: int) -> pa.Array:
    """n valid values of type `t` for any column that takes it: 0/1 (labels, ids in range, finite floats), and
    lists of 2 such values (the dense list feature has size 2) or of the fixed size."""
    if pa.types.is_fixed_size_list(t):
        return pa.FixedSizeListArray.from_arrays(_sample(t.value_type, n * t.list_size), t.list_size)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        offsets = pa.array(np.arange(n + 1) * 2, pa.int64() if pa.types.is_large_list(t) else pa.int32())
        make = pa.LargeListArray if pa.types.is_large_list(t) else pa.ListArray
        return make.from_arrays(offsets, _sample(t.value_type, 2 * n))
    if pa.types.is_dictionary(t):
        return _sample(t.value_type, n).dictionary_encode().cast(t)
    bits = [i % 2 for i in range(n)]
    if pa.types.is_null(t):
        return pa.nulls(n)
    if pa.types.is_struct(t):
        return pa.array([{"a": b} for b in bits], t)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t):
        return pa.array([str(b) for b in bits], t)
    if pa.types.is_boolean(t):
        return pa.array([bool(b) for b in bits], t)
    if pa.types.is_date(t) or pa.types.is_timestamp(t):
        return pa.array(bits, pa.int32() if pa.types.is_date32(t) else pa.int64()).view(t)
    if pa.types.is_decimal(t):
        return pa.array([decimal.Decimal(b) for b in bits], t)
    return pa.array(bits, pa.int64()).cast(t)


def _error(fn) -> str | None:
    """The ValueError `fn` raises, as text; None if it returns."""
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


# one column of each kind in _spec(oracle="o"): label, group, sparse id, sequence ids, dense, dense list, oracle
_KINDS = {"label": "y", "group": "q", "sparse": "a", "sequence": "h", "dense": "x", "dense list": "v", "oracle": "o"}
# facts the shared definition pins down; float labels were refused by validation but converted (issue 13)
_PINNED = [("y", pa.float64(), True), ("y", pa.bool_(), True), ("y", pa.string(), False),
           ("a", pa.list_(pa.int64(), 2), True), ("a", pa.list_(pa.string()), True),
           ("h", pa.list_(pa.string()), False), ("x", pa.list_(pa.float32()), False),
           ("v", pa.list_(pa.float32(), 3), False), ("o", pa.int64(), False), ("q", pa.float32(), False)]


@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_validation_and_conversion_accept_the_same_types(kind):
    """Every type check_schema accepts validates clean and converts; every type it refuses, conversion refuses
    with the same message."""
    from hyrank.pipeline.data.schema import column_kinds
    from hyrank.pipeline.data.validate import check_schema, validate_rows

    spec, column = _spec(oracle="o"), _KINDS[kind]
    assert column_kinds(spec)[column].name == kind
    accepted, disagree = [], []
    for t in _TYPES:
        cols = {"o": pa.array([0.1, 0.5, 0.9]), column: _sample(t, 3)}
        if column == "h":  # side info aligned with the ids: 2 events per row
            cols["hc"] = _sample(pa.list_(pa.int64()), 3)
        table = _table(**cols)
        refused = _error(lambda: check_schema(spec, table.schema, "f.parquet"))
        converting = _error(lambda: BatchConverter(spec)(table, source="f.parquet"))
        if refused is not None:
            if converting != refused:
                disagree.append(f"{t}: validation refuses it ({refused}); conversion: {converting or 'converts it'}")
            continue
        accepted.append(t)
        verdict = validate_rows(table, spec, max_list_len=10)
        if verdict.num_bad:
            disagree.append(f"{t}: accepted, but its valid rows fail validation: {verdict.counts()}")
        if converting is not None:
            disagree.append(f"{t}: accepted by validation, refused by conversion: {converting}")
    assert not disagree, "\n".join(disagree)
    assert accepted and len(accepted) < len(_TYPES)  # each kind takes some types and refuses others
    for col, t, ok in _PINNED:
        if col == column:
            assert (t in accepted) == ok, (col, t)


def test_float_labels_convert_and_a_refused_type_names_the_column():
    b = BatchConverter(_spec())(_table(y=pa.array([1.0, 0.0, 1.0])))
    assert b.labels.tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match=r"f.parquet: column 'y' has type string, .* label column"):
        BatchConverter(_spec())(_table(y=pa.array(["1", "0", "1"])), source="f.parquet")
    with pytest.raises(ValueError, match=r"column 'y', row 1: label nan is not 0 or 1"):
        BatchConverter(_spec())(_table(y=pa.array([1.0, float("nan"), 0.0])))


def test_fixed_size_lists_convert_like_lists():
    """Validation has always accepted fixed-size id lists; conversion now reads them (sliced, too)."""
    ids = [[1, 2], [3, 4], [5, 6]]
    as_lists = _table(b=pa.array(ids), h=pa.array([[10, 11], [20, 21], [30, 31]]), hc=pa.array([[0, 1]] * 3))
    fixed = _table(b=pa.array(ids, pa.list_(pa.int64(), 2)), h=pa.array([[10, 11], [20, 21], [30, 31]],
                   pa.list_(pa.int64(), 2)), hc=pa.array([[0, 1]] * 3, pa.list_(pa.int64(), 2)))
    for rows in (slice(0, 3), slice(1, 3)):
        want = BatchConverter(_spec())(as_lists.slice(rows.start, rows.stop - rows.start))
        got = BatchConverter(_spec())(fixed.slice(rows.start, rows.stop - rows.start))
        for kjt in ("pooled", "sequence"):
            assert torch.equal(getattr(got, kjt).values(), getattr(want, kjt).values())
            assert torch.equal(getattr(got, kjt).lengths(), getattr(want, kjt).lengths())
    with pytest.raises(ValueError, match=r"column 'b', row 1: holds a null id"):
        BatchConverter(_spec())(_table(b=pa.array([[1, 2], [None, 4], [5, 6]], pa.list_(pa.int64(), 2))))
