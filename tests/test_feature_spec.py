"""FeatureSpec rules: a column read in two roles (the group or oracle column that is also a feature) is read once and
serves both; any other repeat, and an empty or blank column name, is refused at load naming the key."""

import numpy as np
import pyarrow as pa
import pytest

from conftest import DEFAULT_CONFIG
from hyrank.pipeline.config import ConfigError, load_config
from hyrank.pipeline.data.convert import BatchConverter
from hyrank.pipeline.data.features import (DenseFeature, FeatureSpec, MatchFeature, SequenceFeature, SparseFeature,
                                    TableSpec)
from hyrank.pipeline.data.schema import column_kinds
from hyrank.pipeline.data.validate import check_schema, validate_rows


def _spec(**kw) -> FeatureSpec:
    base = dict(label="y", tables=[TableSpec("user", 10, 4), TableSpec("item", 20, 4)],
                sparse=[SparseFeature("user_id", "user"), SparseFeature("item_id", "item")],
                dense=[DenseFeature("p")],
                sequences=[SequenceFeature("hist", "h", "item", max_len=4)])
    base.update(kw)
    return FeatureSpec(**base)


def _table(**cols) -> pa.Table:
    base = dict(y=pa.array([1, 0, 1], pa.int8()), user_id=pa.array([3, 3, 12]), item_id=pa.array([1, 2, 3]),
                p=pa.array([0.25, 0.5, 0.75], pa.float32()), h=pa.array([[1, 2], [], [3]]))
    base.update(cols)
    return pa.table(base)


def test_group_may_be_a_sparse_feature_read_once():
    spec = _spec(group="user_id")
    assert spec.columns() == ["y", "user_id", "item_id", "p", "h"]
    assert column_kinds(spec)["user_id"].name == "group and sparse"
    table = _table()
    check_schema(spec, table.schema, "f.parquet")
    assert validate_rows(table, spec, max_list_len=10).num_bad == 0
    batch = BatchConverter(spec)(table)
    assert batch.group_ids.tolist() == [3, 3, 12]  # the group ids are the column's values ...
    assert batch.pooled["user_id"].values().tolist() == [3, 3, 2]  # ... and the feature its ids (12 hashed to 2)
    assert spec.input_columns() == ["user_id", "item_id", "p", "h"]  # a served request carries it


def test_group_may_be_a_dense_feature_and_the_oracle_a_dense_feature():
    spec = _spec(group="g", oracle="p", dense=[DenseFeature("p"), DenseFeature("g")])
    table = _table(g=pa.array([5, 5, 6]))
    batch = BatchConverter(spec)(table)
    assert batch.group_ids.tolist() == [5, 5, 6] and batch.oracle_p.tolist() == [0.25, 0.5, 0.75]
    assert batch.dense.tolist() == [[0.25, 5.0], [0.5, 5.0], [0.75, 6.0]]
    assert spec.input_columns() == ["g", "p", "user_id", "item_id", "h"]
    assert set(spec.columns()) - set(spec.input_columns()) == {"y"}


def test_a_column_of_two_roles_takes_the_types_both_accept():
    """A list column is a sparse feature but no group; validation and conversion refuse it with one message."""
    spec = _spec(group="user_id")
    table = _table(user_id=pa.array([[3], [3], [12]]))
    message = (r"f.parquet: column 'user_id' has type list<item: int64>, but the feature spec reads it as a group "
               r"and sparse column, which holds integer or string ids \(group\) and integer or string ids, or lists "
               r"of them \(sparse\)")
    with pytest.raises(ValueError, match=message):
        check_schema(spec, table.schema, "f.parquet")
    with pytest.raises(ValueError, match=message):
        BatchConverter(spec)(table, source="f.parquet")
    # an oracle is floats: an integer dense column cannot be it
    spec = _spec(oracle="p")
    with pytest.raises(ValueError, match=r"column 'p' has type int64, .* as a oracle and dense column"):
        check_schema(spec, _table(p=pa.array([0, 1, 1])).schema, "f.parquet")


@pytest.mark.parametrize("kw,roles", [
    (dict(group="h"), "group and sequence"),
    (dict(oracle="user_id"), "oracle and sparse"),
    (dict(group="y"), "label and group"),
    (dict(sparse=[SparseFeature("user_id", "user"), SparseFeature("h", "item")]), "sparse and sequence"),
    (dict(dense=[DenseFeature("user_id")]), "sparse and dense"),
    (dict(group="q", oracle="q"), "group and oracle"),
    (dict(match=[MatchFeature("m", "p", "hist")]), "dense and match candidate"),
    (dict(sequences=[SequenceFeature("a", "h", "item", 4), SequenceFeature("b", "h", "item", 4)]),
     "sequence and sequence"),
])
def test_other_repeated_columns_are_refused(kw, roles):
    with pytest.raises(ValueError, match=rf"declared twice in the feature spec \(as {roles}\): a column may play two "
                                         "roles only as the group column and a sparse or dense feature"):
        _spec(**kw)


@pytest.mark.parametrize("key", ["group", "oracle"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_group_or_oracle_is_refused_with_how_to_remove_it(key, value):
    with pytest.raises(ValueError, match=rf"features.{key} = '{value}' names no column: leave the key out for none "
                                         rf"\(a key inherited through `extends` is removed with "
                                         rf"unset = \[\"features.{key}\"\] at the top of the extending config\)"):
        _spec(**{key: value})
    with pytest.raises(ConfigError, match=rf"^{DEFAULT_CONFIG}: features.{key} = '{value}' names no column"):
        load_config(DEFAULT_CONFIG, [f'features.{key}="{value}"'])


@pytest.mark.parametrize("kw,key", [
    (dict(label=""), "features.label"),
    (dict(sparse=[SparseFeature("user_id", "user"), SparseFeature(" ", "item")]), r"features.sparse\[1\].name"),
    (dict(dense=[DenseFeature("")]), r"features.dense\[0\].name"),
    (dict(sequences=[SequenceFeature("hist", "", "item", 4)]), r"features.sequences\[0\].ids"),
])
def test_empty_feature_columns_are_refused_naming_the_key(kw, key):
    with pytest.raises(ValueError, match=rf"^{key} = '\s*' names no column"):
        _spec(**kw)


def test_no_group_and_no_oracle_agree_in_validation_and_conversion():
    spec = _spec()
    table = _table()
    assert spec.columns() == ["y", "user_id", "item_id", "p", "h"] and set(column_kinds(spec)) == set(spec.columns())
    assert validate_rows(table, spec, max_list_len=10).num_bad == 0
    batch = BatchConverter(spec)(table)
    assert np.array_equal(batch.group_ids.numpy(), np.zeros(3)) and batch.oracle_p is None
