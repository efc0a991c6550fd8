"""The scoring server: `hyrank serve`, FastAPI on uvicorn, scoring rows with a published artifact.

    hyrank serve --artifact exports/default --port 8080          # a publish root (follows `latest`) or a version
    curl -s localhost:8080/score -d '{"rows": [{"user_id": 3, "user_gender": 1, ...}]}'
        -> {"probabilities": [0.0312], "version": "3f9a0c1e-step-000002344"}

    app = make_app(ServeOptions(artifact=Path("exports/default")))   # the ASGI app (tests, another ASGI server)
    serve(options)                                                   # blocks; returns 0 after a drained SIGTERM

Endpoints:
  POST /score    {"rows": [{feature: value, ...}, ...]} -> 200 {"probabilities": [...], "version": "..."}, or the
                 same rows as an Arrow IPC stream (content-type application/vnd.apache.arrow.stream; answered in
                 one when Accept asks: pipeline/serving/bodies.py). A row carries the artifact's features (the
                 spec's columns but the label, query id and oracle), in the JSON form of the training types (ids as
                 numbers, string ids as strings, lists as arrays) or in Arrow types training accepts for them. Rows
                 go through the training path (pipeline/serving/rows.py, then the model process), so a request is
                 scored exactly as training read its logs. 400 {"error": "bad request", "problems": [...]} names
                 each bad row and field ("row 3: field 'user_id': negative_id") or column: a body that does not
                 parse (JSON nested too deeply too), not an object, a missing, unknown or ill-typed field or
                 column, an over-long list, more than --max-request-rows rows. 413: a body over --max-body-bytes,
                 refused from its Content-Length before it is read, or as soon as a chunked body passes the limit
                 (the rest is never read; the connection is closed). 503: no model loaded yet, the model process
                 being restarted, or more rows queued than the server admits (Retry-After). 500: the model failed
                 on rows validation passed, or a bug of the server (logged with its traceback, counted in /metrics
                 like every other answer).
  GET /healthz   200 {"status": "alive"}: the process serves HTTP.
  GET /readyz    200 {"status": "ready", "version": ...} once a model is loaded, else 503 {"status": "loading"}.
  GET /metrics   prometheus_client's exposition of the server's own registry (Prometheus text, or OpenMetrics when
                 the Accept header asks): hyrank_requests_total{code}, hyrank_request_errors_total{reason:
                 bad_request, too_large, internal, unavailable}, hyrank_request_duration_seconds (histogram),
                 hyrank_batch_rows / hyrank_batch_requests (histograms), hyrank_rows_scored_total,
                 hyrank_queued_rows, hyrank_model_loaded, hyrank_model_info{version} 1,
                 hyrank_model_reloads_total{result: ok, failed}; with managed tables (pipeline/serving/managed.py)
                 hyrank_managed_ids_total{table} and hyrank_unknown_ids_total{table}, the ids scored and those the
                 model has no row for (they read the table's zero fallback row); counters and histograms also have
                 the library's *_created series.

Two processes: this one (HTTP, decoding each request into Arrow in the event loop, batching) and a model process
(pipeline/serving/worker.py: validation, conversion and the exported program), so that the program never waits
for the GIL behind HTTP parsing, and both use a core. Batching (pipeline/serving/batching.py): one asyncio queue
feeding one model thread, which hands each batch to the model process; concurrent requests are scored together,
each gets its own slice back, and a bad request never fails the others of its batch.

Loading and hot reload: the server listens at once and starts a model process for the version `latest` names
(/readyz says when it is ready; a publish root with no `latest` yet is waited for). Every --reload-poll-s seconds it
reads `latest`; when it names another version (or its folder's manifest changed: export never rewrites a version, a
hand copy may), a new model process loads it beside the one serving, at a lower CPU priority (--reload-nice), and
warms it up; then one reference assignment swaps it in and the old process exits once its batch in flight is
answered. The model thread reads that reference once per batch, so the swap falls between two batches: no request
fails or waits for a load, and every response names the version that scored it. A version that fails to load
(damaged files), or a `latest` that names no version (found on two polls in a row), is logged once and counted as a
failed reload, and the old one keeps serving. A model process that dies is logged, counted as a failed reload and
started again (its requests meanwhile get 503s).

Shutdown: SIGTERM (or SIGINT) closes the listening socket, lets every request already received finish (uvicorn's
graceful shutdown, up to --drain-timeout-s; the batcher keeps scoring meanwhile), then stops the batcher, the
model thread and the model process, and exits 0.

Never imports pipeline.train: a serving process holds the artifact and the data path only (tests/test_layering.py
and tests/test_serve.py check it).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from starlette.requests import ClientDisconnect

from hyrank.pipeline.serving.artifact import MANIFEST, NoSuchVersion, resolve
from hyrank.pipeline.serving.batching import MicroBatcher, Overloaded
from hyrank.pipeline.serving.bodies import ARROW_STREAM, NoModel, answer, decode_request, is_arrow
from hyrank.pipeline.serving.rows import BadRows
from hyrank.pipeline.serving.worker import ModelLoadError, ModelProcess, Outcome
from hyrank.pipeline.storage import location, mtime_ns

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    artifact: Path  # a publish root (`latest` is followed) or one version folder
    host: str = "127.0.0.1"
    port: int = 8080
    max_batch_rows: int = 512  # rows scored in one program call, at most (a larger request is scored alone)
    max_wait_ms: float = 2.0  # how long the oldest request waits for others to join its batch
    max_request_rows: int = 1024  # rows one request may hold
    # bytes one request body may hold: 1024 rows of the default feature spec (2.4 MiB of JSON) fit with room to spare;
    # longer sequences need more. A body is refused from its Content-Length, or once reading passes the limit,
    # so no request can make the server hold more than this (the issue: 300 MB read whole, 0.9 GB more RSS)
    max_body_bytes: int = 8 * 1024 * 1024
    reload_poll_s: float = 5.0  # how often `latest` is read (0: load once, never reload)
    reload_nice: int = 19  # how much lower the CPU priority of loading a new version is than scoring's (worker.py)
    # torch's threads in the model process: the HTTP process needs a core too, and torch's OpenMP threads spin on
    # a shared core (on 2 cores with 2 threads, 8 clients x 16 rows got 17 requests/s, with 1 thread 310)
    model_threads: int = 1
    drain_timeout_s: float = 30.0  # on SIGTERM, how long requests in flight may take to finish

    def __post_init__(self) -> None:
        self.artifact = location(self.artifact)  # a local path or s3://bucket/prefix
        for name in ("max_batch_rows", "max_request_rows", "max_body_bytes", "model_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.reload_nice <= 19:
            raise ValueError(f"reload_nice must be in 0..19, got {self.reload_nice}")
        for name in ("max_wait_ms", "reload_poll_s", "drain_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


# -- the model being served ----------------------------------------------------------------------------------------


class ModelSlot:
    """The model process serving, and the starting of the next one beside it (from the loader thread)."""

    def __init__(self, source: Path, metrics: Metrics, *, reload_nice: int = 19, model_threads: int = 1):
        self.source, self.metrics, self.reload_nice, self.model_threads = source, metrics, reload_nice, model_threads
        self.model: ModelProcess | None = None  # read once per batch by the model thread; replaced, never mutated
        self._loaded: tuple | None = None  # (version folder, manifest mtime) of the model serving
        self._failed: tuple | None = None  # ... of the last one that failed to load: not retried until it changes
        self._waiting_logged = False
        self._dangling: tuple[str | None, int] = (None, 0)  # what `latest` named that is not there, polls in a row

    def refresh(self) -> bool:
        """Start the version `latest` names if it is not the one serving; True if a new one was swapped in."""
        try:
            path = resolve(self.source)
            key = (path, mtime_ns(path / MANIFEST))
        except NoSuchVersion as e:
            self._dangling_pointer(e)
            return False
        except FileNotFoundError as e:  # no `latest` yet, or a folder removed by hand after resolve saw it
            if self.model is None and not self._waiting_logged:
                log.warning("no model to serve yet (%s); waiting for one to be published", e)
                self._waiting_logged = True
            return False
        self._dangling = (None, 0)
        if self.model is not None and not self.model.alive:
            self._lost()
        if key in (self._loaded, self._failed):
            return False
        return self._start(path, key)

    def revive(self) -> bool:
        """Without following `latest` (--reload-poll-s 0): start the version serving again if its process died."""
        if self.model is None or self.model.alive:
            return False
        path, key = self.model.path, self._loaded
        self._lost()
        return self._start(path, key)

    def _lost(self) -> None:
        log.error("the model process of %s exited (code %s); starting it again", self.model.version,
                  self.model.process.poll())
        self.metrics.reload(ok=False)
        self._loaded = None

    def _start(self, path: Path, key: tuple) -> bool:
        start = time.perf_counter()
        previous = self.model if self.model is not None and self.model.alive else None
        try:  # a reload beside a serving model loads at a lower priority: it takes the CPU scoring leaves
            model = ModelProcess.start(path, nice=self.reload_nice if previous is not None else 0,
                                       threads=self.model_threads)
        except ModelLoadError as e:  # damaged or half-written: keep serving what serves
            self._failed = key
            self.metrics.reload(ok=False)
            log.error("could not load %s (%s); still serving %s", path, e,
                      previous.version if previous else "nothing")
            return False
        old = self.model
        self.model, self._loaded = model, key  # the swap: the next batch is scored by the new version
        self.metrics.reload(ok=True)
        log.info("serving %s from %s (loaded in %.1f s; was %s)", model.version, path, time.perf_counter() - start,
                 old.version if old else "nothing")
        if old is not None:
            old.close()  # once its batch in flight, if any, is answered
        return True

    def close(self) -> None:
        if self.model is not None:
            self.model.close()

    def _dangling_pointer(self, e: NoSuchVersion) -> None:
        """Log and count a `latest` that names no version once (not at every poll), when two polls in a row find
        it: one poll may fall inside a hand-made publish that writes `latest` before its folder (export writes the
        folder first and never removes a published one), and the next one finds it there."""
        polls = self._dangling[1] + 1 if self._dangling[0] == e.name else 1
        self._dangling = (e.name, polls)
        if polls == 2:
            self.metrics.reload(ok=False)
            log.error("%s; still serving %s", e, self.model.version if self.model else "nothing")


async def _follow(slot: ModelSlot, poll_s: float, loader: ThreadPoolExecutor) -> None:
    """Start the first model, then follow `latest` every poll_s seconds (with poll_s 0: keep the one loaded, and
    start it again should its process die)."""
    loop = asyncio.get_running_loop()
    while True:
        await loop.run_in_executor(loader, slot.refresh if poll_s or slot.model is None else slot.revive)
        await asyncio.sleep(poll_s or 1.0)


# -- metrics -------------------------------------------------------------------------------------------------------


class Metrics:
    """The server's Prometheus metrics (prometheus_client), in a registry of its own: several servers in one process
    (tests) never share or clash. Updated in the event loop, reloads in the loader thread (the library locks)."""

    REASONS = {400: "bad_request", 413: "too_large", 500: "internal", 503: "unavailable"}  # error answers

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("hyrank_requests_total", "scoring requests answered, by HTTP status", ["code"],
                                registry=r)
        self.errors = Counter("hyrank_request_errors_total", "scoring requests that failed, by reason", ["reason"],
                              registry=r)
        self.latency = Histogram("hyrank_request_duration_seconds", "time from request to response, seconds",
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
                                 registry=r)
        self.batch_rows = Histogram("hyrank_batch_rows", "rows per model call",
                                    buckets=tuple(float(2 ** i) for i in range(13)), registry=r)
        self.batch_requests = Histogram("hyrank_batch_requests", "requests per model call",
                                        buckets=tuple(float(2 ** i) for i in range(9)), registry=r)
        self.rows_scored = Counter("hyrank_rows_scored_total", "rows scored", registry=r)
        self.managed_ids = Counter("hyrank_managed_ids_total", "ids of managed tables in the rows scored, by table",
                                   ["table"], registry=r)
        self.unknown_ids = Counter("hyrank_unknown_ids_total", "ids of managed tables the model holds no row for, by "
                                   "table: scored through the table's zero fallback row", ["table"], registry=r)
        self.reloads = Counter("hyrank_model_reloads_total", "model versions loaded, or that failed to load (a "
                               "damaged version, or a `latest` naming none)", ["result"], registry=r)
        # every reason and result shows from the start, at 0: an alert on their rate needs the series to exist
        for reason in self.REASONS.values():
            self.errors.labels(reason)
        for result in ("ok", "failed"):
            self.reloads.labels(result)

    def request(self, code: int, seconds: float, rows: int) -> None:
        self.requests.labels(str(code)).inc()
        reason = self.REASONS.get(code)
        if reason:
            self.errors.labels(reason).inc()
        else:
            self.rows_scored.inc(rows)
        self.latency.observe(seconds)

    def ids(self, outcome: Outcome) -> None:
        """Count a scored request's ids of managed tables, and those without a slot."""
        for table, count in outcome.managed_ids.items():
            self.managed_ids.labels(table).inc(count)
        for table, count in outcome.unknown_ids.items():
            self.unknown_ids.labels(table).inc(count)

    def batch(self, requests: int, rows: int) -> None:
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)

    def reload(self, ok: bool) -> None:
        self.reloads.labels("ok" if ok else "failed").inc()

    def watch(self, slot: ModelSlot, batcher: MicroBatcher) -> None:
        """Also expose what the server holds at each scrape: rows queued, the model loaded and its version."""
        self.registry.register(_Holding(slot, batcher))


