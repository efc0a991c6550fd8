"""Micro-batching for the scoring server: one asyncio queue feeding one model thread.

    batcher = MicroBatcher(lambda: slot.model, max_batch_rows=512, max_wait_ms=2)
    await batcher.start()                           # in the server's event loop
    outcome = await batcher.submit(table, rows)     # a request decoded by RowSchema `rows` (pipeline/serving/rows.py)
                                                    # -> Outcome(probabilities, version) or Outcome(problems=[...])
    await batcher.close()                           # after the last request: stops the loop and the model thread

Requests wait in the queue; the batcher takes the oldest and keeps adding whole requests until the batch holds
`max_batch_rows` rows or the oldest has waited `max_wait_ms`, then hands the batch to the model thread and, while
that thread has it scored, gathers the next one (so under load the wait costs nothing: batches fill while the model
works). The model thread hands each batch to the model (pipeline/serving/worker.py: a model process, or an artifact
in this process) and waits for its outcomes, so one batch at a time reaches the model.

The model is read once per batch (a hot reload swaps between batches, never inside one); it validates the batch's
rows in one pass, gives each problem to its own request in that request's row numbers, and scores the good
requests in one program call (worker.score_requests). Requests arrive decoded into tables of the training types
by the RowSchema of the model serving when they came; one decoded for another schema than the model's (a reload
to a version whose feature spec differs swapped in while it waited) gets a 503 to retry, never a wrong score.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa

from hyrank.pipeline.serving.rows import RowSchema
from hyrank.pipeline.serving.worker import ModelGone, ModelRetired, Outcome

log = logging.getLogger(__name__)


class Model(Protocol):
    """What the batcher scores with: worker.ModelProcess, or worker.LocalModel."""

    rows: RowSchema
    version: str

    def score(self, tables: list[pa.Table]) -> list[Outcome]: ...


@dataclass
class _Pending:
    table: pa.Table
    rows: RowSchema  # the one it was decoded by
    future: asyncio.Future
    received: float  # loop.time() when the request was queued

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


class Overloaded(RuntimeError):
    """More rows are queued than the batcher admits: the client should retry later (HTTP 503)."""


class MicroBatcher:
    """Requests in, one model thread, each request's slice out (see the module docstring)."""

    def __init__(self, current: Callable[[], Model | None], *, max_batch_rows: int = 512, max_wait_ms: float = 2.0,
                 max_queued_rows: int = 0, on_batch: Callable[[int, int], None] | None = None):
        """`current`: the model to score the next batch with (None: no model yet). `max_queued_rows`: beyond
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

    async def submit(self, table: pa.Table, rows: RowSchema) -> Outcome:
        """Queue one request (its table, decoded by `rows`) and wait for its outcome."""
        if self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running")
        if self._queued_rows + table.num_rows > self.max_queued_rows and self._queue:
            raise Overloaded(f"{self._queued_rows} rows are already waiting (limit {self.max_queued_rows})")
        loop = asyncio.get_running_loop()
        pending = _Pending(table, rows, loop.create_future(), loop.time())
        self._queue.append(pending)
        self._queued_rows += table.num_rows
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
            rows = sum(p.num_rows for p in batch)
            try:
                outcomes = await loop.run_in_executor(self._model_thread, self._score_batch, batch)
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
        rows = batch[0].num_rows
        deadline = batch[0].received + self.max_wait_s
        while rows < self.max_batch_rows:
            if self._queue:
                if rows + self._queue[0].num_rows > self.max_batch_rows:
                    break
                batch.append(self._take())
                rows += batch[-1].num_rows
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
        self._queued_rows -= pending.num_rows
        return pending

    def _score_batch(self, batch: list[_Pending]) -> list[Outcome]:
        """In the model thread: one model for the whole batch (the requests decoded for its schema)."""
        for _ in range(3):  # a reload may retire the model read here before the batch reaches it: read it again
            model = self.current()
            if model is None:
                return [Outcome(error="no model is loaded yet", unavailable=True) for _ in batch]
            try:
                return self._score_with(model, batch)
            except ModelRetired:
                continue
        return [Outcome(error="the model was replaced while scoring; send the request again", unavailable=True)
                for _ in batch]

    def _score_with(self, model: Model, batch: list[_Pending]) -> list[Outcome]:
        outcomes = [Outcome(error=f"the model was replaced by {model.version}, which reads other columns or "
                            "types, while the request waited: send it again", unavailable=True)
                    if p.rows is not model.rows and p.rows.schema != model.rows.schema else None for p in batch]
        fit = [k for k, o in enumerate(outcomes) if o is None]
        if fit:
            try:
                scored = model.score([batch[k].table for k in fit])
            except ModelRetired:
                raise
            except ModelGone as e:  # the slot starts it again; meanwhile, retry later
                log.error("%s", e)
                scored = [Outcome(error=str(e), unavailable=True) for _ in fit]
            for k, outcome in zip(fit, scored):
                outcomes[k] = outcome
        return outcomes
