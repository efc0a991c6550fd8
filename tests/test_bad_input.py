"""Bad input never stops a run from the wrong place: every value the converter refuses is refused by validation
first (counted per reason, quarantined with its source file and row), the files of a day must agree on their
column types before training starts, string ids are reported as hashed, and unreadable footers count as unknown
rows (issue 14)."""

import dataclasses
import datetime as dt
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hyrank.pipeline.config import load_config
from hyrank.pipeline.data.convert import BatchConverter
from hyrank.pipeline.data.days import discover_days
from hyrank.pipeline.data.features import DenseFeature, FeatureSpec, SequenceFeature, SideInfo, SparseFeature, TableSpec
from hyrank.pipeline.data.options import ReaderOptions
from hyrank.pipeline.data.reader import DayReader
from hyrank.pipeline.data.split import read_footers
from hyrank.pipeline.data.validate import REASONS, DayValidation, check_schema, validate_rows

from conftest import DEFAULT_CONFIG

# One column of every kind and type the converter treats differently.
SPEC = FeatureSpec(
    label="y", group="q", oracle="p",
    tables=[TableSpec("t", 10, 4), TableSpec("big", 1000, 4), TableSpec("c", 5, 4)],
    sparse=[SparseFeature("a", "t", oov="error"), SparseFeature("s", "t"), SparseFeature("u", "big"),
            SparseFeature("m", "t", oov="error"), SparseFeature("ms", "t")],
    dense=[DenseFeature("x", norm="log1p"), DenseFeature("xi", norm="log1p"), DenseFeature("w"),
           DenseFeature("v", size=2), DenseFeature("vi", size=2)],
    sequences=[SequenceFeature("hist", "h", "big", max_len=2, side=[SideInfo("hc", "c", oov="error")])])
N = 6
MAX_LIST_LEN = 4
BASE = {  # column -> (values of N clean rows, Arrow type)
    "y": ([1, 0, 1, 0, 1, 0], pa.int8()),
    "q": ([7, 7, 8, 8, 9, 9], pa.int64()),
    "p": ([0.1] * N, pa.float32()),
    "a": ([1, 2, 3, 4, 5, 6], pa.int64()),
    "s": ([1, 12, 3, 4, 5, 6], pa.int64()),  # 12: out of range, hashed
    "u": (["k", "l", "k", "m", "n", "k"], pa.string()),
    "m": ([[1, 2], [3], [], [4], [5, 6], [7]], pa.list_(pa.int64())),
    "ms": ([["k"]] * N, pa.list_(pa.string())),
    "x": ([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], pa.float32()),
    "xi": ([0, 1, 2, 3, 4, 5], pa.int64()),
    "w": ([0.5] * N, pa.float64()),
    "v": ([[1.0, 2.0]] * N, pa.list_(pa.float32())),
    "vi": ([[1, 2]] * N, pa.list_(pa.int64())),
    "h": ([[1, 2]] * N, pa.list_(pa.int64())),
    "hc": ([[0, 1]] * N, pa.list_(pa.int64())),
}


def _null_in_dictionary(values: list, row: int) -> pa.Array:
    """Strings whose `row` is a valid index to a null dictionary entry: null, though null_count says 0."""
    indices = [0] * len(values)
    indices[row] = 1
    return pa.DictionaryArray.from_arrays(pa.array(indices, pa.int32()), pa.array(["k", None]))


def _list_of_null_in_dictionary(values: list, row: int) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(range(len(values) + 1), pa.int32()),
                                    _null_in_dictionary(values, row))


@dataclasses.dataclass
class Case:
    column: str
    bad: object
    reason: str
    converter_refuses: bool = True  # False: a value only validation refuses (it would train on garbage)
    type: pa.DataType | None = None  # when the bad value needs another type for the whole column
    build: object = None  # (clean values, row) -> the column, for values a Python list cannot spell

    def column_with_bad(self, row: int) -> pa.Array:
        values, t = BASE[self.column]
        if self.build is not None:
            return self.build(values, row)
        values = list(values)
        values[row] = self.bad
        return pa.array(values, self.type or t)

    def __str__(self) -> str:
        return f"{self.column}={self.bad!r}:{self.reason}"


