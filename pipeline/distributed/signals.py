"""Stop a distributed run cleanly on SIGTERM / SIGINT (a preemption, a Ctrl-C): finish the step, agree on it,
checkpoint, exit 0. A second signal stops at once.

    with GracefulStop(env.comm) as stop:  # all ranks, in the main thread
        for batch in reader:              # the reader ORs `stop.requested` into its per-batch flags
            step(batch)
        if reader.stopped: stop.take_agreed(); save()
        if stop.agreed(): ...             # between days: collective, every rank leaves at the same point

A signal may reach the ranks at different steps (torchelastic forwards the launcher's to every worker, a
scheduler signals every pod), so the ranks OR their flags: inside a day in the reader's one per-batch all_reduce
(pipeline/data/reader.py), between days with `agreed()`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from hyrank.pipeline.distributed.collectives import Collectives

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """While entered: the first SIGTERM/SIGINT is recorded (`requested`), a second one stops the process at once."""

    def __init__(self, comm: Collectives):
        self.comm = comm
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

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
        return self.comm.any(self.requested) and self.take_agreed()

    def take_agreed(self) -> bool:
        """The ranks agreed to stop, here or in a reader's step flags: a rank that got no signal stops with the
        others (the name is only for messages)."""
        if self.signal is None:
            self.signal = int(signal.SIGTERM)
        return True

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""
