"""Asynchronous (one-step-stale) AllReduce for the dense part, as in HyFormer section 3.8.2. Plain torch.distributed:
any DDP module takes the hook (`hyrank bench overlap` times it on a tower alone); TorchRec's seam is in dmp.py.

    state = StaleAllReduce(compression="bf16")
    ddp.register_comm_hook(state, stale_allreduce_hook)   # under DMP: HookedDataParallelWrapper(state) (dmp.py)
    dense = DenseSync(dense_optimizer, named_params, hook=state, mode="async")   # dense_sync.py: the call order
    ...
    loss.backward()                                       # launches allreduce(g_k), hands back g_{k-1}
    dense.after_backward()                                # W_k = W_{k-1} - lr * g_{k-1} if state.ready
    dense.flush()                                         # at a boundary: apply g_last, nothing in flight

This module is the mechanism; DenseSync (pipeline/distributed/dense_sync.py) is the only caller that knows the
order of its calls (staleness, shift/restore weights, begin/end update, flush).

Why one step stale: the allreduce of step k's dense gradients runs while step k+1 computes, so communication
leaves no bubble. Sparse tables are outside DDP (fused optimizers update them inside backward), so they stay
one step ahead of the dense weights, exactly as the paper describes.

Bookkeeping is per parameter, not per bucket: DDP with `static_graph=True` re-lays its buckets out after the
first iterations (new layouts appear at steps 1 and 2), so a bucket of step k need not match a bucket of step
k-1. Each launched reduction remembers which parameters it covers; the next step's hook assembles its bucket from
those per-parameter results, whatever the layout.

Boundaries that change what the model is used for (evaluation, end of a day or of training) call `flush`: it
waits for the in-flight reductions, writes them into `.grad` and steps the dense optimizer once, so every
gradient is applied exactly once and nothing is in flight.

Delay compensation (`compensation` > 0, DC-ASGD-a of Zheng et al., ICML 2017): a gradient handed back was
computed at the weights of one dense step earlier (W_then), and a first-order Taylor step moves it to the weights
it is applied to (W_now):
    g~ = g + lambda0 * g*g / sqrt(MS(g)) * (W_now - W_then),   MS an EMA (0.95) of g*g, per element,
with the diagonal outer-product approximation of the Hessian that DC-ASGD uses. Why: a one-step delay shrinks the
stable step size of a momentum optimizer far more than plain SGD's. On a quadratic of curvature h, the EMA momentum
Adam uses (beta1 = 0.9) is stable for lr*h < 38 with fresh gradients but only for lr*h < 1 with one-step-stale ones
(SGD: 2 vs 1), so a tower that trains near that edge (Adam at the edge of stability) loses quality when its
gradients go stale. Each launched reduction keeps the weights its gradient was computed at (one copy of the dense
parameters in flight), so the correction needs no help from the caller and also holds at a flush.

Weight prediction (`prediction` = s > 0, as SpecTrain/PipeMare do for pipeline-parallel delay): a step whose
gradient will be applied one dense step late runs its forward and backward at W + s * (the last dense update), a
guess of the weights that gradient will be applied to; DenseSync calls `shift_weights()` before the forward and
`restore_weights()` after the backward, and `begin_update()` / `end_update()` around each dense step. On the
quadratic above, s = 1 raises the stale limit from lr*h < 1 to < 2.7; unlike the compensation it needs no Hessian
guess. Both can be on: the compensation then corrects what the prediction missed. Memory: compensation keeps one
copy of the dense parameters per step in flight, prediction up to three (the last update, the unshifted weights,
the weights before a step).

A checkpoint does not flush: that would change the training trajectory. `state_dict()` waits for the reductions
in flight and returns them, by parameter name, as the pending gradients the next step will apply;
`load_state_dict()` puts them back, so a run resumed from a mid-day checkpoint takes exactly the steps the
uninterrupted run takes (tests/test_checkpoint.py). Names come from `bind(named_parameters)` (DenseSync binds).
"""

# No `from __future__ import annotations` here: DDP checks the hook's annotations as real objects.
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

Compression = Literal["none", "bf16"]


@dataclass
class _InFlight:
    work: dist.Work
    flat: torch.Tensor  # the (compressed) buffer being reduced, already divided by world size
    params: list[nn.Parameter]
    weights: list[torch.Tensor] | None = None  # the parameters' values when the gradient was computed (compensation)