NAN, INF = float("nan"), float("inf")
BIG_U64 = 2 ** 63 + 1  # an unsigned id int64 cannot hold: it would wrap to a negative id in the converter
CASES = [
    Case("y", None, "null"), Case("y", 2, "label_not_binary"),
    Case("y", NAN, "label_not_binary", type=pa.float32()),
    Case("q", None, "null"), Case("q", "dict", "null", build=_null_in_dictionary),
    Case("p", None, "null"), Case("p", NAN, "not_finite", converter_refuses=False),
    Case("a", None, "null"), Case("a", -1, "negative_id"), Case("a", 10, "id_out_of_range"),
    Case("s", -3, "negative_id"), Case("s", BIG_U64, "id_out_of_range", type=pa.uint64()),
    Case("u", None, "null"), Case("u", "dict", "null", build=_null_in_dictionary),
    Case("m", None, "null"), Case("m", [1, None], "null"), Case("m", [-1], "negative_id"),
    Case("m", [10], "id_out_of_range"), Case("m", [1] * (MAX_LIST_LEN + 1), "list_too_long", converter_refuses=False),
    Case("ms", [None], "null"), Case("ms", "dict", "null", build=_list_of_null_in_dictionary),
    Case("x", None, "null"), Case("x", NAN, "not_finite"), Case("x", INF, "not_finite"),
    Case("x", -0.5, "norm_out_of_domain"), Case("xi", -1, "norm_out_of_domain"),
    Case("w", 1e39, "not_finite", type=pa.float64()),  # finite in float64, Inf in the converter's float32
    Case("v", [1.0], "dense_wrong_size"), Case("v", [1.0, NAN], "not_finite"), Case("v", [1.0, None], "null"),
    Case("vi", [1, None], "null"), Case("vi", None, "null"),
    Case("h", [1, None], "null"), Case("h", [-2, 1], "negative_id"),
    Case("h", [BIG_U64, 1], "id_out_of_range", type=pa.list_(pa.uint64())),
    Case("hc", [0], "side_length_mismatch"), Case("hc", [0, 5], "id_out_of_range"),
]


def _clean() -> dict[str, pa.Array]:
    return {c: pa.array(values, t) for c, (values, t) in BASE.items()}


def _convert_good(table: pa.Table):
    """What the reader does with a row group: validate, keep the good rows, convert them with the id bounds."""
    verdict = validate_rows(table, SPEC, max_list_len=MAX_LIST_LEN)
    good = table.filter(pa.array(verdict.good_B))
    batch = BatchConverter(SPEC)(good, source="f.parquet", id_max=verdict.id_max)
    assert batch.labels.shape[0] == good.num_rows
    assert np.isfinite(batch.dense.numpy()).all()
    return verdict, batch


def test_the_cases_cover_every_reason_validation_gives_a_row():
    assert {c.reason for c in CASES} == set(REASONS) - {"corrupt_row_group"}  # that one is the reader's


@pytest.mark.parametrize("case", CASES, ids=str)
def test_validation_refuses_what_the_converter_refuses(case):
    row = 3
    table = pa.table(_clean() | {case.column: case.column_with_bad(row)})
    check_schema(SPEC, table.schema, "f.parquet")  # a type every file may have: only the value is bad
    verdict, batch = _convert_good(table)
    assert verdict.reasons().tolist() == [""] * row + [case.reason] + [""] * (N - row - 1)
    assert verdict.column_B[row] == case.column and batch.labels.shape[0] == N - 1
    if case.converter_refuses:  # the case is real: unvalidated, the converter stops on it, naming the row
        with pytest.raises(ValueError, match=rf"f.parquet: column '{case.column}', row {10 + row}: "):
            BatchConverter(SPEC)(table, source="f.parquet", first_row=10)
    else:
        BatchConverter(SPEC)(table)


@pytest.mark.parametrize("seed", range(25))
def test_rows_validation_accepts_always_convert(seed):
    """Property: bad values of several columns at random rows; exactly the touched rows are dropped, and the
    rest converts."""
    rng = np.random.default_rng(seed)
    columns = _clean()
    touched = set()
    by_column: dict[str, list[Case]] = {}
    for case in CASES:
        by_column.setdefault(case.column, []).append(case)
    for column in rng.choice(sorted(by_column), size=int(rng.integers(1, 6)), replace=False):
        case = by_column[column][rng.integers(len(by_column[column]))]
        row = int(rng.integers(N))
        columns[column] = case.column_with_bad(row)
        touched.add(row)
    verdict, batch = _convert_good(pa.table(columns))
    assert set(np.flatnonzero(~verdict.good_B).tolist()) == touched
    assert batch.labels.shape[0] == N - len(touched)


# -- through the reader --------------------------------------------------------------------------------------------

DEFAULT_SPEC = load_config(DEFAULT_CONFIG).features
DAY = dt.date(2026, 11, 1)


@pytest.fixture(scope="module")
def source(synth_root) -> pa.Table:
    return pq.read_table(discover_days(synth_root)[0].path).slice(0, 1000)


def _write_day(root, tables: list[pa.Table], rows_per_group: int = 250):
    path = root / f"day={DAY.isoformat()}"
    path.mkdir(parents=True)
    for i, table in enumerate(tables):
        pq.write_table(table, path / f"part-{i}.parquet", row_group_size=rows_per_group)
    (path / "_SUCCESS").touch()
    return discover_days(root)[0]


def _set(table: pa.Table, column: str, array: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(column), column, array)


