"""Object storage against local disk, side by side in one run: reader rows/s of the same day, checkpoint save and
load time of the same state.

    hyrank bench storage                                   # starts moto's S3 server on 127.0.0.1 (moto[server])
    hyrank bench storage --endpoint http://minio:9000 --bucket bench    # a real store (credentials: the AWS chain)

The day is generated once, written to a local folder and uploaded to `s3://<bucket>/logs`; DayReader reads it from
each (footers, schema checks, every batch), and a Checkpointer saves and loads a state of `--checkpoint-mb` MiB of
tables (fp32) to a local folder and to `s3://<bucket>/checkpoints` (save: DCP through its fsspec storage, then the
sha256 of every file read back and meta.json; load: the sha256 check, then DCP). The measurements take turns,
`--repeats` times, and the best of each is kept; the load average is printed before and after. The local S3 server
is a Python process on the same cores, so its numbers say what the code path costs, not what a store's network
gives.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", default=None, help="an S3-compatible endpoint (default: start moto's server on "
                        "127.0.0.1; AWS_ENDPOINT_URL when set)")
    parser.add_argument("--bucket", default="hyrank-bench", help="bucket to write into (created if missing)")
    parser.add_argument("--rows", type=int, default=20_000, help="rows of the generated day")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--checkpoint-mb", type=int, default=64, help="MiB of fp32 tables in the checkpoint")
    parser.add_argument("--repeats", type=int, default=3, help="passes per measurement; the best is reported")


def run(args: argparse.Namespace) -> int:
    server = None
    endpoint = args.endpoint or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint is None:
        server, endpoint = _start_moto()
        for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1"}.items():
            os.environ.setdefault(key, value)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        _measure_all(args, endpoint)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
    return 0


def _measure_all(args: argparse.Namespace, endpoint: str) -> None:
    import boto3

    from hyrank.pipeline.config import load_config
    from hyrank.pipeline.data.days import discover_days
    from hyrank.pipeline.data.synth import SynthConfig, generate_logs

    spec = load_config(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "default.toml").features
    client = boto3.client("s3", endpoint_url=endpoint)
    if args.bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=args.bucket)
    with tempfile.TemporaryDirectory(prefix="hyrank-bench-storage-") as tmp:
        local = Path(tmp) / "logs"
        generate_logs(SynthConfig(rows_per_day=args.rows, num_days=1, seed=5), local)
        for path in sorted(local.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), args.bucket, f"logs/{path.relative_to(local).as_posix()}")
        days = {"local disk": discover_days(local)[0], "S3": discover_days(f"s3://{args.bucket}/logs")[0]}
        ckpt = {"local disk": Path(tmp) / "checkpoints", "S3": f"s3://{args.bucket}/checkpoints"}
        size = sum(f.stat().st_size for f in days["local disk"].files)
        print(f"day {days['local disk'].day}: {args.rows:,} rows, {len(days['local disk'].files)} files, "
              f"{size / 2**20:.1f} MiB; checkpoint {args.checkpoint_mb} MiB; endpoint {endpoint}")
        print(f"load average before: {_load()}")
        reader = {k: 0.0 for k in days}
        save = {k: float("inf") for k in days}
        load = {k: float("inf") for k in days}
        state = _State(args.checkpoint_mb)
        for i in range(args.repeats):  # in turns: a burst of load from elsewhere hits both alike
            for where in days:
                reader[where] = max(reader[where], _read(days[where], spec, args.batch_size))
                s, lo = _checkpoint(ckpt[where], state, step=i + 1)
                save[where], load[where] = min(save[where], s), min(load[where], lo)
        print(f"load average after:  {_load()}")
    print(f"{'what':<34}{'local disk':>12}{'S3':>12}{'S3 / local':>12}")
    print(f"{'reader rows/s (DayReader)':<34}{reader['local disk']:>12,.0f}{reader['S3']:>12,.0f}"
          f"{reader['S3'] / reader['local disk']:>12.2f}")
    for name, values in (("checkpoint save s", save), ("checkpoint load s", load)):
        print(f"{name:<34}{values['local disk']:>12.2f}{values['S3']:>12.2f}"
              f"{values['S3'] / values['local disk']:>12.2f}")


def _read(day, spec, batch_size: int) -> float:
    from hyrank.pipeline.data.reader import DayReader

    start = time.perf_counter()
    reader = DayReader(day, spec, batch_size=batch_size)
    rows = sum(int(batch.labels.numel()) for batch in reader)
    return rows / (time.perf_counter() - start)


class _State:
    """Tables of fp32 rows of 64 floats: what a checkpoint mostly holds."""

    def __init__(self, mib: int):
        import torch

        rows = mib * 2**20 // (4 * 64 * 4)
        self.tables = {f"t{i}": torch.randn(rows, 64) for i in range(4)}

    def state_dict(self):
        return dict(self.tables)

    def load_state_dict(self, state) -> None:
        self.tables = dict(state)


def _checkpoint(root, state: _State, step: int) -> tuple[float, float]:
    import torch

    from hyrank.pipeline.distributed.env import DistEnv
    from hyrank.pipeline.train.checkpoint import Checkpointer

    checkpointer = Checkpointer(root, DistEnv(0, 1, 0, 1, torch.device("cpu")), keep=1, tensors={"tables": state})
    start = time.perf_counter()
    path = checkpointer.save(step)
    saved = time.perf_counter() - start
    start = time.perf_counter()
    checkpointer.load(path)
    return saved, time.perf_counter() - start


def _start_moto() -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return server, endpoint
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"moto's S3 server did not start on {endpoint} (pip install 'moto[server]')")
            time.sleep(0.1)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
