"""HyFormer's counting query decoding (`decode_attention = "null_slot"`, models/counting_attention.py).

Softmax decoding averages the events, so k copies of one event decode identically for every k; the null slot's
output moves with k. These tests show both, check the null slot against a written-out softmax, its padding
invariance, export, its cost, that a tiny HyFormer learns a counting task with it that the softmax one cannot,
and that the option is read from a run config and bad values are refused.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from hyrank.models import build_model
from hyrank.models.accounting import model_cost
from hyrank.models.counting_attention import NullSlotCrossAttentionLayer, attend_null_slot, attend_null_slot_reference
from hyrank.models.inputs import InputShape, SequenceInput, SequenceShape, TowerInput
from hyrank.models.layers.attention import CrossAttentionLayer
from hyrank.pipeline.config import load_config

from conftest import DEFAULT_CONFIG

EVENT_DIM, MAX_LEN = 8, 12
SHAPE = InputShape(blocks={"item": EVENT_DIM}, dense_dim=0,
                   sequences={"events": SequenceShape(dim=EVENT_DIM, max_len=MAX_LEN)})
TINY = {"d_model": 16, "num_layers": 1, "num_heads": 2, "ffn_mult": 2, "seq_dim": 16, "recent_len": MAX_LEN,
        "query_ffn_hidden": 32, "head_hidden": [32]}


def copies(event_BC: torch.Tensor, counts_B: torch.Tensor, max_len: int = MAX_LEN, pad: float = 0.0) -> SequenceInput:
    """Row b: `counts_B[b]` real copies of `event_BC[b]`, then padding filled with `pad`."""
    mask_BL = torch.arange(max_len)[None, :] < counts_B[:, None]
    values = event_BC[:, None, :].expand(-1, max_len, -1)
    return SequenceInput(values_BLD=torch.where(mask_BL[..., None], values, pad), mask_BL=mask_BL)


def counting_batch(event_BC: torch.Tensor, counts_B: torch.Tensor, pad: float = 0.0) -> TowerInput:
    """The candidate ("item") is the event; its sequence holds `counts_B` copies of it."""
    return TowerInput(blocks={"item": event_BC}, dense=event_BC.new_zeros(len(event_BC), 0),
                      sequences={"events": copies(event_BC, counts_B, pad=pad)})


def build(decode_attention: str, seed: int = 0, **extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("hyformer", TINY | {"decode_attention": decode_attention} | extra, SHAPE)


def test_softmax_decoder_is_blind_to_the_count_and_the_null_slot_is_not():
    torch.manual_seed(0)
    dim, kv_dim = 16, 8
    softmax, null_slot = CrossAttentionLayer(dim, 2, kv_dim=kv_dim), NullSlotCrossAttentionLayer(dim, 2, kv_dim=kv_dim)
    loaded = null_slot.load_state_dict(softmax.state_dict(), strict=False)  # same projections and names
    assert set(loaded.missing_keys) == {"attn.null_k_HE", "attn.null_v_HE"} and not loaded.unexpected_keys
    query_1QD = torch.randn(1, 1, dim)
    event = torch.randn(1, kv_dim)
    counts = torch.arange(1, MAX_LEN + 1)
    seq = copies(event.expand(len(counts), -1), counts, pad=5.0)
    with torch.no_grad():
        plain = softmax(query_1QD.expand(len(counts), -1, -1), seq)[:, 0]
        counted = null_slot(query_1QD.expand(len(counts), -1, -1), seq)[:, 0]
        empty = null_slot(query_1QD, copies(event, torch.tensor([0])))[:, 0]
    torch.testing.assert_close(plain, plain[:1].expand_as(plain), rtol=0, atol=1e-6)  # k = 1 .. 12: one output
    # v_null starts at zero, so the output moves from the empty row's along one direction, further with every copy
    moved = (counted - empty).norm(dim=-1)
    assert (moved.diff() > 1e-4).all(), moved


@pytest.mark.parametrize("seq_encoder", ["longer", "transformer", "swiglu"])
def test_whole_softmax_model_is_blind_to_the_count_and_null_slot_is_not(seq_encoder):
    event = torch.randn(1, EVENT_DIM, generator=torch.Generator().manual_seed(1)).expand(MAX_LEN, -1)
    x = counting_batch(event, torch.arange(1, MAX_LEN + 1))
    with torch.no_grad():
        plain = build("softmax", seq_encoder=seq_encoder).eval()(x).logits
        counted = build("null_slot", seq_encoder=seq_encoder).eval()(x).logits
    torch.testing.assert_close(plain, plain[:1].expand_as(plain), rtol=0, atol=1e-5)
    assert (counted.diff().abs() > 1e-5).all(), counted  # every extra copy moves the logit


def test_under_longer_the_decoder_counts_only_the_recent_events_it_sees():
    """LONGER hands the decoder its last L_H = 4 events (each having attended to all of them, by softmax): the
    null slot tells 1 to 4 copies apart, but not 4 copies from 12."""
    event = torch.randn(1, EVENT_DIM, generator=torch.Generator().manual_seed(1)).expand(MAX_LEN, -1)
    x = counting_batch(event, torch.arange(1, MAX_LEN + 1))
    with torch.no_grad():
        logits = build("null_slot", recent_len=4).eval()(x).logits
    assert (logits[:4].diff().abs() > 1e-5).all(), logits
    torch.testing.assert_close(logits[3:], logits[3:4].expand(MAX_LEN - 3), rtol=0, atol=1e-5)


def test_null_slot_attention_matches_the_written_out_softmax():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 2, 4, 8, generator=g)  # 4 queries over 6 keys
    k, v = torch.randn(3, 2, 6, 8, generator=g), torch.randn(3, 2, 6, 8, generator=g)
    mask = torch.tensor([[True] * 6, [True, False, True, True, False, False], [False] * 6])  # row 2: no event
    null_k, null_v = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    for m in (mask, None):
        torch.testing.assert_close(attend_null_slot(q, k, v, m, null_k, null_v),
                                   attend_null_slot_reference(q, k, v, m, null_k, null_v))
    empty = attend_null_slot(q, k, v, mask, null_k, null_v)[2]  # all mass on the null slot
    torch.testing.assert_close(empty, null_v[:, None, :].expand_as(empty))


def test_padded_events_contribute_nothing():
    torch.manual_seed(3)
    event = torch.randn(4, EVENT_DIM)
    counts = torch.tensor([0, 1, 5, MAX_LEN])  # an empty row, a full row
    model = build("null_slot", recent_len=4).eval()
    with torch.no_grad():
        base = model(counting_batch(event, counts, pad=0.0)).logits
        noisy = model(counting_batch(event, counts, pad=1e3)).logits
    torch.testing.assert_close(base, noisy, rtol=0, atol=1e-6)
    assert torch.isfinite(base).all()
    # more padding (a longer padded length) changes nothing either, in the decoder itself
    layer = NullSlotCrossAttentionLayer(16, 2, kv_dim=EVENT_DIM)
    q = torch.randn(4, 3, 16)
    with torch.no_grad():
        short = layer(q, copies(event, counts))
        long = layer(q, copies(event, counts, max_len=3 * MAX_LEN, pad=-7.0))
    torch.testing.assert_close(short, long, rtol=0, atol=1e-6)


def test_tiny_hyformer_learns_to_count_where_softmax_cannot():
    """Label: does the sequence hold more than 6 copies of the candidate (1..12 copies, 50/50). Only the count of
    events carries the label, so softmax decoding sits at chance (ln 2 nats); the null slot must beat it by 0.3
    nats on held-out rows (measured after 80 steps of 64 rows: 0.07-0.13 nats over 4 seeds, softmax 0.69)."""
    def data(seed: int, rows: int) -> tuple[TowerInput, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        counts = torch.randint(1, MAX_LEN + 1, (rows,), generator=g)
        return counting_batch(torch.randn(rows, EVENT_DIM, generator=g), counts), (counts > 6).float()

    held_out, held_out_labels = data(seed=1000, rows=1024)
    loss = {}
    for mode in ("softmax", "null_slot"):
        model = build(mode)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for step in range(80):
            x, y = data(seed=step, rows=64)
            step_loss = F.binary_cross_entropy_with_logits(model(x).logits, y)
            opt.zero_grad()
            step_loss.backward()
            opt.step()
        with torch.no_grad():
            loss[mode] = F.binary_cross_entropy_with_logits(model.eval()(held_out).logits, held_out_labels).item()
    print(f"held-out loss: {loss}")
    assert loss["softmax"] > math.log(2) - 0.02  # what softmax decoding sees does not depend on the label
    assert loss["null_slot"] < loss["softmax"] - 0.3


def test_null_slot_model_exports_with_a_dynamic_batch():
    model = build("null_slot").eval()

    class Scoring(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tower = model

        def forward(self, item, values, mask):
            return self.tower(TowerInput(blocks={"item": item}, dense=item.new_zeros(item.shape[0], 0),
                                         sequences={"events": SequenceInput(values_BLD=values, mask_BL=mask)})).logits

    def inputs(rows: int, seed: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        counts = torch.randint(0, MAX_LEN + 1, (rows,), generator=g)
        x = counting_batch(torch.randn(rows, EVENT_DIM, generator=g), counts)
        return x.blocks["item"], x.sequences["events"].values_BLD, x.sequences["events"].mask_BL

    rows = torch.export.Dim("rows", min=1, max=1024)
    program = torch.export.export(Scoring(), inputs(4, 0), dynamic_shapes=({0: rows}, {0: rows}, {0: rows}),
                                  strict=False)
    other = inputs(7, 1)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*other), Scoring()(*other))


def test_null_slot_costs_two_vectors_per_head_per_decoder():
    shape = InputShape(blocks={"user": 12, "item": 20}, dense_dim=3,
                       sequences={"long": SequenceShape(dim=16, max_len=10), "short": SequenceShape(dim=8, max_len=5)})
    options = {"d_model": 40, "num_layers": 2, "num_heads": 4}
    plain = model_cost("hyformer", options, shape)
    counted = model_cost("hyformer", options | {"decode_attention": "null_slot"}, shape)
    # a null key and a null value of width D/H for each of the H heads: 2 * D per decoder (2 streams x 2 layers)
    assert counted.params - plain.params == 2 * 40 * 2 * 2
    assert plain.train_flops_per_sample < counted.train_flops_per_sample < 1.05 * plain.train_flops_per_sample


def _load(*options: str):
    return load_config(DEFAULT_CONFIG, ["model.name=hyformer", "model.options={}", *options])


def test_option_is_read_from_the_run_config_and_defaults_to_softmax():
    assert _load().model.config.decode_attention == "softmax"
    assert _load("model.options.decode_attention=null_slot").model.config.decode_attention == "null_slot"
    assert not any(isinstance(m, NullSlotCrossAttentionLayer) for m in build("softmax").modules())
    decoders = [m for m in build("null_slot").modules() if isinstance(m, NullSlotCrossAttentionLayer)]
    assert len(decoders) == TINY["num_layers"] * len(SHAPE.sequences)


@pytest.mark.parametrize("bad", ['"sigmoid"', '"NULL_SLOT"', "1", "true"])
def test_bad_values_are_refused_naming_the_key(bad):
    with pytest.raises(ValueError, match=r"model\.options\.decode_attention must be one of "
                                         r"\['softmax', 'null_slot'\], got") as err:
        _load(f"model.options.decode_attention={bad}")
    assert str(DEFAULT_CONFIG) in str(err.value)
    with pytest.raises(ValueError, match=r"^decode_attention must be one of"):  # a dict no loader checked, too
        build_model("hyformer", {"decode_attention": bad.strip('"')}, SHAPE)
