"""Files a crash must never leave half-written: write beside the target, fsync, rename over it.

    write_atomic(path, "text")                                   # str or bytes
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))   # any writer that takes a path

An s3:// path (pipeline/storage.py) is written by one PUT, which object storage makes atomic per object.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hyrank.pipeline.storage import S3Path, is_remote, location


def write_atomic(path: str | Path | S3Path, data: str | bytes | Callable[[Path], Any]) -> Path | S3Path:
    """Write `data` to `path` so that readers see the old file or the new one, never a part of it."""
    if is_remote(path):
        return _put(S3Path(str(path)), data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if callable(data):
        data(tmp)
    else:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    with open(tmp, "rb+") as f:  # also what a writer callback wrote must be on disk before the rename
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _put(path: S3Path, data: str | bytes | Callable[[Path], Any]) -> S3Path:
    if callable(data):  # a writer that needs a local file: write it here, then upload it in one PUT
        with tempfile.TemporaryDirectory(prefix="hyrank-put-") as tmp:
            local = Path(tmp) / path.name
            data(local)
            data = local.read_bytes()
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def write_json(path: str | Path | S3Path, obj: Any) -> Path | S3Path:
    """`obj` as indented JSON, atomically."""
    return write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def sha256(path: str | Path | S3Path) -> str:
    """The file's SHA-256, hex (read in 4 MiB chunks: checkpoints and artifacts can be large)."""
    if is_remote(path):
        return location(path).sha256()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
