"""The `hyrank serve` and `hyrank predict` verbs: their options and handlers.

    hyrank serve --artifact exports/default --port 8080
    hyrank predict --artifact exports/default --data data/synth --days 2026-11-04 --out scores.parquet

Light to import (argparse and the standard library): building hyrank's parser loads neither FastAPI nor torchrec;
the handlers import the server (pipeline/serving/server.py) or batch scoring (pipeline/serving/predict.py) when
they run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hyrank.pipeline.storage import location


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    # the defaults are ServeOptions' (pipeline/serving/server.py; tests/test_serve.py holds them equal), written
    # out so that building the parser does not import the server (FastAPI, torchrec)
    p.add_argument("--artifact", required=True, type=location,
                   help="a publish root of `hyrank export --out` (its `latest` is followed) or one version folder")
    p.add_argument("--port", required=True, type=int, help="TCP port")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--max-batch-rows", type=int, default=512,
                   help="rows scored in one model call, at most (a larger request is scored alone)")
    p.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="how long the oldest queued request waits for others to join its batch")
    p.add_argument("--max-request-rows", type=int, default=1024, help="rows one request may hold")
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024,
                   help="bytes one request body may hold (8 MiB: 1024 rows of the default feature spec fit); "
                   "a larger one gets a 413 from its Content-Length, or as soon as a chunked body passes the limit, "
                   "without the rest being read")
    p.add_argument("--reload-poll-s", type=float, default=5.0,
                   help="read `latest` this often and hot-swap a new version in (0: never)")
    p.add_argument("--reload-nice", type=int, default=19,
                   help="how much lower the CPU priority of loading a new version is than scoring's (0-19): the "
                   "load takes the CPU scoring leaves")
    p.add_argument("--model-threads", type=int, default=1,
                   help="torch's CPU threads in the model process (the HTTP process needs a core of its own)")
    p.add_argument("--drain-timeout-s", type=float, default=30.0,
                   help="on SIGTERM, how long the requests in flight may take to finish")


def serve(args: argparse.Namespace) -> int:
    """Serve a published model over HTTP: micro-batched scoring, hot reload of `latest`, graceful drain.

    POST /score {"rows": [{feature: value, ...}, ...]} -> {"probabilities": [...], "version": "..."}, or the rows
    as an Arrow IPC stream (content-type application/vnd.apache.arrow.stream; the answer in one with that Accept);
    a bad request gets a 400 naming each bad row and field, a body over --max-body-bytes a 413 (before it is
    read). GET /healthz, /readyz (503 until a model is loaded), /metrics (Prometheus). Rows are checked and
    converted by the training code path, so the server scores exactly what training read; the model scores in a
    process of its own. A new version published under the root is loaded beside the serving one (at a lower CPU
    priority) and swapped in between two batches; SIGTERM drains the requests in flight and exits 0.

    Examples:
      hyrank serve --artifact exports/default --port 8080
      curl -s localhost:8080/readyz          # {"status": "ready", "version": ..., "features": [...]}
      curl -s localhost:8080/score -H 'content-type: application/json' -d @request.json
    """
    from hyrank.pipeline.serving.server import ServeOptions
    from hyrank.pipeline.serving.server import serve as run_server

    return run_server(ServeOptions(args.artifact, host=args.host, port=args.port, max_batch_rows=args.max_batch_rows,
                              max_wait_ms=args.max_wait_ms, max_request_rows=args.max_request_rows,
                              max_body_bytes=args.max_body_bytes, reload_poll_s=args.reload_poll_s,
                              reload_nice=args.reload_nice, model_threads=args.model_threads,
                              drain_timeout_s=args.drain_timeout_s))


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", required=True, type=location, help="a publish root (its `latest`) or a version folder")
    p.add_argument("--data", required=True, type=location, help="log root: <partition-key>=YYYY-MM-DD/*.parquet")
    p.add_argument("--days", required=True, help="YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD (complete days only)")
    p.add_argument("--out", required=True, type=location, help="output Parquet file (written atomically)")
    p.add_argument("--key", dest="keys", action="append", default=None, metavar="COL",
                   help="a log column to copy into the output next to day/file/row (repeatable; default: the "
                   "feature spec's query id column)")
    p.add_argument("--partition-key", default="day", help="folder key of the day partitions")


def predict(args: argparse.Namespace) -> int:
    """Score logs with a published artifact: one output row per input row, in input order.

    Reads each day's files in order and scores every row through the serving path (the training validation and
    converter, the exported program): the probabilities the server would return. Output columns: the --key
    columns, day, file, row (index in the file), probability, problem. Bad rows are marked, not dropped: their
    probability is null and `problem` names the field and the reason; their count and the first few are printed.

    Example:
      hyrank predict --artifact exports/default --data data/synth --days 2026-11-04 --out scores.parquet
    """
    from hyrank.pipeline.data.days import DayRange
    from hyrank.pipeline.serving.artifact import Artifact
    from hyrank.pipeline.serving.predict import predict as score_logs

    artifact = Artifact.load(args.artifact)
    start = time.perf_counter()
    result = score_logs(artifact, args.data, DayRange.parse(args.days), args.out, keys=args.keys,
                     partition_key=args.partition_key)
    seconds = time.perf_counter() - start
    print(f"scored {result.rows - result.bad} of {result.rows} rows of {len(result.days)} day(s), {result.files} "
          f"file(s) with {artifact.version} in {seconds:.1f} s ({result.rows / seconds:,.0f} rows/s): {result.out}")
    if result.bad:
        print(f"{result.bad} bad row(s) marked (probability null, column 'problem'); the first:")
        for line in result.first_problems:
            print(f"  {line}")
    return 0


# verb -> (adds its options to a parser, runs it); the handler's docstring is the verb's help
VERBS = {"serve": (add_serve_arguments, serve), "predict": (add_predict_arguments, predict)}


def add_verbs(verbs) -> None:
    from hyrank.pipeline.cli import verb

    for name, (add_arguments, handler) in VERBS.items():
        add_arguments(verb(verbs, name, handler))
