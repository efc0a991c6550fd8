"""One writer per run directory: a second `hyrank train` (or a stray rank) on the same run is refused.

    with hold_run_dir(out_dir, env):     # every rank: rank 0 holds the lock, all raise if it is taken
        ...

An exclusive `flock` on `<run dir>/.lock`, which holds the holder's host, PID, command and start time. The kernel
drops the lock when its process dies however it dies (kill -9 included), so a gone holder is taken over by the
next start with a line saying so; a live one is named in the refusal. On NFS (v4) Linux maps flock onto POSIX
locks, which the server arbitrates across hosts.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path

from hyrank.pipeline.distributed.env import DistEnv

log = logging.getLogger(__name__)


class RunDirInUse(ValueError):
    """Another live process holds the run directory."""

    leaves_run_untouched = True  # the launcher's error relay writes no rank log into the holder's run


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunDirInUse(f"{self.path.parent} is in use by {_describe(holder)}; stop that run first, or give "
                              "this one another out_dir") from None
        previous = _read(fd)
        if previous:
            log.warning("%s: taking over from %s, which is gone", self.path.parent, _describe(previous))
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": dt.datetime.now().isoformat(
              timespec="seconds"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # a clean exit leaves no holder to "take over" from
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 65536, 0).decode() or "{}")
    except ValueError:
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return (f"PID {holder.get('pid')} on {holder.get('host')} since {holder.get('started_at')} "
            f"({holder.get('command', '')[:120]})")


@contextlib.contextmanager
def hold_run_dir(run_dir: str | Path, env: DistEnv):
    """Rank 0 holds the run directory's lock; every rank raises RunDirInUse if it is taken (collective)."""
    lock, refusal = RunLock(run_dir) if env.is_main else None, None
    if lock is not None:
        try:
            lock.acquire()
        except RunDirInUse as e:
            refusal = str(e)
    refusal = env.comm.broadcast_object(refusal)
    if refusal is not None:
        raise RunDirInUse(refusal)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
