"""The dense half of a training step behind one object: how the gradient is reduced, and when and how the dense
optimizer steps. Plain torch (no torchrec): `hyrank bench overlap` drives it on a GPU box with torch alone.

    dense = DenseSync(dense_optimizer, named_params, hook=state, mode="async", sync_steps=100,
                      grad_clip_norm=1.0, on_step=schedule.step)
    dense.before_forward(global_step)     # sync-first-steps policy; weight prediction shifts the weights
    loss.backward()                       # DDP reduces (through `state`'s hook when async)
    dense.after_backward()                # the real weights back; clip + dense step if a gradient is ready
    dense.flush()                         # at a boundary: apply the gradient still in flight, once
    dense.state_dict()                    # the pending gradient, for checkpoints (Stateful)

`mode`: "sync" (plain DDP, no hook: every step steps), "async" (the one-step-stale hook of comm_hooks.py: the first
`sync_steps` model steps reduce synchronously, then one step stale) and "hook_sync" (tests: the hook at staleness
0, which must equal plain DDP). Everything about the call order of the hook (StaleAllReduce: shift/restore weights,
begin/end update, flush, staleness) lives here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import nn

from hyrank.pipeline.distributed.comm_hooks import StaleAllReduce

Mode = Literal["sync", "async", "hook_sync"]


class DenseSync:
    """Reduce-and-step policy of the data-parallel (dense) parameters; a Stateful part of every checkpoint."""

    def __init__(self, optimizer: torch.optim.Optimizer, named_params: Iterable[tuple[str, nn.Parameter]], *,
                 hook: StaleAllReduce | None, mode: Mode, sync_steps: int = 0, grad_clip_norm: float = 0.0,
                 on_step: Callable[[], None] | None = None):
        if (hook is None) != (mode == "sync"):
            raise ValueError(f"mode {mode!r} {'needs' if hook is None else 'takes no'} StaleAllReduce hook")
        self.optimizer, self.hook, self.mode = optimizer, hook, mode
        self.sync_steps, self.grad_clip_norm, self.on_step = sync_steps, grad_clip_norm, on_step
        self.named = dict(named_params)  # what DDP reduces; the optimizer may also hold data-parallel tables
        if hook is not None:
            hook.bind(self.named.items())

    # -- one step ------------------------------------------------------------------------------------------------

    def before_forward(self, global_step: int) -> None:
        """Before a step's forward: pick this step's staleness, and move to the predicted weights if configured."""
        if self.hook is None:
            return
        if self.mode == "async":
            staleness = int(global_step >= self.sync_steps)
            if staleness == 0 and self.hook.in_flight:  # a resumed run whose sync_steps was raised
                self.flush()
            self.hook.staleness = staleness
        self.hook.shift_weights()

    def restore_weights(self) -> None:
        """The real weights back under a weight prediction (also when a step fails part-way); else a no-op."""
        if self.hook is not None:
            self.hook.restore_weights()

    def after_backward(self) -> bool:
        """After a step's backward: the dense optimizer steps if a reduced gradient is ready; returns whether."""
        self.restore_weights()
        if self.hook is not None and not self.hook.ready:  # async: the first step after a flush has none
            return False
        self.optimizer_step()
        return True

    def optimizer_step(self) -> None:
        """Clip, step the dense optimizer on the gradients in `.grad`, advance the schedule (`on_step`)."""
        if self.grad_clip_norm > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
        if self.hook is not None:
            self.hook.begin_update()
        self.optimizer.step()
        if self.hook is not None:
            self.hook.end_update()
        if self.on_step is not None:
            self.on_step()

    # -- boundaries ----------------------------------------------------------------------------------------------

    @property
    def in_flight(self) -> bool:
        """A reduced gradient is waiting to be applied (async only)."""
        return self.hook is not None and self.hook.in_flight

    def flush(self) -> bool:
        """Apply the dense gradient still in flight (async), so none is lost or doubled; returns whether one was."""
        if self.hook is None or not self.hook.flush():
            return False
        self._step_on_pending()
        return True

    def _step_on_pending(self) -> None:
        """One dense step on the pending gradient just written into `.grad` of the reduced parameters. Other
        parameters of the optimizer (data-parallel tables, reduced at once outside the hook) get no second step."""
        bound = {id(p) for p in self.named.values()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in bound:
                    p.grad = None
        self.optimizer_step()

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The pending gradients by parameter name (comm_hooks.StaleAllReduce.state_dict); none under sync."""
        if self.hook is None:
            return StaleAllReduce.pending_template(self.named.items())
        return self.hook.state_dict()

    def load_template(self, saved: set[str]) -> dict[str, Any] | None:
        """What to load from a checkpoint whose keys under this part are `saved`; None: nothing to load.

        A checkpoint of a sync run holds nothing pending. State the run has but the checkpoint lacks
        (compensation / prediction turned on since) starts fresh: comm_hooks' load_state_dict takes the subset.
        """
        if not saved:
            return None
        template = self.state_dict()
        return {k: v for k, v in template.items() if any(s == k or s.startswith(k + ".") for s in saved)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Hold a checkpoint's pending gradient for the next step; a sync run applies it now, once."""
        if self.hook is not None:
            self.hook.load_state_dict(state)
            return
        if not bool(state["has_pending"].any()):
            return
        for flag, name in zip(state["has_pending"].tolist(), sorted(self.named)):
            p = self.named[name]
            p.grad = state["pending"][name].clone() if flag else torch.zeros_like(p)
        self._step_on_pending()
