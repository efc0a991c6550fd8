"""Dense towers: the contract every registered model meets, plus each paper mechanism's own checks."""

import pytest
import torch

from hyrank.models import MODELS, build_model
from hyrank.models.inputs import InputShape, SequenceInput, SequenceShape, TowerInput
from hyrank.models.layers.attention import attend, attend_reference
from hyrank.models.layers.hetero import HeteroTransformerLayer
from hyrank.models.layers.tokens import recent_events
from hyrank.models.onetrans import OneTransState

SHAPE = InputShape(blocks={"user": 12, "item": 20, "context": 6}, dense_dim=3,
                   sequences={"long": SequenceShape(dim=16, max_len=10), "short": SequenceShape(dim=8, max_len=5)})
LENGTHS = {"long": [7, 0], "short": [5, 2]}  # row 1's long sequence is empty: all padding must stay finite

# Small variants worth running through the whole contract, beyond each model's defaults.
VARIANTS = {
    **{name: {} for name in MODELS},
    "dlrm_mlp/dot": {"interaction": "dot", "bottom": [4, 2]},
    "hyformer/transformer": {"seq_encoder": "transformer"},
    "hyformer/swiglu": {"seq_encoder": "swiglu"},
    "hyformer/merge": {"merge_sequences": True},
    "hyformer/no_global_tokens": {"global_tokens": False},
    "hyformer/null_slot": {"decode_attention": "null_slot"},
    "hyformer/cross": {"cross_layers": 2, "cross_rank": 4, "head_dropout": 0.1},
    "hiformer/low_rank": {"rank": 8, "prune_last_layer": False},
    "dcnv2/parallel_low_rank": {"structure": "parallel", "rank": 4},
    "transformer/pooled": {"sequence_tokens": "pooled"},
    "longer_rankmixer/global_query": {"global_query": True},
    "onetrans/pyramid": {"num_layers": 3},
    "onetrans/longer": {"num_layers": 3, "first_layer": "longer", "recent_len": 4},
    "onetrans/bidirectional_flat": {"num_layers": 3, "causal": False, "pyramid": False},
    "onetrans/one_layer": {"num_layers": 1},
}


def make_input(seed: int = 0, batch_size: int = 2, pad_value: float | None = None) -> TowerInput:
    g = torch.Generator().manual_seed(seed)
    sequences = {}
    for name, s in SHAPE.sequences.items():
        mask = torch.arange(s.max_len)[None, :] < torch.tensor(LENGTHS[name][:batch_size])[:, None]
        values = torch.randn(batch_size, s.max_len, s.dim, generator=g)
        if pad_value is not None:
            values = torch.where(mask[..., None], values, pad_value)
        sequences[name] = SequenceInput(values_BLD=values, mask_BL=mask)
    blocks = {b: torch.randn(batch_size, w, generator=g) for b, w in SHAPE.blocks.items()}
    return TowerInput(blocks=blocks, dense=torch.randn(batch_size, SHAPE.dense_dim, generator=g), sequences=sequences)


