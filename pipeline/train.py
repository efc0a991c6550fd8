"""Trainer: read a day, train on it, evaluate another, across however many ranks the process group has.

    torchrun --nproc_per_node=2 -m pipeline.cli train --config jobs/configs/default.toml \
        --days 2026-11-01..2026-11-02 --eval-day 2026-11-03

    trainer = Trainer(cfg, env)
    trainer.train_day(day); metrics = trainer.evaluate(eval_day)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from models import build_model
from pipeline.config import RunConfig
from pipeline.data import DayPartition, DayReader
from pipeline.distributed.dmp import shard_model
from pipeline.distributed.env import DistEnv
from pipeline.metrics import EvalMetrics, compute_metrics
from pipeline.ranker import RankingModel

log = logging.getLogger(__name__)


@dataclass
class DayStats:
    day: str
    steps: int
    rows: int  # across all ranks
    seconds: float
    losses: list[float] = field(default_factory=list)  # per step, averaged over ranks

    @property
    def mean_loss(self) -> float:
        return float(np.mean(self.losses)) if self.losses else float("nan")


class Trainer:
    """Owns the sharded model and its optimizers for one run."""

    def __init__(self, cfg: RunConfig, env: DistEnv, *, progress: bool = False):
        self.cfg, self.env, self.progress = cfg, env, progress and env.is_main
        torch.manual_seed(cfg.seed)  # same dense init on every rank (DDP also broadcasts rank 0's)
        spec = cfg.features
        tower = build_model(cfg.model.name, cfg.model.typed_options(), spec.input_shape())
        model = RankingModel(spec, tower, sparse_device=torch.device("meta"))
        self.sharded = shard_model(model, cfg, env)
        self.model = self.sharded.dmp
        self.optimizer = self.sharded.optimizer

    def _reader(self, day: DayPartition, max_batches: int) -> DayReader:
        return DayReader(day, self.cfg.features, batch_size=self.cfg.data.batch_size_per_rank,
                         rank=self.env.rank, world_size=self.env.world_size, max_batches=max_batches)

    def train_day(self, day: DayPartition) -> DayStats:
        """One pass over the day's rows (or `train.max_steps_per_day` steps)."""
        reader = self._reader(day, self.cfg.train.max_steps_per_day)
        self.model.train()
        start = time.perf_counter()
        losses = []
        bar = _progress(len(reader), f"train {day.day}", self.progress)
        for step, batch in enumerate(reader):
            loss, _ = self.model(batch.to(self.env.device))
            self.optimizer.zero_grad()
            loss.backward()  # sparse tables are updated inside backward (fused optimizer)
            self.optimizer.step()
            losses.append(loss.detach())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % self.cfg.train.log_every_steps == 0 and self.env.is_main and bar is None:
                log.info("%s step %d/%d loss %.4f", day.day, step + 1, len(reader), loss.item())
        if bar is not None:
            bar.close()
        mean_losses = _mean_over_ranks(torch.stack(losses)) if losses else []
        rows = len(reader) * self.cfg.data.batch_size_per_rank * self.env.world_size
        return DayStats(str(day.day), len(reader), rows, time.perf_counter() - start, mean_losses)

    @torch.no_grad()
    def evaluate(self, day: DayPartition) -> EvalMetrics:
        """Exact metrics over the whole day (or `train.eval_max_batches`), gathered from every rank."""
        reader = self._reader(day, self.cfg.train.eval_max_batches)
        self.model.eval()
        parts: dict[str, list[torch.Tensor]] = {"logits": [], "labels": [], "groups": [], "oracle": []}
        bar = _progress(len(reader), f"eval {day.day}", self.progress)
        for batch in reader:
            _, out = self.model(batch.to(self.env.device))
            parts["logits"].append(out.logits.float())
            parts["labels"].append(out.labels)
            parts["groups"].append(out.group_ids)
            if batch.oracle_p is not None:
                parts["oracle"].append(batch.oracle_p)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        self.model.train()
        if not parts["labels"]:
            raise ValueError(f"evaluation day {day.day} gave no batch (fewer rows than ranks x batch size?)")
        gathered = {k: _gather(torch.cat(v)) for k, v in parts.items() if v}
        return compute_metrics(gathered["logits"], gathered["labels"], gathered["groups"], gathered.get("oracle"))


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True)


def _mean_over_ranks(values: torch.Tensor) -> list[float]:
    values = values.float().clone()
    dist.all_reduce(values)
    return (values / dist.get_world_size()).tolist()


def _gather(t: torch.Tensor) -> np.ndarray:
    """Concatenate a 1-D tensor over ranks (every rank has the same length: equal batch counts)."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out).cpu().numpy()
