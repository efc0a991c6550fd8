"""A publish root: version folders that are never rewritten, `latest` naming the one served, and a history of
every attempt to publish there.

    <root>/versions/<run id>-step-000000158[-int8]/   one published artifact (pipeline/serving/artifact.py)
    <root>/latest                                    the version a server follows, written last
    <root>/history.jsonl                             append-only: published (with how the quality gate went, or that
                                                     it was skipped, and by whom) and refused, one JSON line each

A version name is its run's id and step (and the tables' precision), so two runs never share one; a name already
published is never published again, so a server that follows `latest` never sees a version change under its name or
a folder missing while it is replaced. Imports no torch: the CLI reads QUALITY_MARGIN when it builds its parsers.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from hyrank.pipeline.files import write_atomic

# the most a new model's held-out AUC may fall below the published one's: `hyrank export` and `stream --export-to`
QUALITY_MARGIN = 0.01
HISTORY = "history.jsonl"


class NotPublished(ValueError):
    """An export that published nothing: the message says why."""


class VersionTaken(NotPublished):
    """The version name is already published from another checkpoint: a published version is never rewritten."""


def version_name(run_id: str, step: int, tables: str) -> str:
    return f"{run_id}-step-{step:09d}" + ("" if tables == "fp32" else f"-{tables}")


def staging_folder(root: Path, version: str) -> Path:
    """A fresh hidden folder under versions/ to write a version into: unique, so two exports never share one."""
    (root / "versions").mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=root / "versions"))


def publish(root: Path, staging: Path, version: str) -> Path:
    """Rename the checked version into place, then repoint `latest`: a reader sees the old version or the new. An
    existing version is never replaced (VersionTaken): the rename fails on a folder that holds a version, also one
    another export published since this one looked."""
    final = root / "versions" / version
    try:
        if final.exists():
            raise FileExistsError(final)
        staging.rename(final)
    except OSError as e:  # FileExistsError, or ENOTEMPTY from a rename racing another export of the same name
        raise VersionTaken(f"{final} is already published: a published version is never rewritten") from e
    write_atomic(root / "latest", version + "\n")
    return final


def published_manifest(root: Path, version: str) -> dict[str, Any] | None:
    """The manifest of `version` if it is published under `root`, else None."""
    path = root / "versions" / version / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def delta_base(root: Path, max_chain: int) -> str | None:
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


def record(root: Path, event: dict[str, Any]) -> None:
    """One line of the root's history (append-only), stamped with the time."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / HISTORY, "a") as f:
        f.write(json.dumps({"at": dt.datetime.now().isoformat(timespec="seconds"), **event}, default=str) + "\n")


def who() -> str:
    """user@host, the process and its command line: who made a choice the history records."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no passwd entry
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()} (pid {os.getpid()}): {' '.join(sys.argv)}"