class _Holding:
    """A prometheus_client collector of the server's state, read when scraped (nothing to keep up to date)."""

    def __init__(self, slot: ModelSlot, batcher: MicroBatcher):
        self.slot, self.batcher = slot, batcher

    def collect(self):
        model = self.slot.model
        yield GaugeMetricFamily("hyrank_queued_rows", "rows waiting for the model thread",
                                value=self.batcher.queued_rows)
        yield GaugeMetricFamily("hyrank_model_loaded", "1 once a model serves", value=int(model is not None))
        info = GaugeMetricFamily("hyrank_model_info", "the model version serving (1)", labels=["version"])
        if model is not None:
            info.add_metric([model.version], 1)
        yield info


# -- the app -------------------------------------------------------------------------------------------------------


def make_app(options: ServeOptions) -> FastAPI:
    """The ASGI app: endpoints, batcher, loader; its lifespan starts and stops them (see the module docstring)."""
    metrics = Metrics()
    slot = ModelSlot(options.artifact, metrics, reload_nice=options.reload_nice, model_threads=options.model_threads)
    batcher = MicroBatcher(lambda: slot.model, max_batch_rows=options.max_batch_rows,
                           max_wait_ms=options.max_wait_ms, on_batch=metrics.batch)
    metrics.watch(slot, batcher)
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hyrank-loader")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # the imports (FastAPI, pyarrow, torch through the data path) leave ~370k objects, which each full pass of
        # the garbage collector would walk with the event loop stopped (0.5 s on 2 busy cores): out of its way
        gc.collect()
        gc.freeze()
        await batcher.start()
        follower = asyncio.get_running_loop().create_task(_follow(slot, options.reload_poll_s, loader))
        try:
            yield
        finally:  # uvicorn has drained the requests in flight by now
            follower.cancel()
            await batcher.close()
            loader.shutdown(wait=True, cancel_futures=True)  # a model process being started is waited for
            slot.close()

    app = FastAPI(title="hyrank scoring", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.slot, app.state.metrics = slot, metrics

    @app.post("/score")
    async def score(request: Request) -> Response:
        start = time.perf_counter()
        try:
            response, rows = await _score(request)
        except Exception:  # noqa: BLE001 - a bug of ours: still a counted, logged 500, never one the metrics miss
            log.exception("scoring a request failed")
            response, rows = JSONResponse({"error": "internal error (logged by the server)"}, status_code=500), 0
        metrics.request(response.status_code, time.perf_counter() - start, rows)
        return response

    async def _score(request: Request) -> tuple[Response, int]:
        body = await read_body(request, options.max_body_bytes)
        if isinstance(body, Response):
            return body, 0
        model = slot.model
        try:  # in the event loop: the model process scores meanwhile (worker.py)
            table = decode_request(body, arrow=is_arrow(request.headers.get("content-type")),
                                   rows=model.rows if model else None, max_rows=options.max_request_rows)
        except BadRows as e:
            return _bad(e.problems), 0
        except NoModel:
            return _unavailable("no model is loaded yet"), 0
        try:
            outcome = await batcher.submit(table, model.rows)
        except Overloaded as e:
            return _unavailable(f"overloaded: {e}"), 0
        if outcome.problems:
            return _bad(outcome.problems), 0
        if outcome.unavailable:
            return _unavailable(outcome.error), 0
        if outcome.error:
            return JSONResponse({"error": outcome.error}, status_code=500), 0
        metrics.ids(outcome)
        return answer(outcome, arrow=ARROW_STREAM in request.headers.get("accept", "").lower()), \
            len(outcome.probabilities)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "alive"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        model = slot.model
        if model is None:
            return JSONResponse({"status": "loading", "artifact": str(options.artifact)}, status_code=503)
        return JSONResponse({"status": "ready", "version": model.version, "features": model.rows.features})

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        # generate_latest (Prometheus text), or OpenMetrics when the scraper's Accept asks for it
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(metrics.registry), media_type=content_type)

    return app