@dataclass
class DelayCompensation:
    """DC-ASGD-a's correction of a stale gradient (see the module docstring); `strength` is lambda0."""

    strength: float
    decay: float = 0.95  # of the mean square MS(g)
    eps: float = 1e-7
    mean_square: dict[int, torch.Tensor] = field(default_factory=dict)  # by id(param)

    @torch.no_grad()
    def __call__(self, params: list[nn.Parameter], grads: list[torch.Tensor], computed_at: list[torch.Tensor],
                 applied_at: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each of `grads` (computed at `computed_at`) moved to `applied_at`, in place (`grads` and `computed_at` are
        overwritten); updates the parameters' mean squares. Multi-tensor (`torch._foreach_*`) ops: one dispatch per
        op for all parameters, not one per parameter."""
        for p, g in zip(params, grads):
            if id(p) not in self.mean_square:
                self.mean_square[id(p)] = g * g  # and g*g stays g*g through the EMA step below
        ms = [self.mean_square[id(p)] for p in params]
        torch._foreach_mul_(ms, self.decay)
        torch._foreach_addcmul_(ms, grads, grads, value=1.0 - self.decay)
        # in place on the caller's buffers (the stale gradients and their weight copies are the hook's own):
        # g <- g - lambda0 * ((W_then - W_now) * g / (sqrt(MS) + eps)) * g, six passes and one new buffer
        torch._foreach_sub_(computed_at, applied_at)
        moved = computed_at  # now W_then - W_now
        torch._foreach_mul_(moved, grads)
        denom = torch._foreach_sqrt(ms)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_div_(moved, denom)
        torch._foreach_addcmul_(grads, moved, grads, value=-self.strength)
        return grads


@dataclass
class StaleAllReduce:
    """DDP comm-hook state for the one-step-stale allreduce."""

    compression: Compression = "none"
    process_group: dist.ProcessGroup | None = None
    # 1: hand back last step's gradient (async). 0: wait and hand back this step's, through the same per-parameter
    # bookkeeping: it must equal plain DDP, which is how the bookkeeping is tested on real models. May change
    # between steps (DenseSync's sync_steps: 0, then 1); going back to 0 needs a flush() first.
    staleness: int = 1
    compensation: float = 0.0  # lambda0 of the delay compensation; 0: the plain stale rule
    prediction: float = 0.0  # s of the weight prediction; 0: off
    # reductions launched during the current step, and reduced gradients of the previous step not yet used
    _launched: list[_InFlight] = field(default_factory=list)
    _launched_ids: set[int] = field(default_factory=set)
    _previous: list[_InFlight] = field(default_factory=list)
    _stale: dict[int, torch.Tensor] = field(default_factory=dict)
    _stale_at: dict[int, torch.Tensor] = field(default_factory=dict)  # weights each stale gradient was computed at
    _missing: int = 0  # buckets of this step that found no stale gradient (start, or after a flush)
    steps: int = 0
    _named: dict[str, nn.Parameter] = field(default_factory=dict)  # the DDP part's parameters, for checkpoints
    _dc: DelayCompensation | None = None
    _last_update: dict[int, torch.Tensor] = field(default_factory=dict)  # weight prediction: the last dense step
    _unshifted: dict[int, torch.Tensor] = field(default_factory=dict)  # the weights under a prediction
    _before_update: list[torch.Tensor] = field(default_factory=list)
    _restored: list[torch.Tensor] = field(default_factory=list)  # copies equal to the weights since restore_weights

    def __post_init__(self) -> None:
        if self.compensation < 0 or self.prediction < 0:
            raise ValueError(f"delay compensation and weight prediction must be >= 0, got {self.compensation} "
                             f"and {self.prediction}")
        self._dc = DelayCompensation(self.compensation) if self.compensation > 0 else None

    def bind(self, named_parameters) -> None:
        """The dense parameters by fully qualified name: the keys of `state_dict`."""
        self._named = dict(named_parameters)

    @property
    def ready(self) -> bool:
        """True when the gradients DDP just handed back are a real stale gradient (apply the dense step)."""
        return self.steps > 0 and self._missing == 0

    @property
    def in_flight(self) -> bool:
        return bool(self._launched or self._previous or self._stale)

    # -- weight prediction (DenseSync calls these around each step; no-ops when prediction = 0) -----------------

    @torch.no_grad()
    def shift_weights(self) -> None:
        """Before a forward: move the bound weights to W + s * (last update) if this step will take a dense step
        (a gradient is pending) and an update was recorded. `restore_weights` undoes it exactly (by a copy)."""
        self._restored = []  # valid only from a restore to the dense step of the same step
        if not self.prediction or not self._last_update or not self.in_flight:
            return
        params = list(self._named.values())
        self._unshifted = dict(zip(map(id, params), torch._foreach_mul(params, 1.0)))  # copies, one dispatch
        torch._foreach_add_(params, [self._last_update[id(p)] for p in params], alpha=self.prediction)

    @torch.no_grad()
    def restore_weights(self) -> None:
        if self._unshifted:
            params = list(self._named.values())
            self._restored = [self._unshifted[id(p)] for p in params]
            torch._foreach_copy_(params, self._restored)
            self._unshifted = {}

    @torch.no_grad()
    def begin_update(self) -> None:
        """Before a dense optimizer step: remember the weights, so `end_update` can record the step's update."""
        if self.prediction:  # right after a restore the unshifted copies are the weights: no second copy
            self._before_update = self._restored or list(torch._foreach_mul(list(self._named.values()), 1.0))
            self._restored = []

    @torch.no_grad()
    def end_update(self) -> None:
        if self.prediction:
            params = list(self._named.values())
            self._last_update = dict(zip(map(id, params), torch._foreach_sub(params, self._before_update)))
            self._before_update = []

    def hook(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        params = list(bucket.parameters())
        if self.staleness == 0 and (self._launched_ids or self._stale):
            # this step's reduction would overwrite the pending gradient of an earlier step: it would be lost
            raise RuntimeError("StaleAllReduce: staleness set to 0 while a stale gradient is pending; flush() first")
        if any(id(p) in self._launched_ids for p in params):
            self._rotate()  # the first bucket of a new step: last step's launches become this step's stale grads
        if not self._launched:
            self.steps += 1
            self._missing = 0
        self._launch(bucket.buffer(), params)
        if self.staleness == 0:
            self._rotate()
        self._resolve_previous()
        out = bucket.buffer().new_zeros(bucket.buffer().shape)
        offset = 0
        for p, stale in zip(params, self._take(params)):
            if stale is None:
                self._missing += 1
            else:
                out[offset:offset + p.numel()].copy_(stale.view(-1))
            offset += p.numel()
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(out)
        return fut

    def _launch(self, buffer: torch.Tensor, params: list[nn.Parameter]) -> None:
        world = dist.get_world_size(self.process_group)
        flat = buffer.to(torch.bfloat16) if self.compression == "bf16" else buffer.clone()
        flat.div_(world)
        work = dist.all_reduce(flat, group=self.process_group, async_op=True)
        weights = list(torch._foreach_mul([p.detach() for p in params], 1.0)) if self._dc is not None else None
        self._launched.append(_InFlight(work, flat, params, weights))
        self._launched_ids.update(id(p) for p in params)

    def _rotate(self) -> None:
        self._previous.extend(self._launched)
        self._launched, self._launched_ids = [], set()

    def _resolve_previous(self) -> None:
        """Wait for last step's reductions and split them into per-parameter gradients."""
        for item in self._previous:
            item.work.wait()
            flat = item.flat.float() if item.flat.dtype != torch.float32 else item.flat
            offset = 0
            for i, p in enumerate(item.params):
                self._stale[id(p)] = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
                if item.weights is not None:
                    self._stale_at[id(p)] = item.weights[i]
                offset += p.numel()
        self._previous = []

    def _take(self, params: list[nn.Parameter]) -> list[torch.Tensor | None]:
        """The stale gradients of `params` (None where nothing is pending), moved to the weights they are applied
        to if compensation is on."""
        stale = [self._stale.pop(id(p), None) for p in params]
        computed_at = [self._stale_at.pop(id(p), None) for p in params]
        if self._dc is None:
            return stale
        have = [i for i, g in enumerate(stale) if g is not None]
        if have:
            ps = [params[i] for i in have]
            applied_at = [self._unshifted.get(id(p), p.detach()) for p in ps]  # under a prediction: the real weights
            moved = self._dc(ps, [stale[i] for i in have], [computed_at[i] for i in have], applied_at)
            for i, g in zip(have, moved):
                stale[i] = g
        return stale

    def flush(self) -> bool:
        """Write the gradients still in flight into `.grad` of the bound parameters (`bind`); returns whether there
        was anything to apply, and the caller takes that one dense step (DenseSync, which also clips and advances
        the LR schedule). A bound parameter with nothing pending gets a zero gradient, never a leftover one."""
        self.settle()
        if not self._stale:
            return False
        if not self._named:
            raise RuntimeError("flush() needs bind(named_parameters) first")
        params = list(self._named.values())
        for p, stale in zip(params, self._take(params)):
            if stale is not None:
                p.grad = stale.clone() if p.grad is None else p.grad.copy_(stale)
            elif p.grad is not None:
                p.grad.zero_()
        self._stale.clear()
        self._stale_at.clear()
        self.steps = 0
        return True

    def settle(self) -> None:
        """Wait for the reductions in flight and hold them for the next step: nothing changes numerically."""
        self._rotate()
        self._resolve_previous()

    def state_dict(self) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
        """The pending gradients (reduced, not yet applied), by parameter name; the same on every rank.

        Every bound parameter has an entry (zeros where nothing is pending) and `has_pending` marks the real ones,
        so a checkpoint's layout does not depend on when it was taken (DCP loads into a template of that layout).
        With delay compensation, also the weights each pending gradient was computed at (`computed_at`) and the
        mean squares (`mean_square`, `has_mean_square`).
        """
        if not self._named:
            raise RuntimeError("StaleAllReduce.bind(named_parameters) was not called: pending gradients have no names")
        self.settle()
        names = sorted(self._named)
        pending, has = {}, torch.zeros(len(names), dtype=torch.int8)
        for i, name in enumerate(names):
            p = self._named[name]
            grad = self._stale.get(id(p))
            has[i] = grad is not None
            pending[name] = (grad if grad is not None else torch.zeros_like(p)).detach().clone()
        state = {"pending": pending, "has_pending": has}
        if self._dc is not None:
            ms = self._dc.mean_square
            state["computed_at"] = {n: _or_zeros(self._stale_at.get(id(self._named[n])), self._named[n]) for n in names}
            state["mean_square"] = {n: _or_zeros(ms.get(id(self._named[n])), self._named[n]) for n in names}
            state["has_mean_square"] = torch.tensor([id(self._named[n]) in ms for n in names], dtype=torch.int8)
        if self.prediction:
            state["last_update"] = {n: _or_zeros(self._last_update.get(id(self._named[n])), self._named[n])
                                    for n in names}
            state["has_last_update"] = torch.tensor([bool(self._last_update)], dtype=torch.int8)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Hold the checkpoint's pending gradients: the next step applies them, as the saved run would have."""
        names = sorted(self._named)
        has = state["has_pending"]
        if len(has) != len(names) or set(state["pending"]) != set(names):
            missing = sorted(set(names) - set(state["pending"]))
            extra = sorted(set(state["pending"]) - set(names))
            raise ValueError(f"checkpoint's pending gradients do not fit this model: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        if self.in_flight:
            raise RuntimeError("load_state_dict while gradients are in flight: load before the first step")
        self._restored = []
        for flag, name in zip(has.tolist(), names):
            if flag:
                p = self._named[name]
                self._stale[id(p)] = state["pending"][name].to(device=p.device, dtype=p.dtype)
                if self._dc is not None:  # a checkpoint without compensation state: computed at the weights loaded
                    at = state["computed_at"][name] if "computed_at" in state else p.detach()
                    self._stale_at[id(p)] = at.to(device=p.device, dtype=p.dtype).clone()
        if self._dc is not None and "mean_square" in state:
            for flag, name in zip(state["has_mean_square"].tolist(), names):
                if flag:
                    p = self._named[name]
                    self._dc.mean_square[id(p)] = state["mean_square"][name].to(device=p.device, dtype=p.dtype).clone()
        if self.prediction and "last_update" in state and bool(state["has_last_update"].any()):
            self._last_update = {id(self._named[n]): state["last_update"][n].to(self._named[n]).clone() for n in names}
        self.steps = 1 if self._stale else 0

    @staticmethod
    def pending_template(named_parameters) -> dict:
        """An empty `state_dict()` of this layout, for loading a checkpoint into a run without the hook."""
        named = dict(named_parameters)
        return {"pending": {n: torch.zeros_like(named[n]) for n in sorted(named)},
                "has_pending": torch.zeros(len(named), dtype=torch.int8)}


def _or_zeros(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return (t if t is not None else torch.zeros_like(like)).detach().clone()


def stale_allreduce_hook(state: StaleAllReduce, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The function DDP calls per bucket; the annotation must be exactly Future[torch.Tensor]."""
    return state.hook(bucket)
