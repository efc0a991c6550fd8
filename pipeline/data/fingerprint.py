"""Which version of a Parquet file a run read: its size and a hash of its footer, read without the data.

    fp = file_fingerprint(path)                    # FileFingerprint(size=..., footer="<sha256 hex>")
    file_changes({"part-0.parquet": old}, {"part-0.parquet": fp})   # ["part-0.parquet: size 9000 -> 9104 bytes"]

The footer (Parquet's FileMetaData, at the end of the file) holds every row group's byte offsets and sizes and
every column chunk's statistics (min, max, null count), so a file rewritten with other rows has another footer
even when its layout (row groups, rows in each) is the same, which is all the reader's cursor checks. It costs
one open and two small reads per file (the reader's footers pass opens every footer anyway: split.py
`read_footers` takes the fingerprints there), where a hash of the data would read the whole day again.

The limit: a rewrite that keeps every page size and every statistic (rows reordered inside a row group, with no
compression) keeps its footer and size. A file whose trailer is not Parquet's (a corrupt file, skipped under
data.on_corrupt_file = "skip") is fingerprinted by its last 64 KiB instead, so that fixing it counts as a change.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hyrank.pipeline.storage import is_remote, open_input

_MAGIC = b"PAR1"
_FALLBACK_BYTES = 1 << 16  # hashed from the end of a file without a Parquet trailer


@dataclass(frozen=True)
class FileFingerprint:
    size: int  # bytes
    footer: str  # sha256 hex of the footer, its length and the magic (the file's last 8 + length bytes)

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "footer": self.footer}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileFingerprint:
        return cls(int(d["size"]), str(d["footer"]))


def file_fingerprint(path: str | Path) -> FileFingerprint:
    """The file's size and the hash of its Parquet footer (see the module docstring); OSError if it cannot be
    opened."""
    remote = is_remote(path)
    with open_input(path) if remote else open(path, "rb") as f:
        size = f.size() if remote else os.fstat(f.fileno()).st_size
        f.seek(max(0, size - 8))
        tail = f.read(8)
        footer_len = int.from_bytes(tail[:4], "little") if len(tail) == 8 and tail[4:] == _MAGIC else -1
        start = size - 8 - footer_len if 0 <= footer_len <= size - 12 else max(0, size - _FALLBACK_BYTES)
        f.seek(start)
        return FileFingerprint(size, hashlib.sha256(f.read(size - start)).hexdigest())


def file_changes(recorded: dict[str, FileFingerprint], current: dict[str, FileFingerprint]) -> list[str]:
    """What differs between the files a run recorded and those there now (both by name or path), one line each:
    removed, added, another size, or the same size with another footer."""
    out = []
    for name in sorted(set(recorded) | set(current)):
        old, new = recorded.get(name), current.get(name)
        if new is None:
            out.append(f"{name}: removed")
        elif old is None:
            out.append(f"{name}: added ({new.size} bytes)")
        elif old.size != new.size:
            out.append(f"{name}: size {old.size} -> {new.size} bytes")
        elif old.footer != new.footer:
            out.append(f"{name}: same size ({new.size} bytes), another Parquet footer (other row groups or values)")
    return out
