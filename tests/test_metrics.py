"""Exact metrics against brute-force references."""

import itertools

import numpy as np
import pytest

from hyrank.pipeline.metrics import auc, compute_metrics, grouped_auc


def _pairwise_auc(s, y):
    pos, neg = s[y == 1], s[y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_with_ties_matches_pairwise(seed):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 6, 80).astype(float)  # many ties
    y = rng.integers(0, 2, 80)
    assert auc(s, y) == pytest.approx(_pairwise_auc(s, y), abs=1e-12)


def test_grouped_auc_skips_single_class_groups():
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(30), 7)
    s = rng.normal(size=len(g)).round(1)
    y = rng.integers(0, 2, len(g))
    y[g == 3] = 1  # only positives: skipped
    values, groups = grouped_auc(s, y, g)
    expected = {k: _pairwise_auc(s[g == k], y[g == k]) for k in np.unique(g)
                if 0 < y[g == k].sum() < (g == k).sum()}
    assert groups.tolist() == sorted(expected)
    np.testing.assert_allclose(values, [expected[k] for k in groups], atol=1e-12)


def test_compute_metrics_logloss_ne_calibration():
    logits = np.array([2.0, -1.0, 0.5, -3.0])
    y = np.array([1, 0, 1, 0])
    m = compute_metrics(logits, y, np.array([0, 0, 1, 1]), oracle_p=np.array([0.9, 0.1, 0.8, 0.2]))
    p = 1 / (1 + np.exp(-logits))
    ll = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert m.logloss == pytest.approx(ll)
    assert m.ne == pytest.approx(ll / np.log(2))
    assert m.calibration == pytest.approx(p.mean() / 0.5)
    assert m.auc == 1.0 and m.query_auc == 1.0 and m.num_queries == 2 and m.oracle_auc == 1.0


def _metrics_on_rank(rank, world_size):
    import torch

    from hyrank.pipeline.distributed.collectives import Collectives
    from hyrank.pipeline.train.evaluate import metrics_over_ranks

    rng = np.random.default_rng(rank)
    n = 300 + 50 * rank  # unequal lengths per rank are allowed
    logits = torch.tensor(rng.normal(size=n).round(1), dtype=torch.float32)
    labels = torch.tensor(rng.integers(0, 2, n), dtype=torch.float32)
    groups = torch.tensor(rng.integers(0, 40, n))  # the same query ids on both ranks: queries span ranks
    metrics = metrics_over_ranks(Collectives.of_world(), logits, labels, groups)
    return metrics, (logits.numpy(), labels.numpy(), groups.numpy())


def test_metrics_over_two_ranks_equal_a_single_process_reference():
    from dist import run_distributed

    (m0, d0), (m1, d1) = run_distributed(_metrics_on_rank)
    assert m0 == m1
    s, y, g = (np.concatenate([a, b]) for a, b in zip(d0, d1))
    assert m0.num_rows == len(s)
    assert m0.auc == pytest.approx(_pairwise_auc(s, y), abs=1e-9)
    per_query = [_pairwise_auc(s[g == k], y[g == k]) for k in np.unique(g) if 0 < y[g == k].sum() < (g == k).sum()]
    assert m0.num_queries == len(per_query)
    assert m0.query_auc == pytest.approx(np.mean(per_query), abs=1e-9)
