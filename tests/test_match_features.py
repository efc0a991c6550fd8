"""Target-match features: statistics on hand-made rows (truncation, last_k, order, hashed strings, list candidates)
against a per-row reference, validation refusing what conversion raises on, config errors, and a model forward on a
converted batch whose dense widths are the spec's input shape."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import DEFAULT_CONFIG
from hyrank.pipeline.data.convert import BatchConverter, match_stats, stable_hash
from hyrank.pipeline.data.features import FeatureSpec, MatchFeature, SequenceFeature, SideInfo, SparseFeature, TableSpec
from hyrank.pipeline.data.validate import check_schema, validate_rows

STATS = ["count", "share", "any"]


def _spec(*match: MatchFeature, max_len: int = 3, order: str = "newest_last", blocks=None) -> FeatureSpec:
    names = [m.name for m in match]
    return FeatureSpec(
        label="y", tables=[TableSpec("item", 100, 4), TableSpec("cat", 10, 4)],
        sparse=[SparseFeature("item", "item")],
        sequences=[SequenceFeature("hist", "h", "item", max_len=max_len, side=[SideInfo("hc", "cat")], order=order)],
        match=list(match), blocks={"i": ["item", *names]} if blocks is None else blocks)


def _cat_match(**kw) -> MatchFeature:
    return MatchFeature(**({"name": "cat_match", "candidate": "cat", "sequence": "hist", "side": "hc"} | kw))


def _table(**cols) -> pa.Table:
    base = dict(
        y=pa.array([1, 0, 1, 0], pa.int8()),
        item=pa.array([14, 5, 6, 20]),
        cat=pa.array([1, 1, 7, 2]),  # the candidate: a column that is no other feature
        h=pa.array([[10, 11, 12, 13, 14], [], [20, 21], [30, 31]]),
        hc=pa.array([[1, 1, 2, 3, 2], [], [4, 5], [2, 2]]),  # row 0: both 1s are older than the 3 most recent
    )
    base.update(cols)
    return pa.table(base)


def _stats(spec: FeatureSpec, table: pa.Table, name: str = "cat_match") -> np.ndarray:
    """The columns of Batch.dense that hold match feature `name`."""
    batch = BatchConverter(spec)(table)
    start = 0
    for f in spec.dense_order:
        if f.name == name:
            return batch.dense[:, start:start + f.size].numpy()
        start += f.size
    raise KeyError(name)


def _eq(got: np.ndarray, want) -> None:
    np.testing.assert_allclose(got, np.asarray(want, dtype=np.float64), rtol=1e-6, atol=0)


def test_count_share_any_over_the_events_the_model_sees():
    # row 0: the 3 most recent categories are [2, 3, 2], no 1; row 1: empty; row 2: no match; row 3: all match
    _eq(_stats(_spec(_cat_match()), _table()), [[0, 0, 0], [0, 0, 0], [0, 0, 0], [2, 1, 1]])
    # nothing truncated: row 0's two older 1s count
    _eq(_stats(_spec(_cat_match(), max_len=5), _table()), [[2, 0.4, 1], [0, 0, 0], [0, 0, 0], [2, 1, 1]])


def test_last_k_takes_the_most_recent_events_of_what_the_model_sees():
    table = _table(cat=pa.array([2, 1, 7, 2]))
    _eq(_stats(_spec(_cat_match(last_k=1), max_len=5), table)[0], [1, 1, 1])  # [2]
    _eq(_stats(_spec(_cat_match(last_k=2), max_len=5), table)[0], [1, 0.5, 1])  # [3, 2]
    _eq(_stats(_spec(_cat_match(last_k=4), max_len=5), table)[0], [2, 0.5, 1])  # [1, 2, 3, 2]
    _eq(_stats(_spec(_cat_match(last_k=50), max_len=3), table)[0], [2, 2 / 3, 1])  # max_len cuts first


def test_newest_first_lists_count_from_their_head():
    spec = _spec(_cat_match(), order="newest_first")
    _eq(_stats(spec, _table())[0], [2, 2 / 3, 1])  # most recent three: [1, 1, 2]
    _eq(_stats(_spec(_cat_match(last_k=1), order="newest_first"), _table())[0], [1, 1, 1])  # [1]


def test_ids_column_when_no_side_and_raw_ids_not_table_rows():
    """Without `side` the sequence's ids are compared; ids compare as they are, so 105 (table row 5 under oov =
    'hash') matches 105 and not 5."""
    spec = _spec(MatchFeature("item_match", "item", "hist", stats=["any", "count"]))
    cols = dict(item=pa.array([14, 105, 6, 20]), hc=pa.array([[1, 1, 2, 3, 2], [0], [4, 5], [2, 2]]))
    table = _table(h=pa.array([[10, 11, 12, 13, 14], [5], [20, 21], [30, 20]]), **cols)
    _eq(_stats(spec, table, "item_match"), [[1, 1], [0, 0], [0, 0], [1, 1]])
    table = _table(h=pa.array([[10, 11, 12, 13, 14], [105], [20, 21], [30, 20]]), **cols)
    _eq(_stats(spec, table, "item_match")[1], [1, 1])
    assert BatchConverter(spec)(table).sequence["h"].values().tolist()[3] == 5  # the lookup still hashes it


@pytest.mark.parametrize("string_type", [pa.string(), pa.large_string(), pa.dictionary(pa.int32(), pa.string())])
def test_string_candidates_compare_by_the_converters_hash(string_type):
    """String ids are hashed with the converter's stable_hash before comparing: they match events that hold the
    same hash (sequences are integer lists; logs that hash their string ids with stable_hash write such events)."""
    words = ["a", "b", "zz", "a"]
    hashed = dict(zip(words, stable_hash(pa.array(words)).tolist()))
    table = _table(cat=pa.array(words).cast(string_type),
                   h=pa.array([[hashed["a"], 1, hashed["a"]], [hashed["a"]], [hashed["b"]], [hashed["zz"]]]),
                   hc=pa.array([[0, 0, 0], [0], [0], [0]]))
    spec = _spec(MatchFeature("word_match", "cat", "hist", stats=["count"]))
    _eq(_stats(spec, table, "word_match"), [[2], [0], [0], [0]])


def test_list_candidates_match_any_of_their_values():
    cats = pa.array([[1, 2], [1], [], [3, 2, 2]])
    table = _table(cat=cats)
    _eq(_stats(_spec(_cat_match(), max_len=5), table), [[4, 0.8, 1], [0, 0, 0], [0, 0, 0], [2, 1, 1]])
    # lists of one value are the scalar case
    as_lists = _table(cat=pa.array([[1], [1], [7], [2]], pa.list_(pa.int64())))
    _eq(_stats(_spec(_cat_match()), as_lists), _stats(_spec(_cat_match()), _table()))
    words = _table(cat=pa.array([["x", "y"], [], ["x"], ["y"]]),
                   hc=pa.array([stable_hash(pa.array(["y", "q", "x", "x", "y"])).tolist(), [], [1, 2], [3, 4]]))
    _eq(_stats(_spec(_cat_match(stats=["count"]), max_len=5), words), [[4], [0], [0], [0]])


def test_norms_apply_to_each_statistic():
    table = _table()
    raw = np.array(_stats(_spec(_cat_match(), max_len=5), table))
    log = np.array(_stats(_spec(_cat_match(norm="log1p"), max_len=5), table))
    std = np.array(_stats(_spec(_cat_match(norm="standard", mean=1.0, std=2.0), max_len=5), table))
    np.testing.assert_allclose(log, np.log1p(raw), rtol=1e-6)
    np.testing.assert_allclose(std, (raw - 1.0) / 2.0, rtol=1e-6)


def _reference(candidates, events, window, order, stats):
    """Per row, in plain Python: the statistics over the row's `window` most recent events."""
    out = []
    for cands, evs in zip(candidates, events):
        seen = evs[-window:] if order == "newest_last" else evs[:window]
        count = sum(e in cands for e in seen)
        row = {"count": count, "share": count / len(seen) if seen else 0.0, "any": float(count > 0)}
        out.append([row[s] for s in stats])
    return out


