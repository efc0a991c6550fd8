"""The scoring server: `hyrank serve`, FastAPI on uvicorn, scoring rows with a published artifact.

    hyrank serve --artifact exports/default --port 8080          # a publish root (follows `latest`) or a version
    curl -s localhost:8080/score -d '{"rows": [{"user_id": 3, "user_gender": 1, ...}]}'
        -> {"probabilities": [0.0312], "version": "3f9a0c1e-step-000002344"}

    app = make_app(ServeOptions(artifact=Path("exports/default")))   # the ASGI app (tests, another ASGI server)
    serve(options)                                                   # blocks; returns 0 after a drained SIGTERM

Endpoints:
  POST /score    {"rows": [{feature: value, ...}, ...]} -> 200 {"probabilities": [...], "version": "..."}.
                 A row carries the artifact's features (Artifact.features: the spec's columns but the label, query
                 id and oracle), in the JSON form of the training types (ids as numbers, string ids as strings,
                 lists as arrays). Rows go through the training path (pipeline/serving/artifact.py), so a request
                 is scored exactly as training read its logs. 400 {"error": "bad request", "problems": [...]} names
                 each bad row and field ("row 3: field 'user_id': negative_id"): malformed JSON (nested too
                 deeply too), not an object, a missing, unknown or ill-typed field, an over-long list, more than
                 --max-request-rows rows. 413: a body over --max-body-bytes, refused from its Content-Length
                 before it is read, or as soon as a chunked body passes the limit (the rest is never read; the
                 connection is closed). 503: no model loaded yet, or more rows queued than the server admits
                 (Retry-After). 500: the model failed on rows validation passed, or a bug of the server (logged
                 with its traceback, counted in /metrics like every other answer).
  GET /healthz   200 {"status": "alive"}: the process serves HTTP.
  GET /readyz    200 {"status": "ready", "version": ...} once a model is loaded, else 503 {"status": "loading"}.
  GET /metrics   prometheus_client's exposition of the server's own registry (Prometheus text, or OpenMetrics when
                 the Accept header asks): hyrank_requests_total{code}, hyrank_request_errors_total{reason:
                 bad_request, too_large, internal, unavailable}, hyrank_request_duration_seconds (histogram),
                 hyrank_batch_rows / hyrank_batch_requests (histograms), hyrank_rows_scored_total,
                 hyrank_queued_rows, hyrank_model_loaded, hyrank_model_info{version} 1,
                 hyrank_model_reloads_total{result: ok, failed}; counters and histograms also have the library's
                 *_created series.

Batching (pipeline/serving/batching.py): one asyncio queue feeding one model thread; concurrent requests are
scored together, each gets its own slice back, and a bad request never fails the others of its batch.

Loading and hot reload: the server listens at once and loads the model in a loader thread (/readyz says when it
is ready; a publish root with no `latest` yet is waited for). Every --reload-poll-s seconds it reads `latest`;
when it names another version (or its folder's manifest changed: export never rewrites a version, a hand copy
may), the new artifact is loaded in the loader thread beside the one serving, which keeps scoring meanwhile; then
one reference assignment swaps it in. The model thread reads that reference once per batch, so the swap falls
between two batches: no request fails or waits for a load, and every response names the version that scored it. A
version that fails to load (damaged files), or a `latest` that names no version (found on two polls in a row), is
logged once and counted as a failed reload, and the old one keeps serving.

Shutdown: SIGTERM (or SIGINT) closes the listening socket, lets every request already received finish (uvicorn's
graceful shutdown, up to --drain-timeout-s; the batcher keeps scoring meanwhile), then stops the batcher and the
model thread and exits 0.

Never imports pipeline.train: a serving process holds the artifact and the data path only (tests/test_layering.py
and tests/test_serve.py check it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from starlette.requests import ClientDisconnect

from hyrank.pipeline.serving.artifact import MANIFEST, Artifact, NoSuchVersion, resolve
from hyrank.pipeline.serving.batching import MicroBatcher, Overloaded

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
    drain_timeout_s: float = 30.0  # on SIGTERM, how long requests in flight may take to finish

    def __post_init__(self) -> None:
        self.artifact = Path(self.artifact)
        for name in ("max_batch_rows", "max_request_rows", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "reload_poll_s", "drain_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


# -- the model being served ----------------------------------------------------------------------------------------


class ModelSlot:
    """The artifact being served, and the loading of the next one beside it (in the loader thread)."""

    def __init__(self, source: Path, metrics: Metrics):
        self.source, self.metrics = source, metrics
        self.artifact: Artifact | None = None  # read once per batch by the model thread; replaced, never mutated
        self._loaded: tuple | None = None  # (version folder, manifest mtime) of the artifact serving
        self._failed: tuple | None = None  # ... of the last one that failed to load: not retried until it changes
        self._waiting_logged = False
        self._dangling: tuple[str | None, int] = (None, 0)  # what `latest` named that is not there, polls in a row

    def refresh(self) -> bool:
        """Load the version `latest` names if it is not the one serving; True if a new one was swapped in."""
        try:
            path = resolve(self.source)
            key = (path, (path / MANIFEST).stat().st_mtime_ns)
        except NoSuchVersion as e:
            self._dangling_pointer(e)
            return False
        except FileNotFoundError as e:  # no `latest` yet, or a folder removed by hand after resolve saw it
            if self.artifact is None and not self._waiting_logged:
                log.warning("no model to serve yet (%s); waiting for one to be published", e)
                self._waiting_logged = True
            return False
        self._dangling = (None, 0)
        if key in (self._loaded, self._failed):
            return False
        start = time.perf_counter()
        try:
            artifact = Artifact.load(path)
        except Exception:  # noqa: BLE001 - damaged or half-written: keep serving what serves
            self._failed = key
            self.metrics.reload(ok=False)
            log.exception("could not load %s; still serving %s", path,
                          self.artifact.version if self.artifact else "nothing")
            return False
        previous = self.artifact
        self.artifact, self._loaded = artifact, key  # the swap: the next batch scores with the new version
        self.metrics.reload(ok=True)
        log.info("serving %s from %s (loaded in %.1f s; was %s)", artifact.version, path,
                 time.perf_counter() - start, previous.version if previous else "nothing")
        return True


    def _dangling_pointer(self, e: NoSuchVersion) -> None:
        """Log and count a `latest` that names no version once (not at every poll), when two polls in a row find
        it: one poll may fall inside a hand-made publish that writes `latest` before its folder (export writes the
        folder first and never removes a published one), and the next one finds it there."""
        polls = self._dangling[1] + 1 if self._dangling[0] == e.name else 1
        self._dangling = (e.name, polls)
        if polls == 2:
            self.metrics.reload(ok=False)
            log.error("%s; still serving %s", e, self.artifact.version if self.artifact else "nothing")


async def _follow(slot: ModelSlot, poll_s: float, loader: ThreadPoolExecutor) -> None:
    """Load the first model, then follow `latest` every poll_s seconds (until one is loaded when poll_s is 0)."""
    loop = asyncio.get_running_loop()
    while True:
        await loop.run_in_executor(loader, slot.refresh)
        if poll_s == 0 and slot.artifact is not None:
            return
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
        artifact = self.slot.artifact
        yield GaugeMetricFamily("hyrank_queued_rows", "rows waiting for the model thread",
                                value=self.batcher.queued_rows)
        yield GaugeMetricFamily("hyrank_model_loaded", "1 once a model serves", value=int(artifact is not None))
        info = GaugeMetricFamily("hyrank_model_info", "the model version serving (1)", labels=["version"])
        if artifact is not None:
            info.add_metric([artifact.version], 1)
        yield info


# -- the app -------------------------------------------------------------------------------------------------------


def make_app(options: ServeOptions) -> FastAPI:
    """The ASGI app: endpoints, batcher, loader; its lifespan starts and stops them (see the module docstring)."""
    metrics = Metrics()
    slot = ModelSlot(options.artifact, metrics)
    batcher = MicroBatcher(lambda: slot.artifact, max_batch_rows=options.max_batch_rows,
                           max_wait_ms=options.max_wait_ms, on_batch=metrics.batch)
    metrics.watch(slot, batcher)
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hyrank-loader")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        follower = asyncio.get_running_loop().create_task(_follow(slot, options.reload_poll_s, loader))
        try:
            yield
        finally:  # uvicorn has drained the requests in flight by now
            follower.cancel()
            await batcher.close()
            loader.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="hyrank scoring", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.slot, app.state.metrics = slot, metrics

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            response, rows = await _score(request)
        except Exception:  # noqa: BLE001 - a bug of ours: still a counted, logged 500, never one the metrics miss
            log.exception("scoring a request failed")
            response, rows = JSONResponse({"error": "internal error (logged by the server)"}, status_code=500), 0
        metrics.request(response.status_code, time.perf_counter() - start, rows)
        return response

    async def _score(request: Request) -> tuple[JSONResponse, int]:
        body = await read_body(request, options.max_body_bytes)
        if isinstance(body, JSONResponse):
            return body, 0
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _bad([f"body: not JSON ({e})"]), 0
        except RecursionError:  # '[' * 100000: json's parser recurses once per level and gives up at Python's limit
            return _bad(["body: not JSON (nested too deeply)"]), 0
        problems = request_problems(payload, options.max_request_rows)
        if problems:
            return _bad(problems), 0
        if slot.artifact is None:
            return _unavailable("no model is loaded yet"), 0
        try:
            outcome = await batcher.submit(payload["rows"])
        except Overloaded as e:
            return _unavailable(f"overloaded: {e}"), 0
        if outcome.problems:
            return _bad(outcome.problems), 0
        if outcome.unavailable:
            return _unavailable(outcome.error), 0
        if outcome.error:
            return JSONResponse({"error": outcome.error}, status_code=500), 0
        return JSONResponse({"probabilities": outcome.probabilities, "version": outcome.version}), \
            len(outcome.probabilities)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "alive"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        artifact = slot.artifact
        if artifact is None:
            return JSONResponse({"status": "loading", "artifact": str(options.artifact)}, status_code=503)
        return JSONResponse({"status": "ready", "version": artifact.version, "features": artifact.features})

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


def request_problems(payload: Any, max_rows: int) -> list[str]:
    """What is wrong with a request body's shape (not with its rows: the batcher checks those against the model)."""
    if not isinstance(payload, dict):
        return [f'body: expected a JSON object {{"rows": [...]}}, got {_json_type(payload)}']
    problems = [f"body: unknown field {k!r} (a request is {{\"rows\": [...]}})" for k in payload if k != "rows"]
    rows = payload.get("rows")
    if "rows" not in payload:
        problems.append("body: missing field 'rows'")
    elif not isinstance(rows, list) or not rows:
        problems.append(f"rows: expected a non-empty array of objects, got {_json_type(rows)}")
    elif len(rows) > max_rows:
        problems.append(f"rows: {len(rows)} rows, more than the {max_rows} one request may hold")
    return problems


def _json_type(value: Any) -> str:
    if isinstance(value, list) and not value:
        return "an empty array"
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


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