def build(variant: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(variant.split("/")[0], VARIANTS[variant] | extra, SHAPE)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_shape_loss_and_gradient_reach_every_parameter(variant):
    model = build(variant)
    logits = model(make_input()).logits
    assert logits.shape == (2,)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 0.0]))
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing}"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_padding_never_changes_the_output(variant):
    model = build(variant).eval()
    with torch.no_grad():
        base = model(make_input(pad_value=0.0)).logits
        noisy = model(make_input(pad_value=1e3)).logits
    assert torch.isfinite(base).all()
    torch.testing.assert_close(noisy, base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_deterministic_under_a_seed(name):
    out = [build(name)(make_input()).logits.detach() for _ in range(2)]
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_defaults_build_on_the_shipped_feature_spec(name):
    from hyrank.pipeline.config import load_config
    from conftest import DEFAULT_CONFIG

    shape = load_config(DEFAULT_CONFIG).features.input_shape()
    assert build_model(name, {}, shape) is not None


# -- layers -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_attend_matches_reference_including_empty_rows(seed):
    g = torch.Generator().manual_seed(seed)
    b, h, q, l, e = 3, 2, 1 + seed, 2 + 3 * seed, 4
    qkv = [torch.randn(b, h, n, e, generator=g) for n in (q, l, l)]
    mask = torch.rand(b, l, generator=g) < 0.6
    mask[0] = False  # an empty row
    out = attend(*qkv, mask)
    torch.testing.assert_close(out, attend_reference(*qkv, mask))
    assert (out[0] == 0).all()


def test_recent_events_keeps_the_last_real_events_oldest_first():
    values = torch.arange(6.0).view(1, 6, 1).repeat(2, 1, 1)
    mask = torch.tensor([[True] * 5 + [False], [True, True] + [False] * 4])
    short = recent_events(SequenceInput(values_BLD=values, mask_BL=mask), 3)
    assert short.values_BLD[0, :, 0].tolist() == [2.0, 3.0, 4.0]
    assert short.mask_BL.tolist() == [[True, True, True], [False, True, True]]
    assert short.values_BLD[1, 1:, 0].tolist() == [0.0, 1.0]


# -- HHFT: block-specific vs shared parameters --------------------------------------------------------------------

def test_hhft_block_projection_is_block_specific():
    model = build("hhft").eval()
    x = make_input()
    x.blocks["user"] = torch.zeros_like(x.blocks["user"])  # block "user" contributes only its bias
    with torch.no_grad():
        base = model(x).logits
        model.ns.proj["user"].weight.add_(torch.randn_like(model.ns.proj["user"].weight))
        torch.testing.assert_close(model(x).logits, base, rtol=0, atol=0)
        model.ns.proj["item"].weight.add_(torch.randn_like(model.ns.proj["item"].weight))
        assert not torch.allclose(model(x).logits, base)


def test_heterogeneous_layer_query_weights_are_per_token():
    torch.manual_seed(0)
    layer = HeteroTransformerLayer(num_tokens=4, dim=8, num_heads=2)
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        base = layer(x)
        layer.q.per_token.weight_TIO[2].add_(torch.randn(8, 8))  # token 2's own query projection
        out = layer(x)
    torch.testing.assert_close(out[:, [0, 1, 3]], base[:, [0, 1, 3]], rtol=0, atol=0)
    assert not torch.allclose(out[:, 2], base[:, 2])


def test_shared_switch_really_shares():
    hetero = HeteroTransformerLayer(num_tokens=4, dim=8, num_heads=2)
    shared = HeteroTransformerLayer(num_tokens=4, dim=8, num_heads=2, shared=True)
    assert shared.q.per_token is None and isinstance(shared.q.shared, torch.nn.Linear)
    assert sum(p.numel() for p in hetero.q.parameters()) == 4 * sum(p.numel() for p in shared.q.parameters())
    n_het = sum(p.numel() for p in build("hhft").encoder.parameters())
    n_shared = sum(p.numel() for p in build("hhft", heterogeneous=False).encoder.parameters())
    assert n_shared < n_het


# -- HyFormer ablations (Table 2) ---------------------------------------------------------------------------------

def _initial_queries(model, x):
    return model.initial_queries(model.ns(x), model.project_sequences(x))


def _changes_queries(model, x, mutate) -> bool:
    with torch.no_grad():
        base = _initial_queries(model, x)
        y = make_input()
        mutate(y)
        return not torch.allclose(_initial_queries(model, y), base)


def _perturb_user(x):
    x.blocks["user"] += 1.0


def _perturb_item(x):
    x.blocks["item"] += 1.0


def _perturb_events(x):
    x.sequences["long"].values_BLD += 1.0  # real events too, so the mean pool moves


@pytest.mark.parametrize("source, user, item, events", [
    ("global", True, True, True), ("nonseq", True, True, False), ("target", False, True, False)])
def test_query_source_decides_which_inputs_shape_the_queries(source, user, item, events):
    model = build("hyformer", query_source=source)
    x = make_input()
    assert _changes_queries(model, x, _perturb_user) == user
    assert _changes_queries(model, x, _perturb_item) == item
    assert _changes_queries(model, x, _perturb_events) == events


def test_query_ablations_shrink_the_generator():
    sizes = {s: sum(p.numel() for p in build("hyformer", query_source=s).query_gen.parameters())
             for s in ("global", "nonseq", "target")}
    assert sizes["global"] > sizes["nonseq"] > sizes["target"]


def test_without_global_tokens_the_target_token_is_the_query():
    model = build("hyformer", global_tokens=False)
    assert model.query_gen is None
    x = make_input()
    with torch.no_grad():
        item_token = model.ns(x).tokens_BMD[:, model.target[0]]
        q = _initial_queries(model, x)
    torch.testing.assert_close(q, item_token.repeat(1, len(SHAPE.sequences), 1))


def test_merge_sequences_uses_one_stream_with_shared_queries():
    separate, merged = build("hyformer"), build("hyformer", merge_sequences=True)
    assert len(separate.layers[0].encoders) == len(SHAPE.sequences) and len(merged.layers[0].encoders) == 1
    assert sum(p.numel() for p in merged.parameters()) < sum(p.numel() for p in separate.parameters())


def test_sequences_meet_only_in_query_boosting():
    model = build("hyformer", num_layers=1, query_source="nonseq").eval()
    decoded = {}
    model.layers[0].decoders[0].register_forward_hook(lambda m, i, o: decoded.setdefault("a", []).append(o))
    with torch.no_grad():
        model(make_input())
        y = make_input()
        y.sequences["short"].values_BLD += 1.0
        model(y)
    torch.testing.assert_close(decoded["a"][0], decoded["a"][1], rtol=0, atol=0)  # stream 0 ignores sequence 1


# -- Hiformer: low rank at full rank + pruning == full model ------------------------------------------------------

def test_hiformer_full_rank_factorisation_and_pruning_equal_the_full_model():
    full = build("hiformer", rank=0, prune_last_layer=False).eval()
    num_tokens = 1 + len(SHAPE.blocks) + 1 + len(SHAPE.sequences)
    width = num_tokens * full.cfg.d_model
    fast = build("hiformer", rank=width, prune_last_layer=True).eval()
    state = fast.state_dict()
    for key, value in full.state_dict().items():
        if key.endswith((".k.up.weight", ".v.up.weight")):  # full W -> down = W, up = I: U V^T = W exactly
            state[key.replace(".up.", ".down.")] = value
            state[key] = torch.eye(width)
        else:
            state[key] = value
    fast.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fast(make_input()).logits, full(make_input()).logits)
    low = build("hiformer", rank=8)
    assert sum(p.numel() for p in low.parameters()) < sum(p.numel() for p in full.parameters())


