"""The deduplicated sequence lookup equals the plain lookup of every event: outputs exactly, table gradients
within 1e-6, over sampled batches (unique ratio 1%..100%, empty rows, one repeated id, shared tables).
CUDA variants run when a GPU is present."""

from __future__ import annotations

import pytest
import torch
from torchrec import JaggedTensor, KeyedJaggedTensor

from hyrank.embeddings.dedup import (compact_index_dtype, dedup_sequences, expand_rows, lookup_dedup, lookup_reference,
                              unique_per_table)

DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
CASES = [(dev, impl) for dev in DEVICES for impl in ("torch", "fbgemm") if impl == "torch" or dev.type == "cuda"]
TABLE_OF = {"long_ids": "item", "click_ids": "item", "long_cats": "cat"}
NUM_ROWS = {"item": 5000, "cat": 300}
D = 8


def _ids_with_ratio(n: int, ratio: float, num_rows: int, g: torch.Generator) -> torch.Tensor:
    """n ids of which round(ratio * n) (at least one) are distinct, each distinct id present at least once."""
    distinct = max(1, min(num_rows, round(ratio * n)))
    pool = torch.randperm(num_rows, generator=g)[:distinct]
    return pool[torch.arange(n) % distinct][torch.randperm(n, generator=g)]


def _batch(ratio: float, *, batch_size: int = 16, max_len: int = 40, seed: int = 0) -> KeyedJaggedTensor:
    """A sequence KJT in the EC's key order (grouped by table), with some empty rows."""
    g = torch.Generator().manual_seed(seed)
    lengths_B = torch.randint(0, max_len + 1, (batch_size,), generator=g)
    lengths_B[: batch_size // 4] = 0
    click_lengths_B = torch.randint(0, 6, (batch_size,), generator=g)
    keys = ["long_ids", "click_ids", "long_cats"]
    per_key = {"long_ids": lengths_B, "click_ids": click_lengths_B, "long_cats": lengths_B}
    values = [_ids_with_ratio(int(per_key[k].sum()), ratio, NUM_ROWS[TABLE_OF[k]], g) for k in keys]
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat([per_key[k] for k in keys]))


