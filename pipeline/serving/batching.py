"""Micro-batching for the scoring server: one asyncio queue feeding one model thread.

    batcher = MicroBatcher(lambda: slot.artifact, max_batch_rows=512, max_wait_ms=2)
    await batcher.start()                           # in the server's event loop
    outcome = await batcher.submit(rows)            # -> Outcome(probabilities, version) or Outcome(problems=[...])
    await batcher.close()                           # after the last request: stops the loop and the model thread

Requests wait in the queue; the batcher takes the oldest and keeps adding whole requests until the batch holds
`max_batch_rows` rows or the oldest has waited `max_wait_ms`, then hands the batch to the model thread and, while
that thread scores it, gathers the next one (so under load the wait costs nothing: batches fill while the model
works). Every model call happens on that one thread: an exported program called from many threads has deadlocked
in other stacks, and one thread keeps the CPU threads of torch for the model.

In the model thread, a batch is scored against one artifact (read once per batch: a hot reload swaps between
batches, never inside one). The batch's rows are checked first (the artifact's Arrow conversion, then the
training reader's row validation: one pass over the whole batch, each problem given to its own request in that
request's row numbers), so a bad row fails its own request with the row and field named, never the others of its
batch; the good requests' rows are scored in one program call, and each request gets its slice back. Should the batched call itself fail, every request of the batch is retried alone, so one
request the model cannot score takes down nobody else's.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from hyrank.pipeline.serving.artifact import Artifact, BadRows

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What one request gets back: probabilities and the version that scored them, or why not."""

    probabilities: list[float] | None = None
    version: str | None = None
    problems: list[str] = field(default_factory=list)  # the request's own fault (HTTP 400)
    error: str | None = None  # the server's fault (HTTP 500), or no model loaded (503)
    unavailable: bool = False


@dataclass
class _Pending:
    rows: list[Any]
    future: asyncio.Future
    received: float  # loop.time() when the request was queued


class Overloaded(RuntimeError):
    """More rows are queued than the batcher admits: the client should retry later (HTTP 503)."""