@pytest.mark.parametrize("seed", range(4))
def test_match_stats_equal_a_per_row_reference(seed):
    rng = np.random.default_rng(seed)
    rows = 200
    events = [rng.integers(0, 6, rng.integers(0, 12)).tolist() for _ in range(rows)]
    scalar = seed % 2 == 0
    candidates = [[int(rng.integers(0, 6))] if scalar else rng.integers(0, 6, rng.integers(0, 4)).tolist()
                  for _ in range(rows)]
    for window, order in ((5, "newest_last"), (3, "newest_first"), (20, "newest_last")):
        stats = list(rng.permutation(STATS))
        got = match_stats(np.array([len(c) for c in candidates]), np.array(sum(candidates, []), np.int64),
                          np.array([len(e) for e in events]), np.array(sum(events, []), np.int64),
                          window=window, order=order, stats=stats)
        assert got.dtype == np.float32 and got.shape == (rows, 3)
        np.testing.assert_allclose(got, _reference(candidates, events, window, order, stats), rtol=1e-6)


def test_a_sparse_candidate_is_read_once_and_stays_a_feature():
    spec = _spec(MatchFeature("item_match", "item", "hist"))
    assert spec.columns().count("item") == 1
    batch = BatchConverter(spec)(_table())
    # "item" shares its table with the sequence, so it is looked up in the EmbeddingCollection's KJT
    assert batch.sequence["item"].values().tolist() == [14, 5, 6, 20]
    assert batch.dense.shape == (4, 3)


