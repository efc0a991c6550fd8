"""Trainer: the training run across however many ranks the process group has. It owns the only day loop.

    torchrun --nproc_per_node=2 -m hyrank.pipeline.cli train --config jobs/configs/default.toml \
        --days 2026-11-01..2026-11-02 --eval-day 2026-11-03

    trainer = Trainer(cfg, env)
    result = trainer.run(RunPlan(train_days=days, eval_days=[eval_day], resume="latest"))
    trainer.close()

The trainer discovers nothing: the caller (pipeline/cli/run.py, a benchmark, the daily stream) says which days to train
and evaluate and where to resume from. One step: forward (the tower under bf16 autocast if train.autocast asks) ->
BCE -> backward, during which fbgemm updates the sharded tables (fused optimizers) and DDP reduces the dense
gradients -> the dense step, whose reduction policy and call order belong to DenseSync
(pipeline/distributed/dense_sync.py). With `train.allreduce = "async"` the dense step applies last step's gradient
and every boundary (end of a day, evaluation) flushes the gradient still in flight; a checkpoint keeps it pending
instead, so a resumed run takes the same steps. Checkpoints hold the trainer's Stateful parts
(pipeline/train/checkpoint.py, pipeline/train/state.py).

Each step's only collective of the pipeline's own is the reader's agreement before the batch (pipeline/data/
reader.py: a rank failed, a real row is left, a rank was signalled); every collective goes through `env.comm`
(pipeline/distributed/collectives.py). A day's end is a step of the loop: its checkpoint, then the plan's
`day_end` callbacks (the stream's export and report).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torchrec.distributed.model_parallel import DistributedModelParallel

from hyrank.pipeline.config import RunConfig, save_resolved
from hyrank.pipeline.data.days import Days
from hyrank.pipeline.data.reader import DayReader
from hyrank.pipeline.data.split import group_days
from hyrank.pipeline.distributed.dense_sync import DenseSync
from hyrank.pipeline.distributed.env import DistEnv
from hyrank.pipeline.distributed.managed_state import ModelState, describe_stats, managed_stats
from hyrank.pipeline.distributed.signals import GracefulStop
from hyrank.pipeline.files import write_json
from hyrank.pipeline.storage import location
from hyrank.pipeline.logs import progress
from hyrank.pipeline.train.checkpoint import PROGRESS, RUN, Checkpointer
from hyrank.pipeline.train.plan import (DayEnd, DayStats, RunPlan, RunResult, RunStopped, best_record, pass_order,
                                        passes_since_best, reader_seed)
from hyrank.pipeline.train.evaluate import best_checkpoints, metrics_over_ranks, score_day
from hyrank.pipeline.train.model import build_run_model
from hyrank.pipeline.train.pipelined import InputClock, pipelined_steps
from hyrank.pipeline.metrics import EvalMetrics
from hyrank.pipeline.train.resume import WarmStart, checkpoint_diff, checkpoint_to_resume
from hyrank.pipeline.train.resume import warm_start as resume_warm
from hyrank.pipeline.train.run_lock import hold_run_dir
from hyrank.pipeline.train.schedule import LRSchedule
from hyrank.pipeline.train.state import (Ledger, OptimizerState, Progress, ReaderCursor, RNGState, RunIdentity,
                                         ledger_dir)

log = logging.getLogger(__name__)


class Trainer:
    """Owns the sharded model, its optimizers, the dense step, the LR schedule and the checkpoints of one run."""

    def __init__(self, cfg: RunConfig, env: DistEnv, *, progress: bool = False):
        self.cfg, self.env, self.show_progress = cfg, env, progress and env.is_main
        built = build_run_model(cfg, env)
        self.sequence_feed = built.sequence_feed  # readers shape sequences the way this model's lookup reads them
        self.sharded, hook, t = built.sharded, built.hook, cfg.train
        self.model = self.sharded.dmp
        self.optimizer = self.sharded.optimizer  # fused sparse + dense, for checkpoints
        self.schedule = LRSchedule(self.sharded.dense_optimizer, t)
        self.dense = DenseSync(self.sharded.dense_optimizer, self.dense_named_parameters(), hook=hook,
                               mode=t.allreduce, sync_steps=t.allreduce_sync_steps, grad_clip_norm=t.grad_clip_norm,
                               on_step=self.schedule.step)
        self.progress = Progress()
        self.cursor = ReaderCursor()
        self.out_dir = Path(cfg.out_dir)
        checkpoints = location(cfg.checkpoint.dir or self.out_dir / "checkpoints")
        self.ledger = Ledger(ledger_dir(self.out_dir, checkpoints), env.rank)
        self.checkpointer = Checkpointer(
            checkpoints, env, keep=cfg.checkpoint.keep,
            tensors={"model": ModelState(self.model), "optim": OptimizerState(self.optimizer), "hook": self.dense},
            meta={RUN: RunIdentity(cfg), PROGRESS: self.progress, "schedule": self.schedule},
            per_rank={"reader": self.cursor, "rng": RNGState(), "ledger": self.ledger},
            info={"plan": self.sharded.plan_dict})
        self._stop: GracefulStop | None = None  # set while run() is in progress
        self._earlier_losses: list[float] = []
        self._losses: list[torch.Tensor] = []
        self.pipelined_modules = 0  # sharded modules TrainPipelineSparseDist pipelines (train.pipeline)
        self._tb_writer = None  # made on first use: a run refused by the run lock writes nothing

    @property
    def global_step(self) -> int:
        return self.progress.global_step

    @property
    def stop_requested(self) -> bool:
        """Whether this rank got SIGTERM/SIGINT during run() (the others may not have: agreeing is collective)."""
        return self._stop is not None and self._stop.requested

    @property
    def _tb(self):
        """The TensorBoard writer of rank 0 (train.tensorboard), else None."""
        if self._tb_writer is None and self.cfg.train.tensorboard and self.env.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self._tb_writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
        return self._tb_writer

    # -- the run -------------------------------------------------------------------------------------------------

    def run(self, plan: RunPlan) -> RunResult:
        """Resume if asked, train `plan.train_days` in order (the only day loop) for `train.passes` passes, choosing
        the pass to keep on `plan.valid_days` if given, then evaluate `plan.eval_days`. After each day (and after a
        resume from a day-end checkpoint) the plan's `day_end` callbacks run.

        Holds the run directory's lock throughout (pipeline/train/run_lock.py). SIGTERM / SIGINT stop it after the
        current step with a checkpoint (`RunResult.stopped`); a second signal stops the process at once.
        """
        result = RunResult([], {}, None, None)
        with hold_run_dir(self.out_dir, self.env, self.checkpointer.root), GracefulStop(self.env.comm) as self._stop:
            try:
                if self.env.is_main:
                    save_resolved(self.cfg, self.out_dir)
                result.resumed_from = self.resume(plan.resume, trust=plan.trust_checkpoint,
                                                  warm_start=plan.warm_start)
                if result.resumed_from is not None and self.progress.day is None and self.progress.days_done:
                    self._end_day(plan, None, None)  # its day's end work may have been cut short by the stop
                self._train(plan, result)
                if result.best is not None and result.best["step"] != self.global_step:
                    self._load_best(result.best)
                for unit in plan.eval_days:
                    self._stop_if_asked()
                    result.metrics[unit.label] = self.evaluate(unit)
                self._stop_if_asked()  # a signal during the last day's wait (the stream) or evaluation
            except RunStopped as stop:
                result.checkpoint, result.stopped = stop.checkpoint, stop.signal
                return result
            finally:
                self._stop = None
        result.checkpoint = self.checkpointer.latest()
        return result

    def _train(self, plan: RunPlan, result: RunResult) -> None:
        """The passes over the plan's training days (one, for an open-ended stream), each unit once per pass."""
        t, p = self.cfg.train, self.progress
        units = self._units(plan)
        bounded = isinstance(units, list)
        if not bounded and (t.passes > 1 or plan.valid_days is not None):
            raise ValueError("train.passes > 1 and validation days need a bounded list of days (hyrank train)")
        if bounded:
            self.plan_lr(units)
        while True:
            order = pass_order(units, p.pass_index, seed=self.cfg.seed,
                               shuffle=self.cfg.data.shuffle and t.passes > 1) if bounded else units
            for unit in order:
                if all(d in p.days_done for d in unit.days):
                    continue
                self._stop_if_asked()
                if plan.progressive and p.day != unit.label:  # (a resumed day was, before)
                    result.progressive[unit.label] = self.evaluate_progressive(unit)
                stats = self.train_day(unit)
                result.trained.append(stats)
                self._end_day(plan, unit, stats)
            if plan.valid_days is not None:
                result.valid, result.best = p.valid, self._validate_pass(plan.valid_days)
                late = passes_since_best(p.valid, self.cfg.checkpoint.best_metric)
                if t.patience and late >= t.patience and p.pass_index + 1 < t.passes:
                    result.early_stop = (f"stopped after pass {p.pass_index + 1} of {t.passes}: {late} pass(es) "
                                         f"without a better validation {self.cfg.checkpoint.best_metric} "
                                         f"(train.patience = {t.patience})")
                    if self.env.is_main:
                        log.info("%s", result.early_stop)
                    return
            if p.pass_index + 1 >= t.passes:
                return
            p.pass_index, p.days_done = p.pass_index + 1, []

    def _end_day(self, plan: RunPlan, unit: Days | None, stats: DayStats | None) -> None:
        """A day's end, after its checkpoint: the plan's callbacks, on every rank (the stream's export and report run
        on rank 0 while the others go on to their next collective)."""
        end = DayEnd(unit, stats, self.checkpointer.latest())
        for callback in plan.day_end:
            callback(end)

    def _units(self, plan: RunPlan):
        """The plan's training days as the units they are trained in: a list's small consecutive days merged into
        spans of train.min_unit_rows rows (every pass has the same units); an open-ended iterable as it comes."""
        if not isinstance(plan.train_days, list):
            return plan.train_days
        t = self.cfg.train
        min_rows = t.min_unit_rows or 16 * self.cfg.data.batch_size_per_rank * self.env.world_size
        units = group_days([d for unit in plan.train_days for d in unit.days_of()], min_rows)
        part_way = self.progress.day
        if part_way is not None and part_way not in {u.label for u in units} \
                and any(d in part_way.split("..") for u in units for d in u.days):
            raise ValueError(f"the checkpoint stopped part-way through {part_way}, which this run's days do not hold "
                             f"as one unit ({', '.join(u.label for u in units)}): resume with the --days and "
                             "train.min_unit_rows it was started with")
        return units

    def _validate_pass(self, valid: Days) -> dict:
        """Score the pass just finished on the validation span (its checkpoint first, so the pass can be kept);
        returns the best pass so far. A resumed run does not score a pass twice."""
        p, c = self.progress, self.cfg.checkpoint
        if not any(r["pass"] == p.pass_index for r in p.valid):
            latest = self.checkpointer.latest()
            if latest is None or latest.name != f"step-{self.global_step:09d}":
                latest = self._save()
            metrics = self.evaluate(valid, kind="valid")
            record = {"pass": p.pass_index, "step": self.global_step, "checkpoint": latest.name,
                      "days": valid.label, **metrics.to_dict()}
            p.valid.append(record)
            p.scores[latest.name] = record[c.best_metric]
            if self.env.is_main:
                write_json(self.out_dir / "metrics" / f"valid-pass-{p.pass_index + 1}.json", record)
                log.info("pass %d: validation %s %s on %s", p.pass_index + 1, c.best_metric, record[c.best_metric],
                         valid.label)
        best = best_record(p.valid, c.best_metric)
        self.checkpointer.protected = best_checkpoints(p.scores, max(1, c.keep_best), c.best_metric)
        if self.env.is_main and best is not None:
            write_json(self.out_dir / "metrics" / "best.json",
                       {**best, "checkpoint": str(self.checkpointer.root / best["checkpoint"])})
        return best

    def _load_best(self, best: dict) -> None:
        """The kept pass's weights, to evaluate with (its checkpoint is protected from rotation)."""
        path = self.checkpointer.root / best["checkpoint"]
        self.checkpointer.load(path)
        if self.env.is_main:
            log.info("evaluating with the best pass (pass %d, %s): %s", best["pass"] + 1, path.name, path)

    def _stop_if_asked(self) -> None:
        """Between days or evaluations: if any rank got SIGTERM/SIGINT, checkpoint where the run stands and raise
        RunStopped (collective). Inside a day the reader's per-batch flags carry the same agreement."""
        if self._stop is not None and self._stop.agreed():
            self._stopped(mid_day=False)

    def _stopped(self, *, mid_day: bool) -> None:
        """The ranks agreed to stop: checkpoint (none mid-day under a pipeline that read ahead), record it in
        `stopped.json`, raise RunStopped."""
        if mid_day and self.cfg.train.pipeline != "plain":  # TrainPipelineSparseDist has read batches ahead: a
            checkpoint = self.checkpointer.latest()          # cursor here would skip them
            log.warning("%s during a day under train.pipeline = %r: no mid-day checkpoint (the pipeline reads "
                        "ahead); a resume redoes the day from %s", self._stop.name, self.cfg.train.pipeline,
                        checkpoint)
        else:
            latest = self.checkpointer.latest()
            saved = latest is not None and latest.name == f"step-{self.global_step:09d}"
            checkpoint = latest if saved else self._save()
        if self.env.is_main:
            write_json(self.out_dir / "stopped.json", {"signal": self._stop.name, "step": self.global_step,
                                                        "checkpoint": str(checkpoint) if checkpoint else None,
                                                        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            log.warning("stopped by %s at step %d; checkpoint %s", self._stop.name, self.global_step, checkpoint)
        raise RunStopped(self._stop.name, checkpoint)

    def _save(self) -> Path:
        """A checkpoint now; in the middle of a day it also carries the day's losses so far (all ranks' mean)."""
        if self.cursor.reader is not None:
            self.progress.day_losses = self._day_losses()
        return self.checkpointer.save(self.global_step)

    def resume(self, where: str | Path | None, *, trust: bool = False,
               warm_start: WarmStart | None = None) -> Path | None:
        """Load the checkpoint `where` names (see RunPlan.resume); returns its path, or None for a fresh run.
        `trust`: also a folder outside checkpoint.dir (loading a checkpoint runs pickle code found in it).
        `warm_start`: if that checkpoint is of another model, carry these weights (pipeline/train/resume.py)."""
        if where is None:
            return None
        target = checkpoint_to_resume(self.cfg, where) if warm_start else None
        if target is not None and (trust or self.checkpointer.inside(target)) and checkpoint_diff(self.cfg, target):
            resume_warm(self, target, warm_start)
            # the run's newest checkpoint is now of this model (same step: it replaces the one started from), so
            # later resumes need no warm start
            return self._save()
        if where in ("latest", "latest-if-any"):
            found = self.checkpointer.load_latest()  # falls back past checkpoints that fail to load, saying so
            if found is None:
                if where == "latest":
                    raise FileNotFoundError(f"--resume latest: no complete checkpoint under {self.checkpointer.root}")
                return None
            path = found[0]
        else:
            path = Path(where)
            self.checkpointer.load(path, trust=trust)
        p = self.progress
        c = self.cfg.checkpoint
        self.checkpointer.protected = best_checkpoints(p.scores, c.keep_best, c.best_metric) if c.keep_best else set()
        if self.env.is_main:
            log.info("resumed from %s: step %d, days done %s%s", path, p.global_step, p.days_done or "none",
                     f", day {p.day} part-way" if p.day else "")
        return path

    def plan_lr(self, units: list[Days]) -> None:
        """Fit the cosine LR curve to the steps the run's passes over these units will take (the pass in progress
        from what it has left, the day in progress from its cursor)."""
        if not self.schedule.needs_plan:
            return
        left = [u for u in units if not all(d in self.progress.days_done for d in u.days)]
        steps = sum(self._day_reader(u).num_remaining for u in left)
        later = self.cfg.train.passes - self.progress.pass_index - 1
        if later > 0:
            steps += later * sum(self._reader(u, self.cfg.train.max_steps_per_day).num_batches for u in units)
        self.schedule.plan(steps)

    def _day_reader(self, day: Days) -> DayReader:
        """A training reader of `day` in the pass in progress, at the cursor a loaded checkpoint holds for it."""
        reader = self._reader(day, self.cfg.train.max_steps_per_day)
        if self.progress.day == day.label and self.cursor.loaded is not None:
            reader.load_state_dict(self.cursor.loaded)
        return reader

    def _reader(self, day: Days, max_batches: int, *, training: bool = True) -> DayReader:
        """A reader of `day` on this rank; a training reader also agrees on a stop signal with every batch."""
        cfg = self.cfg
        seed = reader_seed(cfg.seed, self.progress.pass_index) if training else cfg.seed
        stop = self._stop
        return DayReader(day, cfg.features, batch_size=cfg.data.batch_size_per_rank, rank=self.env.rank,
                         world_size=self.env.world_size, max_batches=max_batches, seed=seed,
                         options=cfg.data, sequence_feed=self.sequence_feed,
                         quarantine_dir=cfg.data.quarantine_dir or self.out_dir / "quarantine", comm=self.env.comm,
                         should_stop=(lambda: stop.requested) if training and stop is not None else None)

    # -- one day -------------------------------------------------------------------------------------------------

    def train_day(self, day: Days) -> DayStats:
        """One pass over the day's rows (or `train.max_steps_per_day` steps), flushed at the end; a day a loaded
        checkpoint stopped in continues from its cursor if its files are the versions the day started with (the
        ledger's fingerprints). Checkpoints every `checkpoint.every_steps` steps and at the end of the day."""
        reader = self._day_reader(day)
        resumed = self.progress.day == day.label and self.cursor.loaded is not None
        self.ledger.begin_day(day.label, self.global_step + 1, reader.fingerprints, resumed=resumed)  # or raises
        self._earlier_losses = list(self.progress.day_losses) if resumed else []  # before a mid-day checkpoint
        self.cursor.loaded = None
        self.schedule.plan(reader.num_remaining)  # no-op inside a curve planned over several days
        every = self.cfg.checkpoint.every_steps
        rows_per_step = self.cfg.data.batch_size_per_rank * self.env.world_size
        num_steps, rows_before = reader.num_remaining, reader.rows_done
        self.progress.day, self.cursor.reader = day.label, reader
        self.model.train()
        start = time.perf_counter()
        self._losses: list[torch.Tensor] = []
        losses, step_seconds = self._losses, []
        bar = progress(num_steps * rows_per_step, f"train {day.label}", "row") if self.show_progress else None
        batches = InputClock(reader)
        for step, (loss, seconds) in enumerate(self.steps(batches)):
            losses.append(loss)
            step_seconds.append(seconds)
            self.ledger.add(day.label, self.global_step, reader.pop_consumed())
            if bar is not None:
                bar.update(rows_per_step)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % self.cfg.train.log_every_steps == 0:
                self._log_train(day, step, num_steps, losses, start)
            if reader.num_remaining > 0 and every and self.global_step % every == 0:
                self._save()
        if bar is not None:
            bar.close()
        if reader.stopped:  # the ranks agreed on a signal before the next batch (the reader's step flags)
            self._stop.take_agreed()
            self._stopped(mid_day=True)
        self.dense.flush()
        mean_losses = self._day_losses()
        rows, session_rows = self.env.comm.sum_ints([reader.rows_done, reader.rows_done - rows_before])
        self.progress.days_done.extend(day.days)
        self.progress.day, self.progress.day_losses, self.cursor.reader = None, [], None
        seconds = time.perf_counter() - start
        stats = DayStats(day.label, len(mean_losses), rows, seconds, mean_losses, step_seconds,
                         bad_rows=dict(reader.validation.bad), rows_per_s=session_rows / max(seconds, 1e-9),
                         pass_index=self.progress.pass_index, input_wait_s=batches.wait_s,
                         agree_wait_s=reader.agree_wait_s, managed=managed_stats(self.model, self.env.comm))
        if self.env.is_main:
            passes = f"pass-{self.progress.pass_index + 1}-" if self.cfg.train.passes > 1 else ""
            write_json(self.out_dir / "train" / f"{passes}day-{day.label}.json", stats.to_dict())
            log.info("train %s: %d steps, %d rows, mean loss %.4f, %.0f rows/s, input wait %.1f%% (rank 0; loader "
                     "%.1f%%, the rest waiting for the other ranks)", stats.day, stats.steps, stats.rows,
                     stats.mean_loss, stats.rows_per_s, 100 * stats.input_wait_share, 100 * stats.loader_wait_share)
            if stats.managed:
                log.info("train %s, managed tables: %s", stats.day, describe_stats(stats.managed))
        if self.cfg.checkpoint.at_day_end:
            self._save()
        return stats

    def _day_losses(self) -> list[float]:
        """The day's per-step losses so far, averaged over ranks, including those before a mid-day resume."""
        return self._earlier_losses + (self.env.comm.mean_floats(torch.stack(self._losses)) if self._losses else [])

    def steps(self, batches: InputClock) -> Iterator[tuple[torch.Tensor, float]]:
        """Yield each step's loss and wall time: plain loop, or TorchRec's TrainPipelineSparseDist (train.pipeline,
        whose step also copies the next batch). The plain loop's step time excludes the wait for the batch, which
        `batches.wait_s` counts; the pipeline's includes it."""
        if self.cfg.train.pipeline == "plain":
            for batch in batches:
                start = time.perf_counter()
                loss = self.train_step(batch.to(self.env.device, non_blocking=True))
                yield loss, time.perf_counter() - start
            return
        yield from pipelined_steps(self, batches)

    def train_step(self, batch) -> torch.Tensor:
        """One step on one batch (already on the device); returns the detached loss."""
        self._before_forward()
        try:
            loss, _ = self.model(batch)
            self.optimizer.zero_grad()
            loss.backward()  # sparse tables are updated in here (fused optimizers)
        finally:  # the real weights back even if the step fails
            self.dense.restore_weights()
        self._after_backward()
        return loss.detach()

    def _before_forward(self) -> None:
        self.dense.before_forward(self.global_step)

    def _after_backward(self) -> None:
        self.dense.after_backward()
        self.progress.global_step += 1

    def dense_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The DDP part's parameters by name: what DDP reduces (DMP's own split: every parameter that is not in a
        sharded module)."""
        inner = self.model.module
        sharded = set(DistributedModelParallel._sharded_parameter_names(inner))
        return [(n, p) for n, p in inner.named_parameters() if n not in sharded]

    def _log_train(self, day, step, num_steps, losses, start) -> None:
        if not self.env.is_main:
            return
        recent = torch.stack(losses[-self.cfg.train.log_every_steps:]).mean().item()
        rows_s = (step + 1) * self.cfg.data.batch_size_per_rank * self.env.world_size / (time.perf_counter() - start)
        if not self.show_progress:
            log.info("%s step %d/%d loss %.4f (rank 0, last %d steps) %.0f rows/s", day.label, step + 1, num_steps,
                     recent, self.cfg.train.log_every_steps, rows_s)
        if self._tb is not None:
            self._tb.add_scalar("train/loss", recent, self.global_step)
            self._tb.add_scalar("train/rows_per_s", rows_s, self.global_step)
            self._tb.add_scalar("train/lr", self.schedule.optimizer.param_groups[0]["lr"], self.global_step)

    # -- evaluation ----------------------------------------------------------------------------------------------

    def evaluate_progressive(self, day: Days) -> EvalMetrics | None:
        """The current model's metrics on `day` before it trains on it (`metrics/progressive-<day>.json`); None on
        the first day of a fresh run, which has no model to evaluate (no metric is invented)."""
        if self.global_step == 0:
            metrics, note = None, "no model yet: the first day of a fresh run is trained, not evaluated"
        else:
            metrics, note = self.evaluate(day, kind="progressive"), f"the model of step {self.global_step}"
            latest, c = self.checkpointer.latest(), self.cfg.checkpoint
            if c.keep_best and latest is not None and latest.name == f"step-{self.global_step:09d}":
                self.progress.scores[latest.name] = getattr(metrics, c.best_metric)  # how the checkpoint did
                self.checkpointer.protected = best_checkpoints(self.progress.scores, c.keep_best, c.best_metric)
        if self.env.is_main:
            write_json(self.out_dir / "metrics" / f"progressive-{day.label}.json",
                       {"day": day.label, "model_step": self.global_step, "note": note,
                        "metrics": metrics.to_dict() if metrics is not None else None})
        return metrics

    @torch.no_grad()
    def evaluate(self, day: Days, *, kind: str = "eval") -> EvalMetrics:
        """Exact metrics over the whole day or span of days as one set (or `train.eval_max_batches`), identical on
        every rank; query-level AUC groups by the group column's value across the span's days.

        See pipeline.train.evaluate.metrics_over_ranks for where the predictions go and what that costs.
        """
        self.dense.flush()
        reader = self._reader(day, self.cfg.train.eval_max_batches, training=False)
        bar = progress(len(reader), f"{kind} {day.label}", "batch") if self.show_progress else None
        s = score_day(self.model, reader, device=self.env.device, bar=bar)
        if bar is not None:
            bar.close()
        groups = s.groups if self.cfg.features.group is not None else None  # no group column: no query-AUC
        metrics = metrics_over_ranks(self.env.comm, s.logits, s.labels, groups, s.oracle)
        if self.env.is_main:
            if kind == "eval":
                write_json(self.out_dir / "metrics" / f"eval-{day.label}.json", metrics.to_dict())
            if self._tb is not None:
                for name, value in metrics.to_dict().items():
                    if isinstance(value, float):
                        self._tb.add_scalar(f"{kind}/{name}", value, self.global_step)
        return metrics

    def close(self) -> None:
        if self._tb_writer is not None:
            self._tb_writer.close()