# -- OneTrans / MTGR (the unified baselines): mixed parameterisation, pyramid, causality ---------------------------

def _first_layer_out(model, x) -> OneTransState:
    state = OneTransState(seq=model.sequence_tokens(x), ns_BMD=model.ns(x).tokens_BMD)
    return model.layers[0](state, model.schedule[0])


def test_onetrans_ns_weights_are_token_specific_and_sequence_weights_shared():
    model = build("onetrans", causal=False).eval()  # causal, the first event would see only itself (weight 1)
    layer, num_ns = model.layers[0], model.ns.num_tokens
    # Token-specific: one slice per NS token; shared: one Linear whatever the number of events.
    assert layer.ns_q.weight_TIO.shape[0] == num_ns and layer.ns_ffn.up.per_token.weight_TIO.shape[0] == num_ns
    longer = InputShape(blocks=SHAPE.blocks, dense_dim=SHAPE.dense_dim,
                        sequences={n: SequenceShape(s.dim, max_len=10 * s.max_len) for n, s in SHAPE.sequences.items()})
    seq_params = [sum(p.numel() for n, p in m.named_parameters() if ".seq_" in n)
                  for m in (model, build_model("onetrans", {}, longer))]
    assert seq_params[0] == seq_params[1]
    x = make_input()
    with torch.no_grad():
        base = _first_layer_out(model, x)
        layer.ns_q.weight_TIO[2].add_(torch.randn_like(layer.ns_q.weight_TIO[2]))  # NS token 2's own query
        layer.ns_ffn.down.per_token.weight_TIO[2].add_(1.0)  # ... and its own FFN
        out = _first_layer_out(model, x)
        others = [m for m in range(num_ns) if m != 2]
        torch.testing.assert_close(out.ns_BMD[:, others], base.ns_BMD[:, others], rtol=0, atol=0)
        torch.testing.assert_close(out.seq.values_BLD, base.seq.values_BLD, rtol=0, atol=0)
        assert not torch.allclose(out.ns_BMD[:, 2], base.ns_BMD[:, 2])
        layer.seq_q.weight.add_(torch.randn_like(layer.seq_q.weight))  # the one query weight of every event
        moved = (_first_layer_out(model, x).seq.values_BLD - out.seq.values_BLD).abs().sum(-1) > 0
    assert moved[base.seq.mask_BL].all()


