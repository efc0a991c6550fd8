"""Trainer: read a day, train on it, evaluate another, across however many ranks the process group has.

    torchrun --nproc_per_node=2 -m pipeline.cli train --config jobs/configs/default.toml \
        --days 2026-11-01..2026-11-02 --eval-day 2026-11-03

    trainer = Trainer(cfg, env)
    trainer.fit(days, eval_day)          # or: trainer.train_day(day); trainer.evaluate(day)

One step: forward (bf16 autocast on CUDA if asked) -> BCE -> backward, during which fbgemm updates the
sharded tables (fused optimizers) and DDP reduces the dense gradients -> clip -> dense optimizer step.
With `train.allreduce = "async"` the dense step applies last step's gradient (pipeline/distributed/comm_hooks.py)
and every boundary (end of a day, evaluation) flushes the gradient still in flight; a checkpoint keeps it pending
instead (pipeline/train/checkpoint.py), so a resumed run takes the same steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel

from models import build_model
from pipeline.train.checkpoint import Checkpointer
from pipeline.config import RunConfig
from pipeline.data.days import DayPartition
from pipeline.data.reader import DayReader, ReaderOptions
from pipeline.distributed.dmp import make_data_parallel_wrapper, shard_model
from pipeline.distributed.env import DistEnv
from pipeline.train.metrics import EvalMetrics, metrics_over_ranks
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

    def to_dict(self) -> dict:
        return {"day": self.day, "steps": self.steps, "rows": self.rows, "seconds": round(self.seconds, 3),
                "mean_loss": self.mean_loss, "losses": self.losses}


def lr_multiplier(step: int, *, warmup_steps: int = 0, min_ratio: float = 0.0,
                  window: tuple[int, int] | None = None) -> float:
    """Multiplier of train.lr at dense step `step`: a linear warm-up over the first `warmup_steps` steps, times,
    with a `window` (first, last), a half cosine from 1 at `first` to `min_ratio` at `last` (held after it)."""
    factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if window is not None:
        first, last = window
        x = min(1.0, max(0.0, (step - first) / max(last - first, 1)))
        factor *= min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * x))
    return factor


class Trainer:
    """Owns the sharded model, its optimizers and the step counter of one run."""

    def __init__(self, cfg: RunConfig, env: DistEnv, *, progress: bool = False):
        self.cfg, self.env, self.progress = cfg, env, progress and env.is_main
        torch.manual_seed(cfg.seed)  # same dense init on every rank (DDP also broadcasts rank 0's)
        spec = cfg.features
        tower = build_model(cfg.model.name, cfg.model.typed_options(), spec.input_shape())
        model = RankingModel(spec, tower, sparse_device=torch.device("meta"), dedup=cfg.embeddings.dedup)
        t = cfg.train
        wrapper, self.hook = make_data_parallel_wrapper(t.allreduce, t.allreduce_compression,
                                                        t.allreduce_delay_compensation, t.allreduce_weight_prediction)
        self.sharded = shard_model(model, cfg, env, data_parallel_wrapper=wrapper)
        self.model = self.sharded.dmp
        self.optimizer = self.sharded.optimizer  # fused sparse + dense, for checkpoints
        self.dense_optimizer = self.sharded.dense_optimizer
        # (first, last) dense step of the cosine curve (plan_lr); the scheduler counts dense steps
        self.lr_window: tuple[int, int] | None = None
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.dense_optimizer, lambda step: self.lr_factor(step))
        if self.hook is not None:
            self.hook.bind(self.dense_named_parameters())
        self.global_step = 0
        self.days_done: list[str] = []  # training days finished (checkpointed with the run)
        self.checkpointer = Checkpointer(cfg, env)
        self.pipelined_modules = 0  # sharded modules TrainPipelineSparseDist pipelines (train.pipeline)
        self.out_dir = Path(cfg.out_dir)
        self._tb = _tensorboard(self.out_dir) if cfg.train.tensorboard and env.is_main else None

    # -- training ------------------------------------------------------------------------------------------------

    def lr_factor(self, step: int) -> float:
        t = self.cfg.train
        return lr_multiplier(step, warmup_steps=t.warmup_steps, min_ratio=t.lr_min_ratio,
                             window=self.lr_window if t.lr_schedule == "cosine" else None)

    def plan_lr(self, days: list[DayPartition], reader_state: dict | None = None) -> None:
        """Fit the cosine curve to the steps these days will take (the first day from `reader_state` if given).

        A curve still unfinished (a resumed run) is kept, so the resumed run takes the LRs the uninterrupted one
        would have; once finished, the next call starts a new curve from the current step.
        """
        if self.cfg.train.lr_schedule == "constant" or (
                self.lr_window is not None and self.scheduler.last_epoch < self.lr_window[1]):
            return
        steps = 0
        for i, day in enumerate(days):
            reader = self._reader(day, self.cfg.train.max_steps_per_day)
            if i == 0 and reader_state is not None:
                reader.load_state_dict(reader_state)
            steps += reader.num_remaining
        first = self.scheduler.last_epoch
        self.lr_window = (first, first + steps)
        self.apply_lr_schedule()

    def apply_lr_schedule(self) -> None:
        """Set the dense LR of the next step from the schedule (after a new curve, or a checkpoint load: the
        fused/keyed optimizer state does not carry param-group LRs back)."""
        for group, base in zip(self.dense_optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.lr_factor(self.scheduler.last_epoch)

    def _reader(self, day: DayPartition, max_batches: int) -> DayReader:
        cfg = self.cfg
        return DayReader(day, cfg.features, batch_size=cfg.data.batch_size_per_rank, rank=self.env.rank,
                         world_size=self.env.world_size, max_batches=max_batches, seed=cfg.seed,
                         options=ReaderOptions.from_config(cfg.data), dedup=cfg.embeddings.dedup,
                         quarantine_dir=cfg.data.quarantine_dir or self.out_dir / "quarantine")

    def _autocast(self):
        if self.env.device.type == "cuda" and self.cfg.train.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, batch) -> torch.Tensor:
        """One step on one batch (already on the device); returns the detached loss."""
        self._before_forward()
        try:
            with self._autocast():
                loss, _ = self.model(batch)
            self.optimizer.zero_grad()
            loss.backward()  # sparse tables are updated in here (fused optimizers)
        finally:  # the real weights back even if the step fails
            if self.hook is not None:
                self.hook.restore_weights()
        self._after_backward()
        return loss.detach()

    def _before_forward(self) -> None:
        """Before a step's forward (plain loop or TrainPipelineSparseDist): the async hook reduces synchronously
        for the model's first `train.allreduce_sync_steps` steps, then one step stale; and under a weight
        prediction the weights move to the predicted ones (no-op unless configured)."""
        if self.hook is not None:
            if self.cfg.train.allreduce == "async":  # (not the tests' "hook_sync", which stays at 0)
                staleness = int(self.global_step >= self.cfg.train.allreduce_sync_steps)
                if staleness == 0 and self.hook.in_flight:  # a resumed run whose allreduce_sync_steps was raised
                    self.flush()
                self.hook.staleness = staleness
            self.hook.shift_weights()

    def _after_backward(self) -> None:
        """After a step's backward (plain loop or TrainPipelineSparseDist): the real weights back under an async
        prediction (a no-op if already restored), the dense step (async: none on the first step after a flush),
        the step count."""
        if self.hook is not None:
            self.hook.restore_weights()
        if self.hook is None or self.hook.ready:
            self._dense_step()
        self.global_step += 1

    def _dense_step(self) -> None:
        if self.cfg.train.grad_clip_norm > 0:
            params = [p for g in self.dense_optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip_norm)
        if self.hook is not None:
            self.hook.begin_update()
        self.dense_optimizer.step()
        if self.hook is not None:
            self.hook.end_update()
        self.scheduler.step()

    def flush(self) -> None:
        """Boundary: apply any dense gradient still in flight (async allreduce), so none is lost or doubled."""
        if self.hook is not None and self.hook.flush(None):
            self._step_on_pending()

    def _step_on_pending(self) -> None:
        """One dense step on the pending gradient just written into the DDP part. The dense optimizer also steps
        data-parallel tables (their gradients are reduced at once, outside the hook); those get no second step."""
        bound = {id(p) for _, p in self.dense_named_parameters()}
        for group in self.dense_optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in bound:
                    p.grad = None
        self._dense_step()

    def train_day(self, day: DayPartition, reader_state: dict | None = None) -> DayStats:
        """One pass over the day's rows (or `train.max_steps_per_day` steps), flushed at the end.

        `reader_state` continues a day stopped part-way (a mid-day checkpoint). Checkpoints are written every
        `checkpoint.every_steps` steps and at the end of the day, as configured.
        """
        self.plan_lr([day], reader_state)  # no-op inside a curve planned over several days (or unfinished)
        reader = self._reader(day, self.cfg.train.max_steps_per_day)
        if reader_state is not None:
            reader.load_state_dict(reader_state)
        every = self.cfg.checkpoint.every_steps
        rows_per_step = self.cfg.data.batch_size_per_rank * self.env.world_size
        self.model.train()
        start = time.perf_counter()
        losses = []
        num_steps = reader.num_remaining
        bar = _progress(num_steps * rows_per_step, f"train {day.day}", "row", self.progress)
        for step, loss in enumerate(self._steps(reader)):
            losses.append(loss)
            if bar is not None:
                bar.update(rows_per_step)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % self.cfg.train.log_every_steps == 0:
                self._log_train(day, step, num_steps, losses, start)
            if every and self.global_step % every == 0 and reader.num_remaining > 0:
                self.checkpointer.save(self, reader=reader)
        self.flush()
        self.days_done.append(str(day.day))
        if bar is not None:
            bar.close()
        mean_losses = _mean_over_ranks(torch.stack(losses)) if losses else []
        stats = DayStats(str(day.day), len(losses), len(losses) * rows_per_step, time.perf_counter() - start,
                         mean_losses)
        if self.env.is_main:
            self._write_json(self.out_dir / "train" / f"day-{day.day}.json", stats.to_dict())
        if self.cfg.checkpoint.at_day_end:
            self.checkpointer.save(self)
        return stats

    # -- checkpoints (pipeline/train/checkpoint.py) --------------------------------------------------------------------

    def dense_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The DDP part's parameters by name: what the async hook reduces (DMP's own split: every parameter that
        is not in a sharded module)."""
        inner = self.model.module
        sharded = set(DistributedModelParallel._sharded_parameter_names(inner))
        return [(n, p) for n, p in inner.named_parameters() if n not in sharded]

    def checkpoint_state(self) -> dict:
        """What DCP saves and loads: sharded model, fused + dense optimizer state, pending async gradients."""
        state = {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}
        if self.hook is not None:
            state["hook"] = self.hook.state_dict()
        return state

    def load_pending_gradients(self, state: dict) -> None:
        """Pending async gradients from a checkpoint: held for the next step, or (sync run) applied now, once."""
        if self.hook is not None:
            self.hook.load_state_dict(state)
            return
        if not bool(state["has_pending"].any()):
            return
        named = dict(self.dense_named_parameters())
        for flag, name in zip(state["has_pending"].tolist(), sorted(named)):
            named[name].grad = state["pending"][name].clone() if flag else torch.zeros_like(named[name])
        self._step_on_pending()

    def _steps(self, reader: DayReader):
        """Yield each step's loss: plain loop, or TorchRec's TrainPipelineSparseDist (train.pipeline)."""
        if self.cfg.train.pipeline == "plain":
            for batch in reader:
                yield self.train_step(batch.to(self.env.device, non_blocking=True))
            return
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        # A pipeline per day: it rewrites the sharded modules' inputs on attach, and detach() restores the
        # plain forward that evaluation and checkpoints expect.
        pipe = TrainPipelineSparseDist(self.model, _PipelineStep(self), self.env.device)
        batches = iter(reader)
        try:
            while True:
                try:
                    out = pipe.progress(batches)
                except StopIteration:
                    return
                self.pipelined_modules = len(getattr(pipe, "_pipelined_modules", []))
                yield out.loss
        finally:
            pipe.detach()

    def _log_train(self, day, step, num_steps, losses, start) -> None:
        if not self.env.is_main:
            return
        recent = torch.stack(losses[-self.cfg.train.log_every_steps:]).mean().item()
        rows_s = (step + 1) * self.cfg.data.batch_size_per_rank * self.env.world_size / (time.perf_counter() - start)
        if not self.progress:
            log.info("%s step %d/%d loss %.4f (rank 0, last %d steps) %.0f rows/s", day.day, step + 1, num_steps,
                     recent, self.cfg.train.log_every_steps, rows_s)
        if self._tb is not None:
            self._tb.add_scalar("train/loss", recent, self.global_step)
            self._tb.add_scalar("train/rows_per_s", rows_s, self.global_step)
            self._tb.add_scalar("train/lr", self.dense_optimizer.param_groups[0]["lr"], self.global_step)

    # -- evaluation ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, day: DayPartition) -> EvalMetrics:
        """Exact metrics over the whole day (or `train.eval_max_batches`), identical on every rank.

        See pipeline.train.metrics.metrics_over_ranks for where the predictions go and what that costs.
        """
        self.flush()
        reader = self._reader(day, self.cfg.train.eval_max_batches)
        self.model.eval()
        parts: dict[str, list[torch.Tensor]] = {"logits": [], "labels": [], "groups": [], "oracle": []}
        bar = _progress(len(reader), f"eval {day.day}", "batch", self.progress)
        for batch in reader:
            with self._autocast():
                _, out = self.model(batch.to(self.env.device, non_blocking=True))
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
        metrics = metrics_over_ranks(torch.cat(parts["logits"]), torch.cat(parts["labels"]),
                                     torch.cat(parts["groups"]), torch.cat(parts["oracle"]) if parts["oracle"] else None)
        if self.env.is_main:
            self._write_json(self.out_dir / "metrics" / f"eval-{day.day}.json", metrics.to_dict())
            if self._tb is not None:
                for name, value in metrics.to_dict().items():
                    if isinstance(value, float):
                        self._tb.add_scalar(f"eval/{name}", value, self.global_step)
        return metrics

    def fit(self, days: list[DayPartition], eval_day: DayPartition | None = None) -> list[DayStats]:
        """Train on each day in order; evaluate on `eval_day` at the end if given."""
        self.plan_lr(days)  # one curve over all the days
        history = [self.train_day(d) for d in days]
        if eval_day is not None:
            self.evaluate(eval_day)
        return history

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

    @staticmethod
    def _write_json(path: Path, obj) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        tmp.replace(path)


class _PipelineStep:
    """What TrainPipelineSparseDist calls as its optimizer: the trainer's own step after backward."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Called before the forward: also where the async hook is set up for the step (Trainer._before_forward)."""
        self.trainer.optimizer.zero_grad()
        self.trainer._before_forward()

    def step(self, closure=None) -> None:
        self.trainer._after_backward()


def _tensorboard(out_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def _progress(total: int, desc: str, unit: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True)


def _mean_over_ranks(values: torch.Tensor) -> list[float]:
    values = values.float().clone()
    dist.all_reduce(values)
    return (values / dist.get_world_size()).tolist()