async def read_body(request: Request, max_bytes: int) -> bytes | JSONResponse:
    """The request's body, or the answer refusing it: 413 once it is known to exceed `max_bytes` (from its
    Content-Length before reading it, or while reading a chunked one: then nothing more is read)."""
    declared = request.headers.get("content-length")  # h11 has checked it is one number
    if declared is not None and int(declared) > max_bytes:
        return _too_large(f"Content-Length {declared}", max_bytes)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                return _too_large(f"more than {max_bytes} bytes received", max_bytes)
    except ClientDisconnect:  # nobody reads the answer; it is counted as the client's fault
        return _bad(["body: the client went away before sending all of it"])
    return bytes(body)


def _too_large(what: str, max_bytes: int) -> JSONResponse:
    # Connection: close, so that uvicorn closes the connection after the answer rather than reading (and
    # throwing away) the rest of a body this large to reach the next request on it
    return JSONResponse({"error": f"request body too large: {what}, over the {max_bytes} bytes a request may hold "
                         "(hyrank serve --max-body-bytes)"}, status_code=413, headers={"Connection": "close"})


def _bad(problems: list[str]) -> JSONResponse:
    return JSONResponse({"error": "bad request", "problems": problems}, status_code=400)


def _unavailable(why: str) -> JSONResponse:
    return JSONResponse({"error": why}, status_code=503, headers={"Retry-After": "1"})