def test_onetrans_pyramid_schedule_and_causal_attention():
    num_events = sum(s.max_len for s in SHAPE.sequences.values())  # 15
    assert build("onetrans", num_layers=3).schedule == [15, 8, 0]
    assert build("onetrans", num_layers=3, first_layer="longer", recent_len=4).schedule == [4, 2, 0]
    assert build("onetrans", num_layers=3, pyramid=False).schedule == [num_events, num_events, 0]
    assert build("onetrans", num_layers=3, seq_queries=[-1, 20]).schedule == [15, 15, 0]
    model = build("onetrans").eval()
    x = make_input()
    with torch.no_grad():
        base = _first_layer_out(model, x)
        x.sequences["short"].values_BLD[0, 1] += 1.0  # a later event (merged position 11) ...
        out = _first_layer_out(model, x)
    torch.testing.assert_close(out.seq.values_BLD[:, :11], base.seq.values_BLD[:, :11], rtol=0, atol=0)  # ... unseen
    assert not torch.allclose(out.ns_BMD[0], base.ns_BMD[0])  # NS tokens come last and see every event


def test_onetrans_rejects_bad_schedules():
    with pytest.raises(ValueError, match="seq_queries"):
        build_model("onetrans", {"num_layers": 3, "seq_queries": [4]}, SHAPE)
    with pytest.raises(ValueError, match="first_layer"):
        build_model("onetrans", {"first_layer": "sparse"}, SHAPE)


# -- fast paths against their plain references (models/layers/fastpath.py) ---------------------------------------

def _logits_and_grads(model: torch.nn.Module, x) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = model(x).logits
    logits.square().sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fast_paths_match_the_reference_paths_on_every_tower(variant):
    """Batched projections (Q/K/V in one GEMM, per-token weights in one bmm, Hiformer's composite K/V) give the
    reference's logits and gradients to float rounding."""
    from hyrank.models.layers.fastpath import reference_paths

    model = build(variant).eval()  # eval: dropout off, so both passes see the same function
    x = make_input(batch_size=2)
    fast_logits, fast_grads = _logits_and_grads(model, x)
    with reference_paths():
        ref_logits, ref_grads = _logits_and_grads(model, x)
    torch.testing.assert_close(fast_logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_batched_projection_helpers_match_layer_by_layer():
    from hyrank.models.layers.hetero import CompositeProjection, composite_pair
    from hyrank.models.layers.mlp import linears
    from hyrank.models.layers.token_mixing import PerTokenLinear, TokenLinear, token_linears

    torch.manual_seed(0)
    x_BTD = torch.randn(5, 4, 8)
    for shared in (False, True):
        layers = [TokenLinear(4, 8, w, shared=shared) for w in (8, 6, 8)]
        for tokens in (slice(None), slice(0, 1)):
            got = token_linears(x_BTD[:, tokens], layers, tokens)
            for g, layer in zip(got, layers):
                torch.testing.assert_close(g, layer(x_BTD[:, tokens], tokens))
    one = PerTokenLinear(4, 8, 3, bias=False)
    torch.testing.assert_close(one(x_BTD), torch.stack([x_BTD[:, t] @ one.weight_TIO[t] for t in range(4)], dim=1))
    plain = [torch.nn.Linear(8, 5), torch.nn.Linear(8, 7)]
    for g, layer in zip(linears(x_BTD, plain), plain):
        torch.testing.assert_close(g, layer(x_BTD))
    for rank in (0, 6):
        k, v = CompositeProjection(4, 8, rank=rank), CompositeProjection(4, 8, rank=rank)
        got_k, got_v = composite_pair(x_BTD, k, v)
        torch.testing.assert_close(got_k, k(x_BTD))
        torch.testing.assert_close(got_v, v(x_BTD))
    with pytest.raises(ValueError, match="shared or per-token"):
        token_linears(x_BTD, [TokenLinear(4, 8, 8), TokenLinear(4, 8, 8, shared=True)])