def _tables(device: torch.device, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {t: torch.randn(n, D, generator=g).to(device).requires_grad_() for t, n in NUM_ROWS.items()}


def _grads(outs: dict, tables: dict, weights: dict) -> dict[str, torch.Tensor]:
    for t in tables.values():
        t.grad = None
    sum((o.values() * weights[k]).sum() for k, o in outs.items()).backward()
    return {k: t.grad.clone() for k, t in tables.items()}


def _compare(kjt: KeyedJaggedTensor, device: torch.device, impl: str, transforms=None) -> float:
    kjt = kjt.to(device)
    tables_ref, tables_dd = _tables(device), _tables(device)
    ref = lookup_reference(tables_ref, kjt, TABLE_OF, transforms)
    got = lookup_dedup(tables_dd, kjt, TABLE_OF, transforms, impl=impl)
    assert list(got) == list(ref)
    g = torch.Generator().manual_seed(3)
    weights = {k: torch.randn(r.values().shape, generator=g).to(device) for k, r in ref.items()}
    for k in ref:
        torch.testing.assert_close(got[k].lengths().to(torch.int64), ref[k].lengths().to(torch.int64), rtol=0, atol=0)
        if transforms is None:  # a pure gather: bit-identical
            assert torch.equal(got[k].values(), ref[k].values()), k
        else:  # the same per-row matmul on U rows instead of N rows: equal up to blocking order
            torch.testing.assert_close(got[k].values(), ref[k].values(), rtol=1e-6, atol=1e-6)
    grads_ref, grads_dd = _grads(ref, tables_ref, weights), _grads(got, tables_dd, weights)
    for t in NUM_ROWS:
        torch.testing.assert_close(grads_dd[t], grads_ref[t], rtol=0, atol=1e-6, msg=lambda m: f"table {t}: {m}")
    return dedup_sequences(kjt.to("cpu"), TABLE_OF).index.dedup_ratio


@pytest.mark.parametrize("device,impl", CASES, ids=str)
@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.25, 0.5, 1.0])
def test_dedup_lookup_equals_reference(device, impl, ratio):
    measured = _compare(_batch(ratio, seed=int(ratio * 100)), device, impl)
    assert measured <= ratio + 0.02 or ratio == 0.01  # ~1% rounds up to one id per table


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_single_repeated_id_and_empty_batches(device):
    kjt = _batch(0.5)
    same = KeyedJaggedTensor(keys=kjt.keys(), values=torch.full_like(kjt.values(), 7), lengths=kjt.lengths())
    assert _compare(same, device, "torch") == pytest.approx(2 / kjt.values().numel())  # one id per table
    empty = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values()[:0], lengths=torch.zeros_like(kjt.lengths()))
    assert _compare(empty, device, "torch") == 1.0


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_transform_on_unique_rows_equals_transform_on_every_event(device):
    torch.manual_seed(0)
    proj = torch.nn.Linear(D, 5).to(device)
    _compare(_batch(0.25, seed=5), device, "torch", transforms={"long_ids": proj, "click_ids": proj})
    # and the transform's own parameters get the same gradient both ways
    kjt = _batch(0.25, seed=5).to(device)
    grads = []
    for lookup in (lookup_reference, lookup_dedup):
        proj.zero_grad()
        out = lookup(_tables(device), kjt, TABLE_OF, {"long_ids": proj})
        out["long_ids"].values().square().sum().backward()
        grads.append(proj.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,impl", CASES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 37, 3), (100, 1000, 16), (0, 0, 4), (3, 0, 2)])
def test_expand_rows_matches_indexing(device, impl, shape):
    num_unique, n, d = shape
    g = torch.Generator().manual_seed(n)
    unique = torch.randn(num_unique, d, generator=g).to(device).requires_grad_()
    inverse = torch.randint(0, max(num_unique, 1), (n,), generator=g).to(device)
    for dtype in (torch.int16, torch.int32, torch.int64):
        unique.grad = None
        got = expand_rows(unique, inverse.to(dtype), impl=impl)
        assert torch.equal(got, unique[inverse])
        upstream = torch.randn(n, d, generator=g).to(device)
        (got * upstream).sum().backward()
        # the backward is an index_add: repeated ids' gradients summed into their unique row
        want = torch.zeros(num_unique, d, device=device).index_add_(0, inverse, upstream)
        torch.testing.assert_close(unique.grad, want, rtol=1e-6, atol=1e-6)


def test_unique_per_table_inverse_rebuilds_values():
    values = torch.tensor([5, 3, 5, 5, 9, 1, 1, 2])
    u = unique_per_table(values, [5, 3])  # table A: 5 3 5 5 9, table B: 1 1 2
    assert u.num_unique == [3, 2]
    assert u.values.tolist() == [3, 5, 9, 1, 2]
    offsets = torch.tensor([0] * 5 + [3] * 3)
    assert torch.equal(u.values[u.inverse + offsets], values)


def test_fbgemm_impl_refused_on_cpu():
    with pytest.raises(ValueError, match="needs CUDA"):
        expand_rows(torch.zeros(2, 3), torch.zeros(4, dtype=torch.int64), impl="fbgemm")


def test_compact_index_dtype_and_grouping_errors():
    assert compact_index_dtype([10, 2**15]) == torch.int16
    assert compact_index_dtype([2**15 + 1]) == torch.int32
    assert compact_index_dtype([]) == torch.int16
    kjt = KeyedJaggedTensor(keys=["long_ids", "long_cats", "click_ids"], values=torch.arange(3),
                            lengths=torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="grouped by table"):
        dedup_sequences(kjt, TABLE_OF)


def test_dedup_moves_fewer_bytes_at_quarter_unique():
    kjt = _batch(0.25, batch_size=64, max_len=200)
    d = dedup_sequences(kjt, TABLE_OF)
    plain = kjt.values().nbytes + kjt.lengths().nbytes
    moved = d.unique.values().nbytes + d.unique.lengths().nbytes + d.index.nbytes
    assert d.index.inverse.dtype == torch.int16
    assert moved <= 0.55 * plain, (moved, plain)


# -- end to end: a real generated batch through RankingModel ----------------------------------------------------


def _real_table(cfg, rows: int = 96):
    import pyarrow.parquet as pq

    files = sorted((p for p in __import__("pathlib").Path(cfg.data.root).rglob("*.parquet")))
    return pq.read_table(files[0], columns=cfg.features.columns()).slice(0, rows)


def _ranking_model(cfg, *, dedup: bool):
    from hyrank.models import build_model
    from hyrank.pipeline.ranker import RankingModel

    torch.manual_seed(0)
    spec = cfg.features
    tower = build_model(cfg.model.name, cfg.model.config, spec.input_shape())
    return RankingModel(spec, tower, sparse_device=torch.device("cpu"), dedup=dedup)


def test_ranking_model_dedup_equals_reference_on_a_real_batch(small_cfg):
    from hyrank.pipeline.data.convert import BatchConverter

    table = _real_table(small_cfg)
    ref, dd = _ranking_model(small_cfg, dedup=False), _ranking_model(small_cfg, dedup=True)
    plain = BatchConverter(small_cfg.features, sequence_feed=ref.sequence_feed)(table)
    deduped = BatchConverter(small_cfg.features, sequence_feed=dd.sequence_feed)(table)
    # the small config truncates the long sequence (synthetic 40..80 events) to 64: dedup sees truncated ids
    assert plain.sequence.lengths().max() == 64
    assert plain.dedup_ratio is None and 0 < deduped.dedup_ratio < 1
    assert deduped.sequence_index.num_ids == plain.sequence.values().numel()

    dd.load_state_dict(ref.state_dict())  # same parameter names: tables are named the same either way
    results = []
    for model, batch in ((ref, plain), (dd, deduped)):
        loss, _ = model(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, model.sparse(batch.pooled, batch.sequence, batch.sequence_index)))
    (loss_ref, grads_ref, out_ref), (loss_dd, grads_dd, out_dd) = results
    torch.testing.assert_close(loss_dd, loss_ref, rtol=0, atol=1e-6)
    assert out_dd.dedup_ratio == deduped.dedup_ratio and out_ref.dedup_ratio is None
    assert set(grads_dd) == set(grads_ref)
    assert any(".ec.embeddings.item." in n for n in grads_ref)
    for name in grads_ref:
        torch.testing.assert_close(grads_dd[name], grads_ref[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_mismatched_dedup_setting_is_a_clear_error(small_cfg):
    """Only a converter fed by hand, not from the model, can disagree with it; the model says so at once."""
    from hyrank.pipeline.data.convert import BatchConverter

    layout = small_cfg.features.embedding_layout()
    deduped = BatchConverter(small_cfg.features, sequence_feed=layout.sequence_feed(dedup=True))(
        _real_table(small_cfg, rows=8))
    plain = BatchConverter(small_cfg.features)(_real_table(small_cfg, rows=8))
    with pytest.raises(ValueError, match="embeddings.dedup"):
        _ranking_model(small_cfg, dedup=False)(deduped)
    with pytest.raises(ValueError, match="embeddings.dedup"):
        _ranking_model(small_cfg, dedup=True)(plain)


def test_the_model_owns_the_sequence_feed(small_cfg):
    """One switch: the model's feed is the layout's for its dedup setting, and batches made with it are what its
    lookup reads; a layout with no sequence table has nothing to deduplicate, so dedup=True stays plain."""
    from hyrank.embeddings.collection import SparseArch
    from hyrank.embeddings.tables import EmbeddingLayout, LookupDef, TableDef
    from hyrank.pipeline.data.convert import BatchConverter

    layout = small_cfg.features.embedding_layout()
    table = _real_table(small_cfg, rows=8)
    for dedup in (False, True):
        model = _ranking_model(small_cfg, dedup=dedup)
        assert model.sequence_feed == layout.sequence_feed(dedup=dedup) and model.sequence_feed.dedup == dedup
        batch = BatchConverter(small_cfg.features, sequence_feed=model.sequence_feed)(table)
        assert (batch.sequence_index is not None) == dedup
        model(batch)

    pooled_only = EmbeddingLayout(tables=(TableDef("t", 10, 4),), lookups=(LookupDef("a", "t", "pooled"),))
    arch = SparseArch(pooled_only, dedup=True)
    assert not arch.sequence_feed.dedup
    kjt = KeyedJaggedTensor(keys=["a"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1]))
    ids = arch.sequence_feed(KeyedJaggedTensor.empty(values_dtype=torch.int64, lengths_dtype=torch.int64))
    assert arch(kjt, ids.kjt, ids.index).pooled["a"].shape == (2, 4)


def test_batch_with_dedup_index_moves_to_a_device_and_pins():
    from hyrank.pipeline.data.batch import Batch

    d = dedup_sequences(_batch(0.25), TABLE_OF)
    b = Batch(pooled=d.unique, sequence=d.unique, dense=torch.zeros(16, 0), labels=torch.zeros(16),
              group_ids=torch.zeros(16, dtype=torch.int64), sequence_index=d.index)
    moved = b.to(torch.device("cpu"))
    assert moved.dedup_ratio == b.dedup_ratio
    assert torch.equal(moved.sequence_index.inverse, d.index.inverse)
    if torch.cuda.is_available():
        pinned = b.pin_memory()
        assert pinned.sequence_index.inverse.is_pinned()


def test_a_block_of_consecutive_ebc_features_is_a_slice_of_the_ebc_output(small_cfg):
    """Tokenizer's fast path (no per-feature copies): a block made only of consecutive EBC features is read as one
    column slice of SparseOutput.pooled_values, equal to concatenating its features; other blocks concatenate."""
    from hyrank.pipeline.data.convert import BatchConverter
    from hyrank.pipeline.ranker import Tokenizer

    spec = small_cfg.features
    model = _ranking_model(small_cfg, dedup=False)
    batch = BatchConverter(spec, sequence_feed=model.sequence_feed)(_real_table(small_cfg))
    emb = model.sparse(batch.pooled, batch.sequence, batch.sequence_index)
    tokenizer = Tokenizer(spec)
    assert tokenizer._ebc_blocks == {"context"}  # device, hour: EBC features; user holds a dense one
    tokens = tokenizer(emb, batch.dense)
    for block, members in spec.effective_blocks.items():
        expected = torch.cat([emb.pooled[m] if m in emb.pooled else tokenizer._feature(emb, batch.dense, m)
                              for m in members], dim=-1)
        assert torch.equal(tokens.blocks[block], expected), block
    context = tokens.blocks["context"]
    assert context.untyped_storage().data_ptr() == emb.pooled_values.untyped_storage().data_ptr()  # no copy
    # features apart in the EBC output (a sharded EBC orders keys its own way): concatenated, same values
    from hyrank.embeddings.collection import SparseOutput
    from hyrank.pipeline.ranker import ebc_block

    apart = ("device", "user_id")
    shuffled = ebc_block(SparseOutput(emb.pooled, {}, pooled_values=emb.pooled_values,
                                      pooled_columns=emb.pooled_columns), apart)
    assert torch.equal(shuffled, torch.cat([emb.pooled[m] for m in apart], dim=-1))


def _padded_both_ways(columns, max_len: int, batch_size: int):
    """pad_sequence's fast path and its reference on the same columns: outputs, and each column's gradient under
    one upstream gradient."""
    from hyrank.models.layers.fastpath import reference_paths
    from hyrank.pipeline.ranker import pad_sequence

    results = []
    for paths in (torch.enable_grad, reference_paths):
        leaves = [c.values().detach().clone().requires_grad_(True) for c in columns]
        jagged = [JaggedTensor(values=v, lengths=c.lengths()) for v, c in zip(leaves, columns)]
        with paths():
            out = pad_sequence(jagged, max_len, batch_size)
        upstream = torch.randn(out.values_BLD.shape, generator=torch.Generator().manual_seed(3))
        (out.values_BLD * upstream).sum().backward()
        results.append((out, [v.grad for v in leaves]))
    return results


def test_padded_sequences_equal_the_concatenate_then_scatter_reference():
    """The Tokenizer's sequence padding writes each column once into its width slice of the padded buffer; it equals
    concatenating the columns and scattering them (values, mask and every column's gradient bit for bit), with
    empty rows, full rows and a batch of only empty rows."""
    g = torch.Generator().manual_seed(0)
    max_len, batch_size = 12, 9
    for lengths in (torch.tensor([0, 12, 3, 1, 0, 7, 12, 5, 2]), torch.zeros(9, dtype=torch.int64)):
        n = int(lengths.sum())
        columns = [JaggedTensor(values=torch.randn(n, width, generator=g), lengths=lengths) for width in (8, 8, 4)]
        (fast, fast_grads), (ref, ref_grads) = _padded_both_ways(columns, max_len, batch_size)
        assert fast.values_BLD.shape == (batch_size, max_len, 20)
        assert torch.equal(fast.values_BLD, ref.values_BLD) and torch.equal(fast.mask_BL, ref.mask_BL)
        assert not fast.values_BLD[~fast.mask_BL].any()  # padding is zeros
        for got, want in zip(fast_grads, ref_grads):
            assert torch.equal(got, want)


def test_padded_sequences_of_a_real_batch_equal_the_reference(small_cfg):
    """The same on the sequences of a real batch's lookup (the Tokenizer's columns: ids and side features)."""
    from hyrank.pipeline.data.convert import BatchConverter

    model = _ranking_model(small_cfg, dedup=False)
    batch = BatchConverter(small_cfg.features, sequence_feed=model.sequence_feed)(_real_table(small_cfg))
    emb = model.sparse(batch.pooled, batch.sequence, batch.sequence_index)
    for seq in small_cfg.features.sequences:
        columns = [emb.sequences[c] for c in seq.columns]
        (fast, fast_grads), (ref, ref_grads) = _padded_both_ways(columns, seq.max_len, batch.labels.shape[0])
        assert torch.equal(fast.values_BLD, ref.values_BLD), seq.name
        assert all(torch.equal(a, b) for a, b in zip(fast_grads, ref_grads)), seq.name


def test_a_sequence_row_longer_than_max_len_is_refused():
    """Its events would spill into the next row's slots: an error naming max_len, not a silently shifted batch."""
    from hyrank.pipeline.ranker import pad_sequence

    column = JaggedTensor(values=torch.randn(7, 4), lengths=torch.tensor([2, 5]))
    with pytest.raises(ValueError, match="5 events, more than max_len=4"):
        pad_sequence([column], 4, 2)