# -- the process ---------------------------------------------------------------------------------------------------


def serve(options: ServeOptions) -> int:
    """Serve until SIGTERM or SIGINT, then drain and return 0 (see the module docstring)."""
    import uvicorn

    if not options.artifact.exists():
        raise FileNotFoundError(f"--artifact {options.artifact}: no such folder (a publish root of `hyrank "
                                "export --out`, or one of its versions/<version> folders)")
    config = uvicorn.Config(make_app(options), host=options.host, port=options.port, http="h11", loop="asyncio",
                            lifespan="on", log_config=None, access_log=False,
                            timeout_graceful_shutdown=options.drain_timeout_s)
    server = uvicorn.Server(config)
    stops: list[int] = []
    # While it runs, uvicorn catches these signals itself (graceful shutdown), and afterwards raises the caught
    # signal again with the handler it found: with these, a drained shutdown ends the process with 0, not SIGTERM.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stops.append(signum))
    log.info("serving %s on http://%s:%d (batches of up to %d rows, %g ms wait; reload every %g s)",
             options.artifact, options.host, options.port, options.max_batch_rows, options.max_wait_ms,
             options.reload_poll_s)
    server.run()
    if stops:
        log.info("stopped by %s after draining the requests in flight", signal.Signals(stops[0]).name)
    return 0
