"""A stream with its logs and checkpoints on object storage (a real S3-protocol server started by the tests:
tests/s3.py): killed with SIGKILL, once while a checkpoint is being uploaded, it resumes and trains every row
exactly once, the model equal to an uninterrupted run's; the run lock holds on the store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from hyrank.pipeline.config import load_config
from hyrank.pipeline.data.synth import generate_logs
from hyrank.pipeline.data.validate import validate_rows
from hyrank.pipeline.storage import location
from hyrank.pipeline.train import run_lock
from hyrank.pipeline.train.checkpoint import read_meta
from hyrank.pipeline.train.run_lock import ObjectLock, RunDirInUse
from hyrank.pipeline.train.state import read_ledger

from conftest import DEFAULT_CONFIG, TINY, descendants, latest_checkpoint_tensors, small_synth

pytestmark = pytest.mark.dist

DAYS = ["2026-11-01", "2026-11-02"]
RUN = [*TINY, "train.allreduce_sync_steps=0", "data.batch_size_per_rank=32", "checkpoint.every_steps=8"]


@pytest.fixture(scope="module")
def two_days(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("s3stream") / "data"
    generate_logs(small_synth(num_days=2, rows_per_day=2000), root)
    return root


def _cmd(root, out_dir, checkpoints, *extra):
    sets = [a for item in RUN + list(extra) for a in ("--set", item)]
    return [sys.executable, "-m", "hyrank.pipeline.cli", "stream", "--config", str(DEFAULT_CONFIG), "--quiet",
            "--nproc-per-node", "2", "--set", f'data.root="{root}"', "--set", f'out_dir="{out_dir}"',
            "--set", f'checkpoint.dir="{checkpoints}"', *sets]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def _partial_steps(s3, prefix: str) -> list[str]:
    """step-N folders of `prefix` with objects uploaded but no meta.json yet: a checkpoint being uploaded."""
    steps: dict[str, set[str]] = {}
    for key in s3.keys(prefix):
        parts = key[len(prefix):].strip("/").split("/")
        if len(parts) == 2 and parts[0].startswith("step-"):
            steps.setdefault(parts[0], set()).add(parts[1])
    return sorted(step for step, names in steps.items() if "meta.json" not in names)


def _run_killed_during_upload(s3, cmd, log: Path, prefix: str) -> str:
    """Start the stream and SIGKILL it the moment a step-N folder holds uploaded files but no meta.json: the
    launcher and its ranks at once, as a node that dies. (Killing the launcher's group alone leaves the ranks, in
    sessions of their own, up to a second before they notice; one whose peer died first then unwinds through its
    error path, which releases the run lock, and may start another upload: not the crash this test is about.)"""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        partial = _partial_steps(s3, prefix)
        if partial:
            for pid in descendants(proc.pid) | {proc.pid}:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
            time.sleep(0.5)  # the ranks' zombies reaped by init, their sockets closed
            return partial[0]
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"no checkpoint upload was caught in progress: {log.read_text()[-2000:]}")


def _s3_latest_tensors(s3, prefix: str, into: Path):
    """The tensors of the latest checkpoint under s3://bucket/prefix, downloaded and read as conftest does."""
    latest = s3.client.get_object(Bucket=s3.name, Key=f"{prefix}/latest")["Body"].read().decode().strip()
    folder = into / "checkpoints" / latest
    folder.mkdir(parents=True)
    (into / "checkpoints" / "latest").write_text(latest)
    for key in s3.keys(f"{prefix}/{latest}/"):
        s3.client.download_file(s3.name, key, str(folder / key.rsplit("/", 1)[1]))
    return latest_checkpoint_tensors(into)


def _valid_rows(root: Path) -> set[tuple[str, str, int, int]]:
    spec = load_config(DEFAULT_CONFIG).features
    rows = set()
    for day in DAYS:
        for file in sorted((root / f"day={day}").glob("*.parquet")):
            pf = pq.ParquetFile(file)
            for rg in range(pf.metadata.num_row_groups):
                verdict = validate_rows(pf.read_row_group(rg, columns=spec.columns()), spec, max_list_len=100_000)
                rows |= {(day, file.name, rg, int(r)) for r in verdict.good_B.nonzero()[0]}
    return rows


