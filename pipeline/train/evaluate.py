"""Scoring a day with the current model: the real rows' logits, labels, query ids and oracle, in one pass.

    scores = score_day(trainer.model, reader, device=env.device, bar=None)
    metrics = metrics_over_ranks(env.comm, scores.logits, scores.labels, scores.groups, scores.oracle)

Filler rows (weight 0, pipeline/data/reader.py) keep every rank's batches full; they are not data, so they are
not scored: the metrics cover every valid row of the day exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyrank.pipeline.data.reader import DayReader
from hyrank.pipeline.distributed.collectives import Collectives
from hyrank.pipeline.metrics import EvalMetrics, compute_metrics


@dataclass
class Scores:
    logits: torch.Tensor  # (N,) float32, N the rank's real rows
    labels: torch.Tensor  # (N,)
    groups: torch.Tensor  # (N,) query ids
    oracle: torch.Tensor | None  # (N,) true click probability, synthetic data only


@torch.no_grad()
def score_day(model: torch.nn.Module, reader: DayReader, *, device: torch.device, bar=None) -> Scores:
    """Every real row `reader` yields, scored by `model` in eval mode (restored to train mode after): fp32, what an
    export serves (train.autocast covers the tower's training forward only)."""
    parts: dict[str, list[torch.Tensor]] = {"logits": [], "labels": [], "groups": [], "oracle": []}
    model.eval()
    try:
        for batch in reader:
            _, out = model(batch.to(device, non_blocking=True))
            real = torch.ones(batch.batch_size, dtype=torch.bool) if batch.weights is None else batch.weights > 0
            on_device = real.to(out.labels.device)
            parts["logits"].append(out.logits.float()[on_device])
            parts["labels"].append(out.labels[on_device])
            parts["groups"].append(out.group_ids[on_device])
            if batch.oracle_p is not None:
                parts["oracle"].append(batch.oracle_p[real])
            if bar is not None:
                bar.update(1)
    finally:
        model.train()
    if not parts["labels"]:
        raise ValueError(f"evaluation {reader.day.label} gave no batch")
    return Scores(torch.cat(parts["logits"]), torch.cat(parts["labels"]), torch.cat(parts["groups"]),
                  torch.cat(parts["oracle"]) if parts["oracle"] else None)


def metrics_over_ranks(comm: Collectives, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None,
                       oracle_p: torch.Tensor | None = None) -> EvalMetrics:
    """Exact metrics over every rank's rows, returned identically on every rank.

    Predictions are gathered on rank 0 only (about 17 bytes a row: logit, label, group, oracle), which computes
    and broadcasts the result: memory on rank 0 grows with the evaluation day (10M rows ~ 170 MB), the price of
    an exact, unbinned AUC and of query-level AUC whose queries may be split across ranks.
    """
    gathered = [None if t is None else comm.gather_to_main(t) for t in (logits.float(), labels, groups, oracle_p)]
    return comm.broadcast_object(compute_metrics(*gathered) if comm.is_main else None)


def best_checkpoints(scores: dict[str, float], k: int, metric: str) -> set[str]:
    """The names of the `k` best-scored checkpoints (higher is better for AUCs, lower for logloss / NE)."""
    higher_better = metric in ("auc", "query_auc")
    ranked = sorted(scores, key=lambda name: scores[name], reverse=higher_better)
    return set(ranked[:k])
