"""One writer per run directory: a second `hyrank train` (or a stray rank) on the same run is refused.

    with hold_run_dir(out_dir, env):     # every rank: rank 0 holds the lock, all raise if it is taken
        ...

An exclusive `flock` on `<run dir>/.lock`, which holds the holder's host, PID, command and start time. The kernel
drops the lock when its process dies however it dies (kill -9 included), so a gone holder is taken over by the
next start with a line saying so; a live one is named in the refusal. On NFS (v4) Linux maps flock onto POSIX
locks, which the server arbitrates across hosts.

Checkpoints on object storage (`checkpoint.dir = "s3://..."`, where pods share no disk) are locked there too: the
object `<checkpoint dir>/.lock` is created with a conditional PUT (If-None-Match: *), which the store grants to one
writer only. No kernel drops it when its holder dies, so the holder rewrites it every HEARTBEAT_S with the time; a
lock whose holder is a dead PID of this host, or whose heartbeat is older than LEASE_S (a pod on another node that
died), is taken over with a line saying so. A clean exit deletes it.
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
import threading
import time
from pathlib import Path

from hyrank.pipeline.distributed.env import DistEnv
from hyrank.pipeline.storage import S3Path, is_remote, location

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


HEARTBEAT_S, LEASE_S = 15.0, 90.0  # a holder silent for LEASE_S is gone (six heartbeats missed)


class ObjectLock:
    """The run lock on object storage: a conditionally created `.lock` object with a heartbeat (module docstring).
    Every write after the create is conditional on the ETag this holder last wrote (If-Match), so of two starts
    that find the same gone holder only one takes over, and a holder whose lock was taken over stops beating."""

    def __init__(self, records: S3Path):
        self.path = records / ".lock"
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._etag: str | None = None

    def acquire(self) -> None:
        me = _me()
        self._etag = self.path.create_exclusive(_encode(me))
        while self._etag is None:
            found = self.path.read_with_etag()
            if found is None:  # released since: create it again
                self._etag = self.path.create_exclusive(_encode(me))
                continue
            holder = _decode(found[0])
            if not _gone(holder):
                raise RunDirInUse(f"{self.path.parent} is in use by {_describe(holder)} (lock {self.path}, heartbeat "
                                  f"{holder.get('heartbeat_age', '?')} s ago); stop that run first, or give this one "
                                  "another checkpoint.dir")
            self._etag = self.path.replace_if(_encode(me), found[1])
            if self._etag is None:  # another start took it over first
                raise RunDirInUse(f"{self.path.parent} is in use by another start that took over from "
                                  f"{_describe(holder)}")
            log.warning("%s: taking over from %s, which is gone", self.path.parent, _describe(holder))
        self._beat = threading.Thread(target=self._heartbeat, args=(me,), name="run-lock-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self, me: dict) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                etag = self.path.replace_if(_encode(me), self._etag)
            except OSError as e:  # a store briefly unreachable: the lease allows several missed beats
                log.warning("%s: heartbeat not written: %s", self.path, e)
                continue
            if etag is None:
                log.error("%s: the run lock was taken over by another start (this run was silent for longer than "
                          "%.0f s): two writers may now share %s", self.path, LEASE_S, self.path.parent)
                self._etag = None
                return
            self._etag = etag

    def release(self) -> None:
        if self._beat is not None:
            self._stop.set()
            self._beat.join()
            self._beat = None
            if self._etag is not None:  # still ours: a lock taken over is the new holder's to delete
                self.path.unlink(missing_ok=True)


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started_at": dt.datetime.now().isoformat(
            timespec="seconds"), "command": " ".join(sys.argv)}


def _encode(me: dict) -> bytes:
    return (json.dumps({**me, "heartbeat": time.time()}) + "\n").encode()


def _decode(data: bytes) -> dict:
    try:
        holder = json.loads(data.decode() or "{}")
    except ValueError:
        return {}
    holder["heartbeat_age"] = round(time.time() - float(holder.get("heartbeat", 0)))
    return holder


def _gone(holder: dict) -> bool:
    """The holder of an object lock is gone: a dead PID of this host, or silent for longer than the lease."""
    if holder.get("heartbeat_age", LEASE_S + 1) > LEASE_S:
        return True
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError):
            return False
    return False


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
def hold_run_dir(run_dir: str | Path, env: DistEnv, records: str | Path | S3Path | None = None):
    """Rank 0 holds the run directory's lock, and the object lock of `records` (the checkpoint folder) when that
    is on object storage; every rank raises RunDirInUse if either is taken (collective)."""
    locks = []
    if env.is_main:
        locks.append(RunLock(run_dir))
        if records is not None and is_remote(records):
            locks.append(ObjectLock(location(records)))
    refusal, held = None, []
    for lock in locks:
        try:
            lock.acquire()
            held.append(lock)
        except RunDirInUse as e:
            refusal = str(e)
            break
    refusal = env.comm.broadcast_object(refusal)
    try:
        if refusal is not None:
            raise RunDirInUse(refusal)
        yield
    finally:
        for lock in reversed(held):
            lock.release()
