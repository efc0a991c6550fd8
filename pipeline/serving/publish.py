"""A publish root: version folders that are never rewritten, `latest` naming the one served, and a history of
every attempt to publish there.

    <root>/versions/<run id>-step-000000158[-int8]/   one published artifact (pipeline/serving/artifact.py)
    <root>/latest                                    the version a server follows, written last
    <root>/history.jsonl                             append-only: published (with how the quality gate went, or that
                                                     it was skipped, and by whom) and refused, one JSON line each

A version name is its run's id and step (and the tables' precision), so two runs never share one; a name already
published is never published again, so a server that follows `latest` never sees a version change under its name or
a folder missing while it is replaced. Imports no torch: the CLI reads QUALITY_MARGIN when it builds its parsers.

On object storage (`s3://bucket/prefix`, which has no rename) the version is staged in a local folder, uploaded
file by file into `versions/<version>/`, each object read back against the manifest's sha256, and only then is the
manifest created, conditionally (If-None-Match: a version already published is never rewritten), and `latest`
written: a reader that follows `latest` (or looks for a manifest) never sees a partial version, and an upload cut
short leaves files without a manifest, which is not a version. history.jsonl is rewritten whole (no append there).
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from hyrank.pipeline.files import sha256, write_atomic
from hyrank.pipeline.storage import S3Path, StorageError, upload

# the most a new model's held-out AUC may fall below the published one's: `hyrank export` and `stream --export-to`
QUALITY_MARGIN = 0.01
HISTORY = "history.jsonl"
MANIFEST = "manifest.json"  # a version's (pipeline/serving/artifact.py; this module imports no torch)


class NotPublished(ValueError):
    """An export that published nothing: the message says why."""


class VersionTaken(NotPublished):
    """The version name is already published from another checkpoint: a published version is never rewritten."""


def version_name(run_id: str, step: int, tables: str) -> str:
    return f"{run_id}-step-{step:09d}" + ("" if tables == "fp32" else f"-{tables}")


def staging_folder(root: Path | S3Path, version: str) -> Path:
    """A fresh hidden folder under versions/ to write a version into: unique, so two exports never share one (a
    local temporary folder for a root on object storage)."""
    if isinstance(root, S3Path):
        return Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp"))
    (root / "versions").mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=root / "versions"))


def publish(root: Path, staging: Path, version: str) -> Path:
    """Rename the checked version into place, then repoint `latest`: a reader sees the old version or the new. An
    existing version is never replaced (VersionTaken): the rename fails on a folder that holds a version, also one
    another export published since this one looked."""
    if isinstance(root, S3Path):
        return _publish_remote(root, staging, version)
    final = root / "versions" / version
    try:
        if final.exists():
            raise FileExistsError(final)
        staging.rename(final)
    except OSError as e:  # FileExistsError, or ENOTEMPTY from a rename racing another export of the same name
        raise VersionTaken(f"{final} is already published: a published version is never rewritten") from e
    write_atomic(root / "latest", version + "\n")
    return final


def _publish_remote(root: S3Path, staging: Path, version: str) -> S3Path:
    """Upload, verify, then create the manifest and repoint `latest` (module docstring)."""
    final = root / "versions" / version
    if (final / MANIFEST).is_file():
        raise VersionTaken(f"{final} is already published: a published version is never rewritten")
    manifest = json.loads((staging / MANIFEST).read_text())
    for name in sorted(manifest["files"]):
        upload(staging / name, final / name)
    for name, digest in sorted(manifest["files"].items()):
        if sha256(final / name) != digest:
            raise StorageError(f"{final / name} does not read back with the sha256 it was written with: not published")
    if not (final / MANIFEST).create_exclusive((staging / MANIFEST).read_bytes()):
        raise VersionTaken(f"{final} is already published: a published version is never rewritten")
    write_atomic(root / "latest", version + "\n")
    shutil.rmtree(staging, ignore_errors=True)
    return final


def published_manifest(root: Path | S3Path, version: str) -> dict[str, Any] | None:
    """The manifest of `version` if it is published under `root`, else None."""
    path = root / "versions" / version / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def delta_base(root: Path | S3Path, max_chain: int) -> str | None:
    """The version a new export is a delta of (`stream --export-delta`): the one `latest` names, while fewer than
    `max_chain` deltas lie between it and a full export; None (export in full) otherwise, or with nothing published
    or `max_chain` 0. A long chain costs each load one more base to read and apply: a full export bounds it."""
    pointer = root / "latest"
    if max_chain <= 0 or not pointer.is_file():
        return None
    version = pointer.read_text().strip()
    manifest = published_manifest(root, version)
    if manifest is None:
        return None
    return version if manifest.get("delta", {}).get("chain", 0) < max_chain else None


def record(root: Path | S3Path, event: dict[str, Any]) -> None:
    """One line of the root's history (append-only), stamped with the time."""
    line = json.dumps({"at": dt.datetime.now().isoformat(timespec="seconds"), **event}, default=str) + "\n"
    if isinstance(root, S3Path):  # no append on object storage: the history is rewritten with the line added
        path = root / HISTORY
        write_atomic(path, (path.read_text() if path.is_file() else "") + line)
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / HISTORY, "a") as f:
        f.write(line)


def who() -> str:
    """user@host, the process and its command line: who made a choice the history records."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no passwd entry
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()} (pid {os.getpid()}): {' '.join(sys.argv)}"
