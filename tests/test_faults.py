"""The run directory under faults, with real processes: `hyrank train --nproc-per-node 2` killed, signalled, and
started twice. One writer per run directory; no rank outlives its launcher; SIGTERM exits 0 with a checkpoint
from which the run finishes exactly as an uninterrupted one."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hyrank.pipeline.train.run_lock import RunDirInUse, RunLock

from conftest import DEFAULT_CONFIG, descendants, latest_checkpoint_tensors

pytestmark = pytest.mark.dist


def _cmd(synth_root, out_dir, *extra):
    return [sys.executable, "-m", "hyrank.pipeline.cli", "train", "--config", str(DEFAULT_CONFIG), "--quiet",
            "--nproc-per-node", "2", "--days", "2026-11-01", "--set", f'data.root="{synth_root}"',
            "--set", f'out_dir="{out_dir}"', "--set", "train.tensorboard=false", "--set", "train.log_every_steps=1",
            "--set", "model.options.hidden=[32]", *extra]


def _start(cmd, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "w") as f:  # its own session: the test can signal the launcher's whole group, as a scheduler does
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_for_step(proc, log: Path, step: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if f" step {step}/" in log.read_text():
            return
        assert proc.poll() is None, f"the run ended before step {step}:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} within {timeout_s} s:\n{log.read_text()[-3000:]}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_second_start_on_a_held_run_directory_is_refused(synth_root, tmp_path):
    with RunLock(tmp_path) as held:
        with pytest.raises(RunDirInUse, match=f"PID {os.getpid()}"):
            RunLock(tmp_path).acquire()
        proc = subprocess.run(_cmd(synth_root, tmp_path), capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode != 0
        assert f"is in use by PID {os.getpid()}" in proc.stdout + proc.stderr
        assert held.path.read_text()  # the refused start did not touch the holder's record
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # and wrote nothing into the run


def test_killing_the_launchers_group_kills_every_rank_and_frees_the_run(synth_root, tmp_path):
    log = tmp_path / "log.txt"
    proc = _start(_cmd(synth_root, tmp_path, "--set", "data.batch_size_per_rank=8"), log)
    try:
        _wait_for_step(proc, log, 3)
        ranks = descendants(proc.pid)
        assert len(ranks) >= 2, ranks
        os.killpg(proc.pid, signal.SIGKILL)  # what a scheduler does to a job: the group, not the ranks' sessions
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [p for p in ranks if _alive(p)]
        assert not survivors, f"ranks {survivors} outlived their launcher"
    finally:
        for p in descendants(proc.pid) | {proc.pid}:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    # the dead holder's lock is free again: this process takes it over. A killed rank's main thread shows as a
    # zombie while its other threads still exit, and the lock's file is closed with the last of them: a bounded wait
    deadline = time.monotonic() + 10
    while True:
        try:
            lock = RunLock(tmp_path)
            lock.acquire()
            break
        except RunDirInUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_sigterm_checkpoints_exits_0_and_the_resumed_run_ends_where_an_uninterrupted_one_does(synth_root, tmp_path):
    small = ["--set", "data.batch_size_per_rank=32", "--set", "checkpoint.every_steps=0"]
    reference = subprocess.run(_cmd(synth_root, tmp_path / "ref", *small), capture_output=True, text=True,
                               timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert reference.returncode == 0, reference.stdout[-2000:] + reference.stderr[-2000:]
    log = tmp_path / "log.txt"
    run = tmp_path / "run"
    proc = _start(_cmd(synth_root, run, *small), log)
    _wait_for_step(proc, log, 20)
    proc.send_signal(signal.SIGTERM)  # the launcher only, as Kubernetes signals a pod's first process
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    out = log.read_text()
    printed = re.search(r"stopped by SIGTERM at step (\d+): checkpoint", out)  # the launcher's line
    assert printed, out[-3000:]
    assert "continue with the same command and --resume latest" in out
    stopped_at = int(printed.group(1))
    assert 20 <= stopped_at < 93  # mid-day: 6000 rows / (2 x 32) = 93 steps
    assert (run / "checkpoints" / f"step-{stopped_at:09d}" / "meta.json").is_file()
    resumed = subprocess.run(_cmd(synth_root, run, *small, "--resume", "latest"), capture_output=True, text=True,
                             timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    (ref_state, _), (state, _) = latest_checkpoint_tensors(tmp_path / "ref"), latest_checkpoint_tensors(run)
    assert ref_state.keys() == state.keys()
    for key, value in ref_state.items():
        assert torch.equal(value, state[key]), f"{key} differs from the uninterrupted run"
    day = json.loads((run / "train" / "day-2026-11-01.json").read_text())
    ref_day = json.loads((tmp_path / "ref" / "train" / "day-2026-11-01.json").read_text())
    assert day["steps"] == ref_day["steps"] and day["losses"] == ref_day["losses"]  # the whole day, not the rest
