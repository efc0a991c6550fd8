"""Benchmark: the scoring server under concurrent clients, before and during a hot reload, against the program.

    hyrank bench serve                                   # a tiny artifact trained here, 8 clients, 5 s per phase
    hyrank bench serve --artifact exports/default --data data/synth --clients 16 --rows 32 --seconds 10

Starts `hyrank serve` on 127.0.0.1 (a free port) in a subprocess and drives it over loopback with --clients
threads, each on its own keep-alive HTTP connection, posting requests of --rows rows taken from the logs, as fast
as answers come back. Two phases: "steady" (--seconds), then "reload": a second version is published under the
served root (the same weights copied under a new version name, `latest` repointed atomically: what a reload
costs does not depend on the weights) and the clients keep going until the new version has answered for
--seconds (at most 120 s). Per phase: requests/s, rows/s, p50/p99 latency, errors (any non-200 or transport
failure) and the versions that answered. Then, in this process with the server idle, the same artifact on the
same rows in batches of the server's mean batch size (from its /metrics): the program alone (converted inputs ->
logits) and the whole in-process path (raw rows -> validation -> converter -> program, Artifact.score_rows), and
the ratio of served rows/s to each. Clients, server and the in-process runs share this machine's cores, so
compare the ratios of one run, not numbers across machines.

Without --artifact, it makes one first in a temporary folder (make_artifact: synthetic logs, one day trained on
one rank, `export_checkpoint`; about 20 s). With --artifact, the version it names is copied into a temporary
publish root, so the reload never touches the original; --data then names logs of its feature spec.
tests/test_serve.py uses make_artifact, publish_copy, ServerProcess and drive from here.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", type=Path, default=None,
                   help="a publish root or version folder (default: make a tiny one in a temp dir)")
    p.add_argument("--data", type=Path, default=None, help="logs to take request rows from (needed with --artifact)")
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    p.add_argument("--rows", type=int, default=16, help="rows per request")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    p.add_argument("--max-batch-rows", type=int, default=512, help="the server's --max-batch-rows")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="the server's --max-wait-ms")
    p.add_argument("--json", type=Path, default=None, help="also write the measurements here")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.artifact is not None and args.data is None:
        raise ValueError("--artifact needs --data: logs of its feature spec to take request rows from")
    if args.clients < 1 or args.rows < 1 or args.seconds <= 0:
        raise ValueError("--clients and --rows must be >= 1 and --seconds > 0")
    from hyrank.pipeline.serving.artifact import resolve

    with tempfile.TemporaryDirectory(prefix="hyrank-bench-serve-") as tmp:
        tmp = Path(tmp)
        if args.artifact is None:
            print("making a tiny artifact (synthetic logs, one day on one rank, export) ...", flush=True)
            made = make_artifact(tmp / "made")
            root, data = made.root, made.data
        else:  # serve a copy, so that publishing the reload's version leaves the original root alone
            version = resolve(args.artifact)
            root, data = tmp / "served", args.data
            shutil.copytree(version, root / "versions" / version.name)
            (root / "latest").write_text(version.name + "\n")
        result = _measure(args, root, data, tmp / "server.log")
    _report(result, args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["exit_code"] == 0 and result["swapped"] else 1


def _measure(args: argparse.Namespace, root: Path, data: Path, log: Path) -> dict:
    options = ["--max-batch-rows", str(args.max_batch_rows), "--max-wait-ms", str(args.max_wait_ms),
               "--reload-poll-s", "0.5"]
    with ServerProcess(root, log, *options) as server:
        server.wait_ready()
        rows = request_rows(data, http_json(server.port, "GET", "/readyz")[1]["features"], args.clients * args.rows * 4)
        bodies = [json.dumps({"rows": rows[i:i + args.rows]}).encode() for i in range(0, len(rows), args.rows)]
        drive(server.port, bodies[:1], clients=1, seconds=0.5)  # the program's first calls are slower
        steady = drive(server.port, bodies, clients=args.clients, seconds=args.seconds)
        old = http_json(server.port, "GET", "/readyz")[1]["version"]
        new = publish_copy(root, f"{old}-reload")
        reload_ = drive(server.port, bodies, clients=args.clients, seconds=args.seconds, until_version=new)
        metrics = http_text(server.port, "/metrics")
        exit_code = server.stop()
    batch_rows = _metric(metrics, "hyrank_batch_rows_sum") / max(1.0, _metric(metrics, "hyrank_batch_rows_count"))
    eager = _in_process(root, rows, max(2, round(batch_rows)), args.seconds)
    phases = {"steady": summarize(steady), "reload": summarize(reload_, new_version=new)}
    return {"phases": phases, "mean_batch_rows": batch_rows, "in_process": eager, "exit_code": exit_code,
            "old_version": old, "new_version": new, "swapped": phases["reload"]["rows_by_version"].get(new, 0) > 0}


def _in_process(root: Path, rows: list[dict], batch: int, seconds: float) -> dict:
    """Rows/s of the artifact called in this process on the same rows, in batches of `batch` rows: the program
    alone on converted inputs, and the whole path from raw rows (Artifact.score_rows)."""
    import torch

    from hyrank.pipeline.data.convert import BatchConverter
    from hyrank.pipeline.serving.artifact import Artifact, model_inputs

    artifact = Artifact.load(root)
    batches = [rows[i:i + batch] for i in range(0, len(rows) - batch + 1, batch)] or [rows]
    converter = BatchConverter(artifact.spec)
    inputs = [model_inputs(converter(artifact.table_of(b))) for b in batches]
    with torch.no_grad():
        program = _rate(lambda i: artifact.program(*inputs[i % len(inputs)]), [len(b) for b in batches], seconds)
    full = _rate(lambda i: artifact.score_rows(batches[i % len(batches)]), [len(b) for b in batches], seconds)
    return {"batch_rows": batch, "program_rows_per_s": program, "full_path_rows_per_s": full}


def _rate(call, sizes: list[int], seconds: float) -> float:
    call(0)  # warm
    done, i, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds / 2:
        call(i)
        done += sizes[i % len(sizes)]
        i += 1
    return done / (time.perf_counter() - start)


def _report(r: dict, args: argparse.Namespace) -> None:
    print(f"{args.clients} clients x {args.rows} rows/request; server batches of up to {args.max_batch_rows} rows, "
          f"{args.max_wait_ms:g} ms wait; mean batch {r['mean_batch_rows']:.1f} rows")
    print(f"{'phase':<8}{'seconds':>8}{'requests':>10}{'req/s':>9}{'rows/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'errors':>8}  versions (rows)")
    for name, p in r["phases"].items():
        versions = ", ".join(f"{v}: {n}" for v, n in p["rows_by_version"].items())
        print(f"{name:<8}{p['seconds']:>8.1f}{p['requests']:>10}{p['requests_per_s']:>9.0f}{p['rows_per_s']:>10.0f}"
              f"{p['p50_ms']:>9.1f}{p['p99_ms']:>9.1f}{p['errors']:>8}  {versions}")
    reload_ = r["phases"]["reload"]
    if r["swapped"]:
        print(f"reload: {r['new_version']} answered {reload_['swap_after_s']:.1f} s after it was published; "
              f"{reload_['errors']} failed requests during the reload")
    else:
        print(f"reload: {r['new_version']} never answered: the swap did not happen")
    e, served = r["in_process"], r["phases"]["steady"]["rows_per_s"]
    print(f"in process, batches of {e['batch_rows']} rows: program {e['program_rows_per_s']:,.0f} rows/s, whole "
          f"path from raw rows {e['full_path_rows_per_s']:,.0f} rows/s")
    print(f"served / program: {served / e['program_rows_per_s']:.3f}; served / whole path in process: "
          f"{served / e['full_path_rows_per_s']:.3f}")
    print(f"server exit code after SIGTERM: {r['exit_code']}")


# -- helpers shared with tests/test_serve.py -----------------------------------------------------------------------


@dataclass
class Made:
    root: Path  # the publish root: versions/<version>/, latest
    data: Path  # the synthetic logs it was trained on (day 1) and held out on (day 2)


def make_artifact(workdir: Path, *, rows_per_day: int = 2000) -> Made:
    """A tiny real artifact: two days of synthetic logs, the default config's model (small) trained on day 1 by the
    Trainer on one gloo rank forked from here, exported and published by export_checkpoint (its parity gate
    included)."""
    from hyrank.pipeline.config import load_config
    from hyrank.pipeline.data.synth import SynthConfig, generate_logs
    from hyrank.pipeline.distributed.local import run_local
    from hyrank.pipeline.serving.export import export_checkpoint

    data, run_dir = workdir / "data", workdir / "run"
    generate_logs(SynthConfig(rows_per_day=rows_per_day, num_days=2, seed=7, long_len_min=40, long_len_max=80,
                              short_len=12, num_users=2000, num_items=5000, num_categories=40, num_authors=500,
                              rows_per_chunk=1000, chunks_per_file=3), data)
    cfg = load_config(ROOT / "jobs" / "configs" / "default.toml", [
        f'data.root="{data}"', f'out_dir="{run_dir}"', "data.batch_size_per_rank=64", "model.options.hidden=[32]",
        "features.sequences.0.max_len=32", "features.sequences.1.max_len=8", "features.sequences.2.max_len=8",
        "train.tensorboard=false"])
    run_local(_train_first_day, cfg, world_size=1)
    checkpoints = run_dir / "checkpoints"
    export_checkpoint(checkpoints / (checkpoints / "latest").read_text().strip(), workdir / "export")
    return Made(workdir / "export", data)


def _train_first_day(rank: int, world_size: int, cfg) -> None:
    from hyrank.pipeline.data.days import discover_days
    from hyrank.pipeline.distributed.env import env_of_current_group
    from hyrank.pipeline.train.trainer import RunPlan, Trainer

    trainer = Trainer(cfg, env_of_current_group())
    trainer.run(RunPlan(train_days=discover_days(cfg.data.root)[:1]))
    trainer.close()


def publish_copy(root: Path, version: str) -> str:
    """Publish the version `latest` names again as `version` (manifest renamed; model.pt2 and its sha256 as they
    are), as export does: a complete folder renamed into place, then `latest` repointed atomically."""
    from hyrank.pipeline.files import write_atomic, write_json
    from hyrank.pipeline.serving.artifact import MANIFEST, resolve

    current = resolve(root)
    staging = root / "versions" / f".{version}.tmp"
    shutil.copytree(current, staging)
    manifest = json.loads((staging / MANIFEST).read_text())
    write_json(staging / MANIFEST, {**manifest, "version": version})
    staging.rename(root / "versions" / version)
    write_atomic(root / "latest", version + "\n")
    return version


def request_rows(data: Path, features: list[str], n: int) -> list[dict]:
    """`n` request rows (the features of the last day's first rows; repeated if the day has fewer)."""
    import pyarrow.parquet as pq

    from hyrank.pipeline.data.days import discover_days

    day = discover_days(data)[-1]
    rows = pq.read_table(day.files[0], columns=features).slice(0, n).to_pylist()
    return (rows * (n // len(rows) + 1))[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`hyrank serve --artifact <root> --port <free port> <options>` in a subprocess, its output in `log`; leaving
    the block kills it if `stop` was not called."""

    def __init__(self, root: Path, log: Path, *options: str):
        self.port = free_port()
        self.log = log
        argv = [sys.executable, "-m", "hyrank.pipeline.cli", "serve", "--artifact", str(root), "--port", str(self.port),
                *options]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def wait_ready(self, timeout_s: float = 120.0, path: str = "/readyz") -> None:
        """Until `path` answers 200; RuntimeError with the server's log if it exits or takes too long."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if http_json(self.port, "GET", path)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server was not ready in {timeout_s} s:\n{self.log.read_text()}")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then its exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)


def http_json(port: int, method: str, path: str, body: bytes | None = None,
              conn: http.client.HTTPConnection | None = None) -> tuple[int, dict]:
    """(status, decoded JSON body) of one request to 127.0.0.1:port, on `conn` if given (kept alive)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        if own:
            conn.close()


def http_text(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def drive(port: int, bodies: list[bytes], *, clients: int, seconds: float, until_version: str | None = None,
          max_seconds: float = 120.0) -> list[tuple]:
    """`clients` threads post `bodies` in turn for `seconds` (with until_version: until that version has answered
    for `seconds`; at most max_seconds). Records (start offset s, latency s, status, version, rows), status 0 for
    a transport failure."""
    records: list[tuple] = []
    lock = threading.Lock()
    start = time.perf_counter()
    first_new: list[float] = []

    def done() -> bool:
        now = time.perf_counter() - start
        if now > max_seconds:
            return True
        if until_version is None:
            return now > seconds
        return bool(first_new) and now - first_new[0] > seconds

    def client(k: int) -> None:
        conn, mine, i = http.client.HTTPConnection("127.0.0.1", port, timeout=60), [], k
        while not done():
            body = bodies[i % len(bodies)]
            i += 1
            t0 = time.perf_counter()
            try:
                status, payload = http_json(port, "POST", "/score", body, conn)
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                conn, status, payload = http.client.HTTPConnection("127.0.0.1", port, timeout=60), 0, {}
            version = payload.get("version")
            mine.append((t0 - start, time.perf_counter() - t0, status, version, len(payload.get("probabilities", ()))))
            if version == until_version and not first_new:
                with lock:
                    first_new.append(time.perf_counter() - start)
        conn.close()
        with lock:
            records.extend(mine)

    threads = [threading.Thread(target=client, args=(k,), name=f"client-{k}") for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(records)


def summarize(records: list[tuple], new_version: str | None = None) -> dict:
    """Throughput, latency percentiles, errors and rows per version of drive's records."""
    ok = [r for r in records if r[2] == 200]
    seconds = max((r[0] + r[1] for r in records), default=0.0) or 1e-9
    latencies = sorted(r[1] for r in ok) or [0.0]
    by_version: dict[str, int] = {}
    for r in ok:
        by_version[r[3]] = by_version.get(r[3], 0) + r[4]
    swap = next((r[0] + r[1] for r in ok if r[3] == new_version), None) if new_version else None
    return {"seconds": seconds, "requests": len(ok), "requests_per_s": len(ok) / seconds,
            "rows_per_s": sum(r[4] for r in ok) / seconds, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "errors": len(records) - len(ok), "rows_by_version": by_version, "swap_after_s": swap}


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