def test_dense_widths_follow_the_input_shape():
    """Batch.dense is in dense_order, and the tokenizer cuts it into blocks of the widths towers are built with."""
    from hyrank.embeddings.collection import SparseArch
    from hyrank.pipeline.ranker import Tokenizer

    in_block = _cat_match(stats=["count", "any"])
    loose = MatchFeature("item_match", "item", "hist", stats=["share"])
    spec = _spec(in_block, loose, blocks={"i": ["item", "cat_match"]})
    shape = spec.input_shape()
    assert shape.blocks == {"i": 4 + 2} and shape.dense_dim == 1
    assert [f.name for f in spec.dense_order] == ["cat_match", "item_match"] and spec.dense_dim == 3
    batch = BatchConverter(spec)(_table())
    assert batch.dense.shape == (4, spec.dense_dim)
    tokens = Tokenizer(spec)(SparseArch(spec.embedding_layout())(batch.pooled, batch.sequence), batch.dense)
    assert {b: t.shape[1] for b, t in tokens.blocks.items()} == shape.blocks
    assert tokens.dense.shape[1] == shape.dense_dim
    assert tokens.dense[:, 0].tolist() == [pytest.approx(1 / 3), 0, 0, 0]  # item_match share: 14 of [12, 13, 14]
    # no blocks declared: every match feature is in the dense input
    bare = _spec(in_block, blocks={})
    assert bare.input_shape().dense_dim == 2 and BatchConverter(bare)(_table()).dense.shape == (4, 2)


@pytest.mark.parametrize("model", ["hyformer", "dlrm_mlp"])
def test_a_model_built_from_a_spec_with_match_features_runs_a_converted_batch(model):
    from hyrank.models import build_model
    from hyrank.pipeline.ranker import RankingModel

    torch.manual_seed(0)
    spec = _spec(_cat_match(norm="log1p"), MatchFeature("item_match", "item", "hist", stats=["any"]))
    tower = build_model(model, {}, spec.input_shape())
    ranking = RankingModel(spec, tower, sparse_device=torch.device("cpu"))
    loss, out = ranking(BatchConverter(spec, sequence_feed=ranking.sequence_feed)(_table()))
    assert out.logits.shape == (4,) and torch.isfinite(loss)
    loss.backward()


# -- validation refuses what conversion raises on -----------------------------------------------------------------


@pytest.mark.parametrize("cat,reason", [
    (pa.array([1, None, 7, 2]), "null"),
    (pa.array([[1], [None], [7], [2]]), "null"),
    (pa.array([[1], [1, 2, 3, 4, 5, 6], [7], [2]]), "list_too_long"),
])
def test_validation_refuses_the_candidate_rows_conversion_raises_on(cat, reason):
    spec = _spec(_cat_match())
    table = _table(cat=cat)
    verdict = validate_rows(table, spec, max_list_len=5)
    assert verdict.reasons().tolist() == ["", reason, "", ""] and verdict.column_B[1] == "cat"
    if reason == "null":
        with pytest.raises(ValueError, match=r"f.parquet: column 'cat', row 1: (is null|holds a null id)"):
            BatchConverter(spec)(table, source="f.parquet")
    assert BatchConverter(spec)(table.filter(pa.array(verdict.good_B))).dense.shape == (3, 3)


