"""Asynchronous (one-step-stale) AllReduce for the dense part, as in HyFormer section 3.8.2.

    state = StaleAllReduce(compression="bf16")
    wrapper = HookedDataParallelWrapper(state)            # DMP(..., data_parallel_wrapper=wrapper)
    ...
    loss.backward()                                       # launches allreduce(g_k), hands back g_{k-1}
    if state.ready: dense_optimizer.step()                # W_k = W_{k-1} - lr * g_{k-1}
    state.flush(dense_optimizer)                          # at a boundary: apply g_last, nothing in flight

Why one step stale: the allreduce of step k's dense gradients runs while step k+1 computes, so communication
leaves no bubble. Sparse tables are outside DDP (fused optimizers update them inside backward), so they stay
one step ahead of the dense weights, exactly as the paper describes.

Bookkeeping is per parameter, not per bucket: DDP with `static_graph=True` re-lays its buckets out after the
first iterations (see ../shared/docs/torchrec-on-cpu.md, section 3), so a bucket of step k need not match a
bucket of step k-1. Each launched reduction remembers which parameters it covers; the next step's hook
assembles its bucket from those per-parameter results, whatever the layout.

Boundaries that change what the model is used for (evaluation, end of a day or of training) call `flush`: it
waits for the in-flight reductions, writes them into `.grad` and steps the dense optimizer once, so every
gradient is applied exactly once and nothing is in flight.

A checkpoint does not flush: that would change the training trajectory. `state_dict()` waits for the reductions
in flight and returns them, by parameter name, as the pending gradients the next step will apply;
`load_state_dict()` puts them back, so a run resumed from a mid-day checkpoint takes exactly the steps the
uninterrupted run takes (tests/test_checkpoint.py). Names come from `bind(named_parameters)`.
"""

# No `from __future__ import annotations` here: DDP checks the hook's annotations as real objects.
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper

Compression = Literal["none", "bf16"]


@dataclass
class _InFlight:
    work: dist.Work
    flat: torch.Tensor  # the (compressed) buffer being reduced, already divided by world size
    params: list[nn.Parameter]


@dataclass
class StaleAllReduce:
    """DDP comm-hook state for the one-step-stale allreduce."""

    compression: Compression = "none"
    process_group: dist.ProcessGroup | None = None
    # 1: hand back last step's gradient (async). 0: wait and hand back this step's, through the same per-parameter
    # bookkeeping: it must equal plain DDP, which is how the bookkeeping is tested on real models.
    staleness: int = 1
    # reductions launched during the current step, and reduced gradients of the previous step not yet used
    _launched: list[_InFlight] = field(default_factory=list)
    _launched_ids: set[int] = field(default_factory=set)
    _previous: list[_InFlight] = field(default_factory=list)
    _stale: dict[int, torch.Tensor] = field(default_factory=dict)
    _missing: int = 0  # buckets of this step that found no stale gradient (start, or after a flush)
    steps: int = 0
    _named: dict[str, nn.Parameter] = field(default_factory=dict)  # the DDP part's parameters, for checkpoints

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

    def hook(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        params = list(bucket.parameters())
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
        for p in params:
            stale = self._stale.pop(id(p), None)
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
        self._launched.append(_InFlight(work, flat, params))
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
            for p in item.params:
                self._stale[id(p)] = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
                offset += p.numel()
        self._previous = []

    def flush(self, dense_optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Write the gradients still in flight into `.grad` and, given an optimizer, take that one dense step.

        Returns whether there was anything to apply; with no optimizer the caller steps (the Trainer, which
        also clips and advances its LR schedule). The parameters written are the bound ones (`bind`), else the
        optimizer's; a bound parameter with nothing pending gets a zero gradient, never a leftover one.
        """
        self.settle()
        if not self._stale:
            return False
        if self._named:
            params = list(self._named.values())
        elif dense_optimizer is not None:
            params = [p for group in dense_optimizer.param_groups for p in group["params"]]
        else:
            raise RuntimeError("flush() without an optimizer needs bind(named_parameters) first")
        for p in params:
            stale = self._stale.get(id(p))
            if stale is not None:
                p.grad = stale.clone() if p.grad is None else p.grad.copy_(stale)
            elif p.grad is not None:
                p.grad.zero_()
        if dense_optimizer is not None:
            dense_optimizer.step()
        self._stale.clear()
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
        return {"pending": pending, "has_pending": has}

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
        for flag, name in zip(has.tolist(), names):
            if flag:
                p = self._named[name]
                self._stale[id(p)] = state["pending"][name].to(device=p.device, dtype=p.dtype)
        self.steps = 1 if self._stale else 0

    @staticmethod
    def pending_template(named_parameters) -> dict:
        """An empty `state_dict()` of this layout, for loading a checkpoint into a run without the hook."""
        named = dict(named_parameters)
        return {"pending": {n: torch.zeros_like(named[n]) for n in sorted(named)},
                "has_pending": torch.zeros(len(named), dtype=torch.int8)}


def stale_allreduce_hook(state: StaleAllReduce, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The function DDP calls per bucket; the annotation must be exactly Future[torch.Tensor]."""
    return state.hook(bucket)


class HookedDataParallelWrapper(DefaultDataParallelWrapper):
    """DMP's DDP wrapper with the stale-allreduce hook registered before the first forward."""

    def __init__(self, state: StaleAllReduce, **kwargs):
        super().__init__(**kwargs)
        self.state = state

    def wrap(self, dmp, env, device) -> None:
        super().wrap(dmp, env, device)
        ddp = dmp._dmp_wrapped_module
        if isinstance(ddp, nn.parallel.DistributedDataParallel):
            self.state.process_group = env.process_group
            ddp.register_comm_hook(self.state, stale_allreduce_hook)


def make_data_parallel_wrapper(mode: str, compression: Compression = "none") -> tuple[DefaultDataParallelWrapper, StaleAllReduce | None]:
    """The DDP wrapper for `train.allreduce`: plain DDP for "sync", the stale hook for "async".

    "hook_sync" (tests only) runs the hook with staleness 0: the hook's machinery with plain DDP's arithmetic.
    """
    if mode == "sync":
        precision = "bf16" if compression == "bf16" else None
        return DefaultDataParallelWrapper(allreduce_comm_precision=precision), None
    state = StaleAllReduce(compression=compression, staleness=0 if mode == "hook_sync" else 1)
    return HookedDataParallelWrapper(state), state
