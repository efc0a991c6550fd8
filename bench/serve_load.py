"""The load side of `hyrank bench serve` (bench/serve.py), shared with tests/test_serve.py: artifacts to serve, the
server in a subprocess, client threads driving it over 127.0.0.1, and their records summarized.

    made = make_demo_artifact(tmp)          # a model like the demo's (default.toml, 100k rows a day)
    made = make_artifact(tmp)               # a tiny one (tests)
    with ServerProcess(made.root, log, "--reload-poll-s", "0.2") as server:
        server.wait_ready()
        records = drive(server.port, bodies, clients=8, seconds=3, arrow=True)   # bounded in time and count
    summarize(records)                      # rows/s, p50/p99, errors, rows per version
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARROW = "application/vnd.apache.arrow.stream"


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
    return request_table(data, features, n).to_pylist()


def request_table(data: Path, features: list[str], n: int):
    """request_rows as the Arrow table the logs hold them in."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hyrank.pipeline.data.days import discover_days

    day = discover_days(data)[-1]
    table = pq.read_table(day.files[0], columns=features).slice(0, n)
    return pa.concat_tables([table] * (n // table.num_rows + 1)).slice(0, n).combine_chunks()


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
          max_seconds: float = 120.0, max_requests: int = 100_000, arrow: bool = False,
          start: float | None = None) -> list[tuple]:
    """`clients` threads post `bodies` in turn for `seconds` (with until_version: until that version has answered
    for `seconds`; at most max_seconds, and max_requests per client), as Arrow IPC streams asking for Arrow answers
    when `arrow`. Records (start offset s from `start` (default: now), latency s, status, version, rows), status 0
    for a transport failure."""
    records: list[tuple] = []
    lock = threading.Lock()
    start = time.perf_counter() if start is None else start
    first_new: list[float] = []
    headers = {"content-type": ARROW, "accept": ARROW} if arrow else {"content-type": "application/json"}

    def done() -> bool:
        now = time.perf_counter() - start
        if now > max_seconds:
            return True
        if until_version is None:
            return now > seconds
        return bool(first_new) and now - first_new[0] > seconds

    def client(k: int) -> None:
        conn, mine, i = http.client.HTTPConnection("127.0.0.1", port, timeout=60), [], k
        while not done() and i - k < max_requests:
            body = bodies[i % len(bodies)]
            i += 1
            t0 = time.perf_counter()
            try:
                status, version, rows = _post(conn, body, headers)
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                conn, status, version, rows = http.client.HTTPConnection("127.0.0.1", port, timeout=60), 0, None, 0
            mine.append((t0 - start, time.perf_counter() - t0, status, version, rows))
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


def _post(conn: http.client.HTTPConnection, body: bytes, headers: dict) -> tuple[int, str | None, int]:
    """(status, version, rows scored) of one POST /score on a kept-alive connection."""
    conn.request("POST", "/score", body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        return response.status, None, 0
    if response.getheader("content-type") == ARROW:
        import pyarrow as pa

        return 200, response.getheader("x-hyrank-version"), pa.ipc.open_stream(data).read_all().num_rows
    payload = json.loads(data)
    return 200, payload["version"], len(payload["probabilities"])


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


def make_demo_artifact(workdir: Path, *, rows_per_day: int = 100_000) -> Made:
    """A model like the one the demo ships (scripts/demo.sh): jobs/configs/default.toml as it is, on generated logs
    of the default generator at 100k rows a day; day 1 trained on one gloo rank forked from here, exported and
    published by export_checkpoint (its parity gate included); day 2 is where request rows come from."""
    from hyrank.pipeline.config import load_config
    from hyrank.pipeline.data.synth import SynthConfig, generate_logs
    from hyrank.pipeline.distributed.local import run_local
    from hyrank.pipeline.serving.export import export_checkpoint

    data, run_dir = workdir / "data", workdir / "run"
    generate_logs(SynthConfig(rows_per_day=rows_per_day, num_days=2, seed=0), data)
    cfg = load_config(ROOT / "jobs" / "configs" / "default.toml",
                      [f'data.root="{data}"', f'out_dir="{run_dir}"', "train.tensorboard=false"])
    run_local(_train_first_day, cfg, world_size=1)
    checkpoints = run_dir / "checkpoints"
    export_checkpoint(checkpoints / (checkpoints / "latest").read_text().strip(), workdir / "export")
    return Made(workdir / "export", data)
