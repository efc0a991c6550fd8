"""Every collective the pipeline runs besides DMP's and DDP's own, behind one object: nothing outside
pipeline/distributed/ calls torch.distributed (tests/test_layering.py checks it).

    comm = env.comm                                   # made once per process group by init_distributed
    flags = comm.step_flags(failed=False, real=True, stop=stop.requested)   # the reader's one collective per step
    total = comm.sum_ints([rows, bad])                # identical on every rank
    decision = comm.broadcast_object(decision)        # rank 0's answer to every rank

Control traffic (flags, counts, small objects) goes over gloo: the default group when it is gloo, else a gloo side
group made once here, so a flag never costs a device sync under NCCL. Tensor data (a day's predictions for the
metrics) goes over the default group, on the device it is on. In a world of one every method is local: no process
group is needed (a plain `python` process, the readers of a unit test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class StepFlags:
    """What the ranks agreed before a batch: any rank failed, any rank has a real row, any rank was signalled."""
    failed: bool
    real: bool
    stop: bool


class Collectives:
    """The ranks of one process group, and the collectives the pipeline needs over them."""

    def __init__(self, rank: int, world_size: int, control_group: Any = None):
        self.rank, self.world_size, self._control = rank, world_size, control_group

    @classmethod
    def of_world(cls) -> Collectives:
        """The default process group's ranks (collective under NCCL: every rank makes the gloo side group); a world
        of one when there is no process group."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls(0, 1)
        control = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return cls(dist.get_rank(), dist.get_world_size(), control)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # -- control: flags, counts, small objects (gloo, CPU) -------------------------------------------------------

    def step_flags(self, *, failed: bool, real: bool, stop: bool = False) -> StepFlags:
        """OR of each flag over the ranks, in one all_reduce: the per-batch agreement of a day's readers."""
        if not self.distributed:
            return StepFlags(failed, real, stop)
        flags = torch.tensor([int(failed), int(real), int(stop)], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._control)
        return StepFlags(*(bool(v) for v in flags.tolist()))

    def any(self, flag: bool) -> bool:
        return self.step_flags(failed=False, real=False, stop=flag).stop

    def sum_ints(self, values: list[int]) -> list[int]:
        """Element-wise sums over the ranks, identical on every rank."""
        if not self.distributed:
            return list(values)
        total = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(total, group=self._control)
        return total.tolist()

    def mean_floats(self, values: torch.Tensor) -> list[float]:
        """Element-wise means over the ranks of a 1-D tensor (a day's per-step losses)."""
        values = values.detach().float().cpu().clone()
        if self.distributed:
            dist.all_reduce(values, group=self._control)
            values /= self.world_size
        return values.tolist()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._control)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (the others pass anything)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self._control)

    # -- data: tensors on their device (default group) -----------------------------------------------------------

    def gather_to_main(self, t: torch.Tensor) -> np.ndarray | None:
        """Concatenate a 1-D tensor of any length per rank on rank 0 (None elsewhere)."""
        if not self.distributed:
            return t.detach().cpu().numpy()
        t = t.contiguous().cpu() if dist.get_backend() == "gloo" else t.contiguous()
        sizes = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([t.numel()], device=t.device))
        longest = int(max(s.item() for s in sizes))
        padded = torch.cat([t, t.new_zeros(longest - t.numel())])
        out = [torch.empty_like(padded) for _ in sizes] if self.is_main else None
        dist.gather(padded, out, dst=0)
        if out is None:
            return None
        return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)]).cpu().numpy()
