"""The dense LR schedule: a linear warm-up, then constant or a half cosine fitted to the steps of a run.

    schedule = LRSchedule(dense_optimizer, cfg.train)
    schedule.plan(num_steps)          # a new cosine curve over the next num_steps dense steps (kept if unfinished)
    schedule.step()                   # after each dense optimizer step
    schedule.state_dict()             # plain data: the step count and the curve's window (checkpoints)

It counts dense optimizer steps, not training steps: an async run's first step after a flush takes none.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hyrank.pipeline.config import TrainConfig


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


class LRSchedule:
    """train.lr_schedule over a dense optimizer; a Stateful part of every checkpoint."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig):
        self.cfg = cfg
        self.optimizer = optimizer
        self.window: tuple[int, int] | None = None  # (first, last) dense step of the cosine curve
        # a lambda, not the bound method: LambdaLR's state_dict would try to save a callable object's __dict__
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.factor(step))

    @property
    def num_steps(self) -> int:
        """Dense steps taken so far."""
        return self.scheduler.last_epoch

    def factor(self, step: int) -> float:
        c = self.cfg
        return lr_multiplier(step, warmup_steps=c.warmup_steps, min_ratio=c.lr_min_ratio,
                             window=self.window if c.lr_schedule == "cosine" else None)

    def plan(self, num_steps: int) -> None:
        """Fit the cosine curve to the next `num_steps` dense steps.

        A curve still unfinished (a resumed run) is kept, so the resumed run takes the LRs the uninterrupted one
        would have; once finished, the next plan starts a new curve from the current step.
        """
        if self.cfg.lr_schedule == "constant" or (self.window is not None and self.num_steps < self.window[1]):
            return
        self.window = (self.num_steps, self.num_steps + num_steps)
        self.apply()

    @property
    def needs_plan(self) -> bool:
        """Whether `plan` would start a new curve (callers skip counting the steps otherwise)."""
        return self.cfg.lr_schedule == "cosine" and (self.window is None or self.num_steps >= self.window[1])

    def step(self) -> None:
        self.scheduler.step()

    def apply(self) -> None:
        """Set the LR of the next dense step (after a new curve, or a checkpoint load)."""
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.factor(self.num_steps)

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "window": self.window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.window = tuple(state["window"]) if state["window"] else None
        self.apply()
