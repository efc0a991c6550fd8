"""Exact evaluation metrics: AUC, query-level AUC, logloss / normalised entropy, calibration.

All exact (rank statistics with ties at their mid-rank, no binning), computed over a whole evaluation day after
gathering every rank's predictions.

Query-level AUC follows the HyFormer paper (section 4.1): the AUC of the rows of each query, averaged over the
queries that have both a click and a non-click, unweighted (every query counts once).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class EvalMetrics:
    num_rows: int
    ctr: float  # mean label
    auc: float
    query_auc: float | None  # None without a group column; NaN when no query has both classes
    num_queries: int  # queries with both classes, i.e. those averaged in query_auc
    logloss: float
    ne: float  # logloss / entropy of the day's CTR (1.0 = no better than predicting the base rate)
    calibration: float  # mean prediction / mean label
    oracle_auc: float | None = None  # AUC of the true click probability, when the data has one

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for people: `AUC 0.7345 (oracle AUC 0.8231), query-AUC 0.7012 over 812 queries, logloss ...`;
        a metric that does not apply says so instead of printing a number."""
        oracle = f" (oracle AUC {self.oracle_auc:.4f})" if self.oracle_auc is not None else ""
        query = ("query-AUC n/a (no group column)" if self.query_auc is None
                 else f"query-AUC {self.query_auc:.4f} over {self.num_queries} queries")
        return (f"AUC {self.auc:.4f}{oracle}, {query}, logloss {self.logloss:.4f}, NE {self.ne:.4f}, "
                f"calibration {self.calibration:.3f} ({self.num_rows:,} rows)")


def grouped_auc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group AUC (Mann-Whitney with mid-ranks for ties); returns (auc per valid group, valid group ids)."""
    order = np.lexsort((scores, groups))
    g, s, y = groups[order], scores[order], labels[order].astype(np.float64)
    n = len(g)
    new_group = np.r_[True, g[1:] != g[:-1]]
    group_idx = np.cumsum(new_group) - 1
    group_start = np.flatnonzero(new_group)
    # tie runs: equal score within a group; every member gets the run's average rank
    new_run = new_group | np.r_[True, s[1:] != s[:-1]]
    run_idx = np.cumsum(new_run) - 1
    rank_in_group = np.arange(n) - group_start[group_idx] + 1.0
    run_sum = np.bincount(run_idx, weights=rank_in_group)
    run_len = np.bincount(run_idx)
    mid_rank = (run_sum / run_len)[run_idx]
    n_pos = np.bincount(group_idx, weights=y)
    n_all = np.bincount(group_idx).astype(np.float64)
    n_neg = n_all - n_pos
    rank_pos = np.bincount(group_idx, weights=mid_rank * y)
    valid = (n_pos > 0) & (n_neg > 0)
    auc = (rank_pos[valid] - n_pos[valid] * (n_pos[valid] + 1) / 2) / (n_pos[valid] * n_neg[valid])
    return auc, g[group_start][valid]


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC; NaN if only one class is present."""
    values, _ = grouped_auc(scores, labels, np.zeros(len(scores), dtype=np.int64))
    return float(values[0]) if len(values) else float("nan")


def compute_metrics(logits: np.ndarray, labels: np.ndarray, groups: np.ndarray | None,
                    oracle_p: np.ndarray | None = None) -> EvalMetrics:
    """All metrics of one evaluation, from logits (not probabilities: logloss is computed stably). `groups`
    None: the data has no group column, and query-level AUC is None rather than the AUC of one "query"."""
    logits = logits.astype(np.float64)
    labels = labels.astype(np.float64)
    # log(1 + e^-|x|) form of BCE, stable for large |logit|
    loss = np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))
    logloss = float(loss.mean())
    ctr = float(labels.mean())
    base = -(ctr * np.log(ctr) + (1 - ctr) * np.log(1 - ctr)) if 0 < ctr < 1 else float("nan")
    q_auc, q_groups = grouped_auc(logits, labels, groups) if groups is not None else (None, [])
    p = 1.0 / (1.0 + np.exp(-logits))
    return EvalMetrics(
        num_rows=len(labels),
        ctr=ctr,
        auc=auc(logits, labels),
        query_auc=None if q_auc is None else float(q_auc.mean()) if len(q_auc) else float("nan"),
        num_queries=len(q_groups),
        logloss=logloss,
        ne=logloss / base,
        calibration=float(p.mean() / ctr) if ctr > 0 else float("nan"),
        oracle_auc=auc(oracle_p, labels) if oracle_p is not None else None,
    )