def test_s3_stream_killed_during_a_checkpoint_upload_resumes_and_trains_every_row_once(two_days, s3, tmp_path):
    root = s3.upload(two_days, "logs")
    reference = tmp_path / "reference"
    done = subprocess.run(_cmd(root, reference, reference / "checkpoints"), capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    out, checkpoints = tmp_path / "run", f"{s3.url}/run/checkpoints"
    cmd = _cmd(root, out, checkpoints)
    for attempt in range(5):  # until a kill lands before the upload's meta.json (the listing saw it in progress,
        # but the upload may finish before the signal does)
        partial = _run_killed_during_upload(s3, cmd, tmp_path / f"killed-{attempt}.log", "run/checkpoints")
        if partial in _partial_steps(s3, "run/checkpoints"):
            break
    assert partial in _partial_steps(s3, "run/checkpoints")  # the kill left a step folder without meta.json
    assert s3.keys("run/checkpoints/.lock")  # and its holder's lock, which no kernel drops on object storage
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "taking over from PID" in done.stderr  # a dead PID of this host: the lock is taken over at once
    assert not s3.keys("run/checkpoints/.lock")  # a clean exit deletes it

    tensors, meta = _s3_latest_tensors(s3, "run/checkpoints", tmp_path / "download")
    ref_tensors, _ = latest_checkpoint_tensors(reference)
    assert meta.progress.days_done == DAYS and ref_tensors.keys() == tensors.keys()
    for key, value in ref_tensors.items():
        assert torch.equal(value, tensors[key]), f"{key} differs from the uninterrupted run"
    assert not (out / "ledger").exists()  # beside the checkpoints: a pod restarted elsewhere finds it
    ledger = read_ledger(out, meta.per_rank("ledger"), ledger=f"{checkpoints}/ledger")
    trained = [(e["day"], Path(e["file"]).name, e["row_group"], row) for e in ledger
               for row in range(e["start"], e["stop"])]
    assert all(e["file"].startswith(f"{root}/day=") for e in ledger)
    assert len(trained) == len(set(trained)), "a row was trained twice"
    assert set(trained) == _valid_rows(two_days) and len(trained) == 4000
    for day in DAYS[1:]:  # and the progressive metrics are the uninterrupted run's
        mine = json.loads((out / "metrics" / f"progressive-{day}.json").read_text())["metrics"]
        ref = json.loads((reference / "metrics" / f"progressive-{day}.json").read_text())["metrics"]
        assert mine == ref
    assert read_meta(f"{checkpoints}/{meta.path.name}").step == meta.step  # read_meta takes an s3:// location


def test_s3_run_lock_is_one_writer_and_a_silent_holder_is_taken_over(s3, monkeypatch):
    records = location(f"{s3.url}/run/checkpoints")
    lock = records / ".lock"
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    first = ObjectLock(records)
    first.acquire()
    beat = json.loads(lock.read_text())["heartbeat"]
    with pytest.raises(RunDirInUse, match=f"in use by PID {os.getpid()} on "):
        ObjectLock(records).acquire()
    time.sleep(0.5)
    assert json.loads(lock.read_text())["heartbeat"] > beat  # the holder keeps its lease alive
    first.release()
    assert not s3.keys("run/checkpoints/.lock")  # released: deleted
    # a holder on another node that beats: refused; one silent for longer than the lease (a pod that died): taken
    s3.put("run/checkpoints/.lock", json.dumps({"host": "node-7", "pid": 1, "heartbeat": time.time()}).encode())
    with pytest.raises(RunDirInUse, match="in use by PID 1 on node-7"):
        ObjectLock(records).acquire()
    s3.put("run/checkpoints/.lock", json.dumps({"host": "node-7", "pid": 1, "heartbeat": time.time() - 600}).encode())
    second = ObjectLock(records)
    second.acquire()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    # taken over while it holds it (it fell silent past the lease): it stops beating and leaves the new lock alone
    s3.put("run/checkpoints/.lock", json.dumps({"host": "node-8", "pid": 2, "heartbeat": time.time()}).encode())
    time.sleep(0.5)
    second.release()
    assert json.loads(lock.read_text())["host"] == "node-8"