def test_a_negative_log1p_value_is_quarantined_with_its_source_row(source, tmp_path):
    """The issue's case: one negative value in a log1p column stopped the run naming 'row 1' of a batch."""
    activity = source.column("user_activity").to_numpy().copy()
    activity[13] = -2.0
    day = _write_day(tmp_path / "logs", [_set(source, "user_activity", pa.array(activity))])
    reader = DayReader(day, DEFAULT_SPEC, batch_size=100, options=ReaderOptions(error_budget=0.01),
                       quarantine_dir=tmp_path / "q")
    assert len(list(reader)) == len(reader) > 0
    assert reader.validation.bad == {"norm_out_of_domain": 1}
    quarantined = pa.concat_tables(pq.read_table(f) for f in sorted((tmp_path / "q").rglob("*.parquet")))
    assert quarantined.select(["_reason", "_column", "_source_row"]).to_pylist() == \
        [{"_reason": "norm_out_of_domain", "_column": "user_activity", "_source_row": 13}]
    assert quarantined.column("_source_file")[0].as_py() == str(day.path / "part-0.parquet")


# -- the files of a day ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,described", [
    (pa.field("user_id", pa.int32()), "int32"), (pa.field("user_id", pa.string()), "string"),
    (pa.field("user_id", pa.int64(), nullable=False), "int64 not null")])  # Arrow refuses to concatenate those too
def test_a_column_whose_type_differs_between_files_is_named_before_training(source, tmp_path, field, described):
    second = source.slice(500).cast(source.schema.set(source.schema.get_field_index("user_id"), field))
    day = _write_day(tmp_path, [source.slice(0, 500), second])
    with pytest.raises(ValueError) as e:
        read_footers(day, DEFAULT_SPEC)
    message = str(e.value)
    assert message == (f"{day.path / 'part-1.parquet'}: column 'user_id' is {described}, but "
                       f"{day.path / 'part-0.parquet'} has it as int64: every file of a day must give the feature "
                       "spec's columns the same type")
    with pytest.raises(ValueError, match="column 'user_id' is"):
        DayReader(day, DEFAULT_SPEC, batch_size=100)  # before the first batch, not mid-day


def test_string_ids_are_reported_once_per_column_per_day(source, tmp_path, caplog):
    day = _write_day(tmp_path, [source.slice(0, 500), source.slice(500)])
    with caplog.at_level(logging.WARNING, logger="hyrank.pipeline.data.split"):
        read_footers(day, DEFAULT_SPEC)
        read_footers(day, DEFAULT_SPEC)  # evaluation reads the day's footers again: no second line
    warnings = [r.getMessage() for r in caplog.records if "hashed" in r.getMessage()]
    assert warnings == [f"{day.path / 'part-0.parquet'}: column 'user_city' holds strings (string): they are hashed "
                        "into the 512 rows of table 'city' (distinct strings may share a row; oov = 'hash' does not "
                        "apply)"]


def test_unreadable_footers_are_unknown_rows_over_budget_unless_allowed(source, tmp_path):
    day = _write_day(tmp_path, [source.slice(0, 500), source.slice(500)])
    for name in ("part-2.parquet", "part-3.parquet"):
        (day.path / name).write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"part-2.parquet: cannot read the Parquet footer"):
        read_footers(day, DEFAULT_SPEC)
    with pytest.raises(ValueError) as e:
        read_footers(day, DEFAULT_SPEC, on_corrupt_file="skip", max_corrupt_files=1)
    assert str(e.value) == (
        f"day {DAY}: 2 file(s) skipped with an unreadable Parquet footer, so their rows are unknown and the day counts "
        f"as over its error budget: {day.path / 'part-2.parquet'}, {day.path / 'part-3.parquet'} "
        "(data.max_corrupt_files = 1 allows up to that many such files a day)")
    with pytest.raises(ValueError, match=r"data.max_corrupt_files = 0"):
        read_footers(day, DEFAULT_SPEC, on_corrupt_file="skip")  # the reader's call of before: no file allowed
    footers = read_footers(day, DEFAULT_SPEC, on_corrupt_file="skip", max_corrupt_files=2)
    assert sum(r.num_rows for r in footers.refs) == 1000 and not footers.rows_known
    assert footers.corrupt_files == [str(day.path / "part-2.parquet"), str(day.path / "part-3.parquet")]
    assert footers.unknown_rows_note().startswith("rows unknown: 2 file(s) skipped with an unreadable Parquet footer")


def test_max_corrupt_files_is_a_checked_config_key(tmp_path):
    cfg = load_config(DEFAULT_CONFIG, ["data.on_corrupt_file='skip'", "data.max_corrupt_files=2"])
    assert cfg.data.max_corrupt_files == 2 and ReaderOptions().max_corrupt_files == 0
    with pytest.raises(ValueError, match="max_corrupt_files must be >= 0, got -1"):
        load_config(DEFAULT_CONFIG, ["data.max_corrupt_files=-1"])


def test_day_validation_vectors_of_before_the_new_reason_still_load():
    """REASONS grew at its end: a vector saved with fewer reasons reads back with the same counts."""
    old = [100, 3] + [0] * 7 + [2]  # rows, then the nine reasons before norm_out_of_domain
    v = DayValidation.from_vector("2026-11-01", old)
    assert v.bad == {"null": 3, "corrupt_row_group": 2} and v.as_vector() == old + [0]
    assert REASONS[-1] == "norm_out_of_domain"
