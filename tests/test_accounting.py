"""Params/FLOPs accounting: hand-counted small cases, meta-device costing, and the HyFormer paper table."""

import re

import torch

from hyrank.models import build_model
from hyrank.models.accounting import (activation_bytes, count_training_flops, dense_params, model_cost, paper_table,
                                      training_flops)
from hyrank.models.inputs import InputShape, SequenceShape
from hyrank.models.layers.attention import MultiHeadAttention


def test_mlp_flops_match_hand_count():
    # DLRM with hidden=[16] on an 8-wide block is Linear(8,16) -> ReLU -> Linear(16,1).
    shape = InputShape(blocks={"a": 8}, dense_dim=0, sequences={})
    model = build_model("dlrm_mlp", {"hidden": [16]}, shape)
    batch = 4
    forward = 2 * batch * (8 * 16 + 16 * 1)  # multiply-adds x 2; bias adds are not counted
    # backward: grad w.r.t. input and w.r.t. weight of each layer, each as costly as the forward matmul
    assert training_flops(model, shape, batch_size=batch) == 3 * forward
    assert dense_params(model) == 8 * 16 + 16 + 16 * 1 + 1


def test_activations_match_hand_count():
    # Linear(8,16) -> ReLU -> Linear(16,1): the first linear keeps its input (B x 8), ReLU its output (B x 16),
    # which the second linear keeps too (one storage, counted once); the weights are not activations
    shape = InputShape(blocks={"a": 8}, dense_dim=0, sequences={})
    with torch.device("meta"):
        model = build_model("dlrm_mlp", {"hidden": [16]}, shape)
    batch = 32
    assert activation_bytes(model, shape, batch_size=batch) == 4 * batch * (8 + 16)


def test_attention_flops_match_hand_count():
    b, q, l, d, c, heads = 2, 3, 7, 16, 12, 4
    # On meta, as model_cost counts (FlopCounterMode has no formula for the CPU fused SDPA backward kernel).
    with torch.device("meta"):
        attn = MultiHeadAttention(d, heads, kv_dim=c)
        x = torch.randn(b, q, d, requires_grad=True)
        kv = torch.randn(b, l, c, requires_grad=True)
        mask = torch.ones(b, l, dtype=torch.bool)
    projections = 2 * b * (q * d * d + 2 * l * c * d + q * d * d)  # W_q, W_k and W_v, W_o
    scores_and_mix = 2 * (2 * b * q * l * d)  # QK^T and PV summed over heads (H * E = D)
    assert count_training_flops(lambda: attn(x, kv, mask)) == 3 * (projections + scores_and_mix)


def test_meta_costing_allocates_nothing_and_matches_real_params():
    shape = InputShape(blocks={"item": 24, "user": 16}, dense_dim=0,
                       sequences={"s": SequenceShape(dim=8, max_len=20)})
    options = {"d_model": 48, "seq_dim": 16, "num_layers": 2}
    cost = model_cost("hyformer", options, shape)
    assert cost.params == dense_params(build_model("hyformer", options, shape))
    assert cost.train_flops_per_sample > 6 * 0.5 * cost.params  # most weights touched at least once per sample
    big = model_cost("rankmixer", {"d_model": 4098, "num_layers": 2}, shape)  # ~0.5B params, on meta only
    assert big.params > 4e8


def _ratio(text: str, name: str) -> float:
    return float(re.search(rf"^ratio {name} FLOPs: ([0-9.]+)", text, re.M).group(1))


def _row(text: str, label: str) -> tuple[float, float]:
    """(params in M, TFLOPs) of a table row."""
    cells = re.search(rf"^{re.escape(label)}\s+([0-9.]+)\s+\S+\s+([0-9.]+)", text, re.M)
    return float(cells.group(1)), float(cells.group(2))


def test_paper_table_prints_with_ratio_in_range():
    text = paper_table()
    assert "HyFormer" in text and "BaseArch" in text
    assert 0.95 <= _ratio(text, "HyFormer/BaseArch") <= 1.35  # paper 3.9/3.5 = 1.11
    assert 4.0 <= _ratio(text, "unified-full-Transformer/HyFormer") <= 8.0  # paper 21.9/3.9 = 5.6
    assert 0.5 <= _ratio(text, "unified-w/-LONGER/HyFormer") <= 2.0  # paper 6.6/3.9 = 1.7
    assert 350 <= _row(text, "HyFormer")[0] <= 480  # near the paper's 418M dense parameters
    full = _row(text, "unified: MTGR/OneTrans w/ Full Transformer")
    longer = _row(text, "unified: MTGR/OneTrans w/ LONGER")
    assert 400 <= full[0] <= 500 and 370 <= longer[0] <= 480  # paper 450M / 406M
    assert full[1] > 4 * longer[1]  # attending with every event costs far more than LONGER's recent ones