class MicroBatcher:
    """Requests in, one model thread, each request's slice out (see the module docstring)."""

    def __init__(self, current: Callable[[], Artifact | None], *, max_batch_rows: int = 512, max_wait_ms: float = 2.0,
                 max_queued_rows: int = 0, on_batch: Callable[[int, int], None] | None = None):
        """`current`: the artifact to score the next batch with (None: no model yet). `max_queued_rows`: beyond
        this many rows waiting, submit raises Overloaded (0: 64 batches). `on_batch(requests, rows)`: called in
        the event loop after each batch (metrics)."""
        if max_batch_rows < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch_rows must be >= 1 and max_wait_ms >= 0, got {max_batch_rows}, "
                             f"{max_wait_ms}")
        self.current, self.max_batch_rows, self.max_wait_s = current, max_batch_rows, max_wait_ms / 1000
        self.max_queued_rows = max_queued_rows or 64 * max_batch_rows
        self.on_batch = on_batch
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_rows = 0
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hyrank-model")

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    async def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="hyrank-batcher")

    async def submit(self, rows: list[Any]) -> Outcome:
        """Queue one request's rows and wait for its outcome."""
        if self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running")
        if self._queued_rows + len(rows) > self.max_queued_rows and self._queue:
            raise Overloaded(f"{self._queued_rows} rows are already waiting (limit {self.max_queued_rows})")
        loop = asyncio.get_running_loop()
        pending = _Pending(rows, loop.create_future(), loop.time())
        self._queue.append(pending)
        self._queued_rows += len(rows)
        self._arrived.set()
        return await pending.future

    async def close(self) -> None:
        """Score what is queued, then stop the batcher and the model thread (the server calls this once no
        request is left in flight, after uvicorn's graceful shutdown)."""
        while self._queue and self._task is not None and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._model_thread.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(loop)
            rows = sum(len(p.rows) for p in batch)
            try:
                outcomes = await loop.run_in_executor(self._model_thread, self._score_batch, [p.rows for p in batch])
            except Exception as e:  # noqa: BLE001 - _score_batch catches per request; this is a last resort
                log.exception("scoring a batch of %d requests failed", len(batch))
                outcomes = [Outcome(error=f"{type(e).__name__}: {e}") for _ in batch]
            for p, outcome in zip(batch, outcomes):
                if not p.future.done():  # a client that went away has its future cancelled
                    p.future.set_result(outcome)
            if self.on_batch is not None:
                self.on_batch(len(batch), rows)

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> list[_Pending]:
        """The oldest request and the whole requests after it that fit: until max_batch_rows, or until the oldest
        has waited max_wait_ms (counted from its arrival: a request that queued behind a busy model does not wait
        again). A request larger than max_batch_rows is a batch of its own."""
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        batch = [self._take()]
        rows = len(batch[0].rows)
        deadline = batch[0].received + self.max_wait_s
        while rows < self.max_batch_rows:
            if self._queue:
                if rows + len(self._queue[0].rows) > self.max_batch_rows:
                    break
                batch.append(self._take())
                rows += len(batch[-1].rows)
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return batch

    def _take(self) -> _Pending:
        pending = self._queue.popleft()
        self._queued_rows -= len(pending.rows)
        return pending

    def _score_batch(self, requests: list[list[Any]]) -> list[Outcome]:
        """In the model thread: one artifact for the whole batch, each request's problems its own, the good
        requests scored together."""
        artifact = self.current()
        if artifact is None:
            return [Outcome(error="no model is loaded yet", unavailable=True) for _ in requests]
        problems, table, good = check_requests(artifact, requests)
        outcomes = [Outcome(problems=p) for p in problems]
        if not good:
            return outcomes
        try:
            probs = artifact.score_table(table)
        except Exception:  # noqa: BLE001 - find the request the model cannot score: each alone
            log.exception("a batch of %d requests failed; scoring each alone", len(good))
            for i in good:
                try:
                    outcomes[i] = Outcome(artifact.score_table(artifact.table_of(requests[i])).tolist(), artifact.version)
                except Exception as e:  # noqa: BLE001
                    outcomes[i] = Outcome(error=f"{type(e).__name__}: {e}")
            return outcomes
        start = 0
        for i in good:
            n = len(requests[i])
            outcomes[i] = Outcome(probs[start:start + n].tolist(), artifact.version)
            start += n
        return outcomes


def check_requests(artifact: Artifact, requests: list[list[Any]]) -> tuple[list[list[str]], pa.Table | None,
                                                                             list[int]]:
    """Each request's rows checked as the training reader checks rows, the problems of each named in its own row
    numbers: (problems per request, one Arrow table of the good requests' rows in order, the good requests'
    indices). One conversion and one validation pass over the whole batch; a request whose rows do not convert
    (a missing, unknown or ill-typed field) is found by converting each request alone."""
    problems: list[list[str]] = [[] for _ in requests]
    try:
        tables = [artifact.table_of([row for rows in requests for row in rows])]
        converted = list(range(len(requests)))
    except BadRows:
        tables, converted = [], []
        for i, rows in enumerate(requests):
            try:
                tables.append(artifact.table_of(rows))
                converted.append(i)
            except BadRows as e:
                problems[i] = e.problems
    if not converted:
        return problems, None, []
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    bad = artifact.bad_rows(table)
    if not bad:
        return problems, table, converted
    starts = np.cumsum([0] + [len(requests[i]) for i in converted])
    keep = np.ones(table.num_rows, dtype=bool)
    for r, why in bad.items():
        k = int(np.searchsorted(starts, r, side="right")) - 1
        problems[converted[k]].append(f"row {r - starts[k]}: {why}")
    good = [i for i in converted if not problems[i]]
    for k, i in enumerate(converted):
        keep[starts[k]:starts[k + 1]] = not problems[i]
    return problems, table.filter(pa.array(keep)) if good else None, good
