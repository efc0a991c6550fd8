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

Boundaries (evaluation, checkpoint, end of a day or of training) call `flush`: it waits for the in-flight
reductions, writes them into `.grad` and steps the dense optimizer once, so every gradient is applied exactly
once and nothing is in flight. A checkpoint taken after a flush has no pending state; `state_dict` refuses to
save while gradients are in flight rather than silently dropping them.
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
    # reductions launched during the current step, and reduced gradients of the previous step not yet used
    _launched: list[_InFlight] = field(default_factory=list)
    _launched_ids: set[int] = field(default_factory=set)
    _previous: list[_InFlight] = field(default_factory=list)
    _stale: dict[int, torch.Tensor] = field(default_factory=dict)
    _missing: int = 0  # buckets of this step that found no stale gradient (start, or after a flush)
    steps: int = 0

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

    def flush(self, dense_optimizer: torch.optim.Optimizer | None) -> bool:
        """Apply the gradients still in flight with one dense step; returns whether a step was taken."""
        self._rotate()
        self._resolve_previous()
        if not self._stale:
            return False
        params = [p for group in (dense_optimizer.param_groups if dense_optimizer else []) for p in group["params"]]
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

    def state_dict(self) -> dict:
        if self.in_flight:
            raise RuntimeError("async allreduce has gradients in flight: call flush() before checkpointing")
        return {"compression": self.compression}

    def load_state_dict(self, state: dict) -> None:
        self.compression = state.get("compression", self.compression)


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
    """The DDP wrapper for `train.allreduce`: plain DDP for "sync", the stale hook for "async"."""
    if mode == "sync":
        precision = "bf16" if compression == "bf16" else None
        return DefaultDataParallelWrapper(allreduce_comm_precision=precision), None
    state = StaleAllReduce(compression=compression)
    return HookedDataParallelWrapper(state), state
