"""Stop a distributed run cleanly on SIGTERM / SIGINT (a preemption, a Ctrl-C): finish the step, agree on it,
checkpoint, exit 0. A second signal stops at once.

    with GracefulStop() as stop:          # all ranks, in the main thread
        for batch in reader:
            step(batch)
            if stop.agreed():             # collective: every rank leaves after the same step
                save(); break

A signal may reach the ranks at different steps (torchelastic forwards the launcher's to every worker, a
scheduler signals every pod), so the ranks OR their flags after each step with one tiny allreduce on a gloo group
of their own (a CPU tensor works under NCCL too).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """While entered: the first SIGTERM/SIGINT is recorded (`requested`), a second one stops the process at once."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, object] = {}
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() and dist.get_world_size() > 1 else None

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None:  # the second one: the default action, now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal = signum
        log.warning("%s received: stopping after this step with a checkpoint (send it again to stop at once)",
                    signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (collective: call it at the same point on every rank)."""
        if self._group is None:
            return self.requested
        flag = torch.tensor([int(self.requested)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and self.signal is None:
            self.signal = int(signal.SIGTERM)  # another rank's: stop with it (the name is only for messages)
        return bool(flag.item())

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""
