"""Benchmark: the scoring server under concurrent clients, JSON and Arrow bodies, steady and during a hot reload,
against the same scoring path called in this process.

    hyrank bench serve                        # trains a model like the demo's first (~1 min), then ~5 min of load
    hyrank bench serve --artifact exports/default --data data/synth --clients 1,8,32 --rows 16 --seconds 5

Starts `hyrank serve` on 127.0.0.1 (a free port) in a subprocess and drives it over loopback from this process:
--clients threads (each number in the list is one run of the load), each on its own keep-alive connection,
posting requests of --rows rows of the logs as fast as answers come back, as JSON and as Arrow IPC streams (the
answer in the same form). Per body form and number of clients:
  steady     --rounds rounds of --seconds of load each: rows/s, p50/p99 latency (medians of the rounds);
  reload     the load again, a new version published under the served root 0.5 s in (the same weights copied under
             a new version name, `latest` repointed atomically: what a reload costs does not depend on the
             weights), until the new version has answered for 1 s; p50/p99 of the requests in flight between the
             publish and the first answer of the new version, and how long that took;
  in-process after each steady round, the same request bodies through the same scoring path called directly in
             this process, with the server idle: decode each body (pipeline/serving/bodies.py), score them in
             batches of the server's mean batch of that round (worker.score_requests: validation, converter,
             program), encode each answer; served / in-process rows/s of a round says what serving over HTTP
             costs (the median of the rounds' ratios is reported: the machine's other work drifts);
  errors     any non-200 or transport failure, in both phases;
  CPU        CPU seconds per 1000 rows of the HTTP process, the model process and the clients (this process) while
             served, and of the in-process path (Linux /proc): what serving costs beyond scoring, whatever share
             of the cores the machine's other work leaves.
The clients, the server's two processes and the in-process runs share this machine's cores: compare the ratios of
one run, not numbers across machines.

Without --artifact it first makes a model like the one the demo ships (scripts/demo.sh: jobs/configs/default.toml
on generated logs of 100k rows a day; here one day trained on one rank, then exported and parity-gated). With
--artifact, the version it names is copied into a temporary publish root, so the reloads never touch the
original; --data then names logs of its feature spec. The server process, the clients and the artifacts live in
bench/serve_load.py (tests/test_serve.py uses them too).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from hyrank.bench.serve_load import (ServerProcess, drive, http_json, http_text, make_demo_artifact, publish_copy,
                                     request_table, summarize)

FORMATS = ("json", "arrow")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", type=Path, default=None,
                   help="a publish root or version folder (default: train and export one like the demo's)")
    p.add_argument("--data", type=Path, default=None, help="logs to take request rows from (needed with --artifact)")
    p.add_argument("--clients", default="1,8,32", help="concurrent client threads: one load run per number")
    p.add_argument("--rows", type=int, default=16, help="rows per request")
    p.add_argument("--seconds", type=float, default=3.0, help="length of a steady round (and of its in-process run)")
    p.add_argument("--rounds", type=int, default=3, help="steady and in-process rounds per cell (medians reported)")
    p.add_argument("--formats", default="json,arrow", help="request bodies to measure: json, arrow or both")
    p.add_argument("--max-batch-rows", type=int, default=512, help="the server's --max-batch-rows")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="the server's --max-wait-ms")
    p.add_argument("--json", type=Path, default=None, help="also write the measurements here")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.artifact is not None and args.data is None:
        raise ValueError("--artifact needs --data: logs of its feature spec to take request rows from")
    clients = [int(c) for c in str(args.clients).split(",")]
    formats = [f.strip() for f in args.formats.split(",")]
    if min(clients) < 1 or args.rows < 1 or args.rounds < 1 or args.seconds <= 0 or not set(formats) <= set(FORMATS):
        raise ValueError("--clients, --rows and --rounds must be >= 1, --seconds > 0, --formats json and/or arrow")
    from hyrank.pipeline.serving.artifact import resolve

    with tempfile.TemporaryDirectory(prefix="hyrank-bench-serve-") as tmp:
        tmp = Path(tmp)
        if args.artifact is None:
            print("making a model like the demo's (default.toml, 100k rows of generated logs, one day, export) ...",
                  flush=True)
            made = make_demo_artifact(tmp / "made")
            root, data = made.root, made.data
        else:  # serve a copy, so that publishing the reloads' versions leaves the original root alone
            version = resolve(args.artifact)
            root, data = tmp / "served", args.data
            shutil.copytree(version, root / "versions" / version.name)
            (root / "latest").write_text(version.name + "\n")
        result = _measure(args, root, data, clients, formats, tmp / "server.log")
    _report(result, args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    ok = result["exit_code"] == 0 and all(c["swapped"] for c in result["cells"])
    return 0 if ok else 1


def _measure(args: argparse.Namespace, root: Path, data: Path, clients: list[int], formats: list[str],
             log: Path) -> dict:
    from hyrank.pipeline.serving.artifact import Artifact

    options = ["--max-batch-rows", str(args.max_batch_rows), "--max-wait-ms", str(args.max_wait_ms),
               "--reload-poll-s", "0.2", "--max-request-rows", str(max(1024, args.rows))]
    load = [os.getloadavg()[0]]
    cells = []
    with ServerProcess(root, log, *options) as server:
        server.wait_ready()
        features = http_json(server.port, "GET", "/readyz")[1]["features"]
        bodies = request_bodies(request_table(data, features, max(clients) * args.rows * 4), args.rows)
        artifact = Artifact.load(root)  # the same weights as every version the reloads publish
        for fmt in formats:
            drive(server.port, bodies[fmt][:4], clients=1, seconds=0.5, arrow=fmt == "arrow")  # warm
            for n in clients:
                cell = _cell(server.port, server.process.pid, root, artifact, bodies[fmt], fmt, n, args, len(cells))
                cells.append(cell)
                print(_row(cell, args.rows), flush=True)
        exit_code = server.stop()
    load.append(os.getloadavg()[0])
    return {"cells": cells, "exit_code": exit_code, "load_average_1min": load, "cpus": os.cpu_count(),
            "version": artifact.version, "model": artifact.manifest["model"]}


def _cell(port: int, server_pid: int, root: Path, artifact, bodies: list[bytes], fmt: str, clients: int,
          args: argparse.Namespace, k: int) -> dict:
    """One body form and number of clients: --rounds rounds of the steady phase, each followed by the in-process
    run at that round's batch size (the machine's other work drifts: a ratio is taken within a round, and the
    medians are reported), then the reload phase."""
    arrow = fmt == "arrow"
    rounds = []
    for _ in range(args.rounds):
        before = http_text(port, "/metrics")
        pids = {"http": server_pid, **{"model": c for c in _children(server_pid)}}
        cpu = {name: _cpu_s(pid) for name, pid in pids.items()} | {"clients": _own_cpu_s()}
        steady = summarize(drive(port, bodies, clients=clients, seconds=args.seconds, arrow=arrow))
        cpu = {name: (_cpu_s(pids[name]) if name in pids else _own_cpu_s()) - used for name, used in cpu.items()}
        steady["cpu_s_per_1000_rows"] = {name: used / max(1e-9, steady["rows_per_s"] * steady["seconds"] / 1000)
                                         for name, used in cpu.items()}
        after = http_text(port, "/metrics")
        batches = max(1.0, _metric(after, "hyrank_batch_rows_count") - _metric(before, "hyrank_batch_rows_count"))
        steady["rows_per_batch"] = (_metric(after, "hyrank_batch_rows_sum") -
                                    _metric(before, "hyrank_batch_rows_sum")) / batches
        requests_per_batch = (_metric(after, "hyrank_batch_requests_sum") -
                              _metric(before, "hyrank_batch_requests_sum")) / batches
        steady["in_process"] = in_process(artifact, bodies, arrow, max(1, round(requests_per_batch)), args.seconds)
        steady["ratio"] = steady["rows_per_s"] / steady["in_process"]["rows_per_s"]
        rounds.append(steady)
    old = http_json(port, "GET", "/readyz")[1]["version"]
    new = f"{old.split('-reload')[0]}-reload{k + 1}"
    published: list[float] = []
    start = time.perf_counter()

    def publish() -> None:
        publish_copy(root, new)
        published.append(time.perf_counter() - start)

    timer = threading.Timer(0.5, publish)
    timer.start()
    reload_ = drive(port, bodies, clients=clients, seconds=1.0, until_version=new, arrow=arrow, start=start)
    timer.join()

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    steady = {key: median(key) for key in ("rows_per_s", "p50_ms", "p99_ms", "ratio", "rows_per_batch")}
    steady["errors"] = sum(r["errors"] for r in rounds)
    steady["cpu_s_per_1000_rows"] = {name: statistics.median(r["cpu_s_per_1000_rows"][name] for r in rounds)
                                     for name in rounds[0]["cpu_s_per_1000_rows"]}
    steady["cpu_s_per_1000_rows"]["in-process"] = statistics.median(r["in_process"]["cpu_s_per_1000_rows"]
                                                                    for r in rounds)
    return {"format": fmt, "clients": clients, "steady": steady, "rounds": rounds,
            "in_process_rows_per_s": statistics.median(r["in_process"]["rows_per_s"] for r in rounds),
            "reload": summarize_reload(reload_, published[0], new), "swapped": any(r[3] == new for r in reload_)}


def request_bodies(table, per_request: int) -> dict[str, list[bytes]]:
    """The same rows as JSON bodies and as Arrow IPC streams (the logs' own types, as a client reading them has)."""
    import pyarrow as pa

    slices = [table.slice(i, per_request) for i in range(0, table.num_rows - per_request + 1, per_request)]
    return {"json": [json.dumps({"rows": t.to_pylist()}).encode() for t in slices],
            "arrow": [_ipc(t, pa) for t in slices]}


def _ipc(table, pa) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def in_process(artifact, bodies: list[bytes], arrow: bool, batch_requests: int, seconds: float) -> dict:
    """Rows/s of the server's scoring path called directly on the same bodies, `batch_requests` bodies a batch:
    decode each (bodies.decode_request), score them together (worker.LocalModel: the model process's
    score_requests, here: validation, converter, program), encode each answer (bodies.answer); for at most
    `seconds` and 2,000 batches."""
    from hyrank.pipeline.serving.bodies import answer, decode_request
    from hyrank.pipeline.serving.worker import LocalModel

    model = LocalModel(artifact)

    def batch(i: int) -> int:
        chosen = [bodies[(i * batch_requests + j) % len(bodies)] for j in range(batch_requests)]
        tables = [decode_request(b, arrow=arrow, rows=artifact.rows, max_rows=1 << 20) for b in chosen]
        outcomes = model.score(tables)
        assert all(o.probabilities is not None for o in outcomes), [o.problems or o.error for o in outcomes]
        for o in outcomes:
            answer(o, arrow=arrow)
        return sum(t.num_rows for t in tables)

    batch(0)  # warm
    done, i, start, cpu = 0, 0, time.perf_counter(), _own_cpu_s()
    while time.perf_counter() - start < seconds and i < 2000:
        done += batch(i)
        i += 1
    return {"batch_requests": batch_requests, "rows_per_s": done / (time.perf_counter() - start),
            "cpu_s_per_1000_rows": (_own_cpu_s() - cpu) / (done / 1000)}


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc (0 where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (its model process), from /proc; children are listed per thread."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        return [int(c) for t in tasks for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except OSError:
        return []


def summarize_reload(records: list[tuple], published_s: float, new_version: str) -> dict:
    """Latency of the requests in flight while the reload happened: between the publish and the first answer of
    the new version (the poll, the load beside the serving model, the swap)."""
    first_new = min((r[0] + r[1] for r in records if r[3] == new_version), default=None)
    end = first_new if first_new is not None else max((r[0] + r[1] for r in records), default=published_s)
    during = [r for r in records if r[0] < end and r[0] + r[1] > published_s]
    s = summarize(during, new_version)
    s["errors"] = sum(1 for r in records if r[2] != 200)  # over the whole phase
    s["swap_after_s"] = None if first_new is None else first_new - published_s
    return s


def _row(c: dict, rows: int) -> str:
    steady, reload_, local = c["steady"], c["reload"], c["in_process_rows_per_s"]
    swap = "never" if reload_["swap_after_s"] is None else f"{reload_['swap_after_s']:.1f}"
    return (f"{c['format']:<6}{c['clients']:>8}{rows:>6}{local:>12,.0f}{steady['rows_per_s']:>10,.0f}"
            f"{steady['ratio']:>8.2f}{steady['rows_per_batch']:>8.0f}{steady['p50_ms']:>8.1f}"
            f"{steady['p99_ms']:>8.1f}{reload_['p50_ms']:>8.1f}{reload_['p99_ms']:>8.1f}{swap:>7}"
            f"{steady['errors'] + reload_['errors']:>7}")


HEADER = (f"{'body':<6}{'clients':>8}{'rows':>6}{'in-process':>12}{'served':>10}{'ratio':>8}{'batch':>8}"
          f"{'p50':>8}{'p99':>8}{'rl p50':>8}{'rl p99':>8}{'swap s':>7}{'errors':>7}")


def _report(r: dict, args: argparse.Namespace) -> None:
    print(f"model {r['model']['name']} {r['model'].get('options', {})} ({r['version']}); {r['cpus']} CPUs, load "
          f"average {r['load_average_1min'][0]:.2f} before, {r['load_average_1min'][1]:.2f} after; server batches of "
          f"up to {args.max_batch_rows} rows, {args.max_wait_ms:g} ms wait")
    print(f"medians of {args.rounds} rounds of {args.seconds:g} s: rows/s in process and served, ratio = served / "
          "in-process within a round, batch = mean rows per model call;")
    print("p50/p99 ms steady, then during a hot reload (rl); swap s = publish to the new version's first answer")
    print(HEADER)
    for c in r["cells"]:
        print(_row(c, args.rows))
    print("CPU seconds per 1000 rows served (medians; /proc): where a served row's CPU goes, and the in-process path's")
    print(f"{'body':<6}{'clients':>8}{'http':>8}{'model':>8}{'clients':>9}{'served':>8}{'in-process':>12}")
    for c in r["cells"]:
        cpu = c["steady"]["cpu_s_per_1000_rows"]
        served = sum(v for k, v in cpu.items() if k != "in-process")
        print(f"{c['format']:<6}{c['clients']:>8}{cpu.get('http', 0):>8.3f}{cpu.get('model', 0):>8.3f}"
              f"{cpu['clients']:>9.3f}{served:>8.3f}{cpu['in-process']:>12.3f}")
    print(f"server exit code after SIGTERM: {r['exit_code']}")


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