def test_candidate_column_missing_or_of_a_wrong_type_fails_the_schema_check():
    spec = _spec(_cat_match())
    with pytest.raises(ValueError, match=r"f.parquet: missing column 'cat' declared in the feature spec"):
        check_schema(spec, _table().drop_columns(["cat"]).schema, "f.parquet")
    floats = _table(cat=pa.array([1.0, 1.0, 7.0, 2.0]))
    message = (r"f.parquet: column 'cat' has type double, but the feature spec reads it as a match candidate column, "
               r"which holds integer or string ids, or lists of them")
    with pytest.raises(ValueError, match=message):
        check_schema(spec, floats.schema, "f.parquet")
    with pytest.raises(ValueError, match=message):
        BatchConverter(spec)(floats, source="f.parquet")


# -- bad specs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,message", [
    (dict(sequence="nope"), r"features.match\[0\] \('cat_match'\): unknown sequence 'nope' \(sequences: \['hist'\]\)"),
    (dict(side="long_cats"), r"side 'long_cats' is not a column of sequence 'hist' \(its columns: \['h', 'hc'\]"),
    (dict(candidate="y"), r"column 'y' declared twice in the feature spec \(as label and match candidate\)"),
    (dict(candidate="h"), r"column 'h' declared twice in the feature spec \(as sequence and match candidate\)"),
    (dict(name="item"), r"duplicate sparse/dense/match feature name\(s\): \['item'\]"),
    (dict(candidate=" "), r"features.match\[0\].candidate = ' ' names no column"),
])
def test_bad_match_specs_say_what_is_wrong(kw, message):
    with pytest.raises(ValueError, match=message):
        _spec(_cat_match(**kw))


@pytest.mark.parametrize("kw,message", [
    (dict(stats=["count", "mean"]), r"match feature 'cat_match': unknown statistic\(s\) \['mean'\]"),
    (dict(stats=[]), r"stats must name each statistic at most once and at least one"),
    (dict(stats=["any", "any"]), r"stats must name each statistic at most once"),
    (dict(last_k=-1), r"last_k must be >= 0"),
    (dict(norm="standard", std=0.0), r"std must be > 0"),
])
def test_bad_match_features_say_what_is_wrong(kw, message):
    with pytest.raises(ValueError, match=message):
        _cat_match(**kw)


def test_a_block_naming_an_unknown_feature_is_refused():
    with pytest.raises(ValueError, match=r"block 'i' names 'cat_mach', which is not a sparse, dense or match feature"):
        _spec(_cat_match(), blocks={"i": ["item", "cat_mach"]})


def test_match_features_load_from_toml_with_file_and_key_in_errors(tmp_path):
    from hyrank.pipeline.config import ConfigError, load_config

    good = tmp_path / "m.toml"  # extends an absolute path: taken as it is
    good.write_text(f'extends = "{DEFAULT_CONFIG}"\n[[features.match]]\nname = "m"\ncandidate = "item_category"\n'
                    'sequence = "long"\nside = "long_item_cats"\nstats = ["count", "any"]\nlast_k = 16\n'
                    '[features.blocks]\nitem = ["item_id", "item_category", "item_top_category", "item_author", '
                    '"item_tags", "item_ctr_prior", "item_content"]\n')  # the shipped match features' block
    spec = load_config(good).features
    assert spec.match == [MatchFeature("m", "item_category", "long", "long_item_cats", ["count", "any"], 16)]
    assert spec.unblocked_dense[-1].name == "m" and spec.input_shape().dense_dim == 2
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace('"any"]', '"mean"]'))
    with pytest.raises(ConfigError, match=rf"{bad}: features.match\[0\].stats\[1\] must be one of \['count', "
                                          r"'share', 'any'\], got 'mean'"):
        load_config(bad)
    bad.write_text(good.read_text().replace('sequence = "long"', 'sequence = "longg"'))
    with pytest.raises(ConfigError, match=rf"{bad}: features.match\[0\] \('m'\): unknown sequence 'longg'"):
        load_config(bad)
