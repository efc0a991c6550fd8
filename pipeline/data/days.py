"""Day partitions of a log root: which days exist, which are complete, and waiting for the next one.

    scan = scan_days(root, DayRange.parse("2026-11-01..2026-11-03"))    # found + skipped (and why)
    days = discover_days(root, DayRange.parse("2026-11-01..2026-11-03"))
    day = find_day(root, dt.date(2026, 11, 4))

Layout: `<root>/<partition_key>=YYYY-MM-DD/*.parquet` (hive style); a day is complete when `_SUCCESS` exists in
its folder. `scan_days` lists the files with pyarrow.dataset and reports every partition folder it skipped.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"

@dataclass(frozen=True)
class DayRange:
    """Inclusive range of days, parsed from `2026-11-01..2026-11-07` or a single `2026-11-01`."""

    first: dt.date
    last: dt.date

    @classmethod
    def parse(cls, text: str) -> "DayRange":
        parts = text.split("..")
        try:
            if len(parts) == 1:
                day = dt.date.fromisoformat(parts[0].strip())
                return cls(day, day)
            if len(parts) == 2:
                first, last = (dt.date.fromisoformat(p.strip()) for p in parts)
                if last < first:
                    raise ValueError("the last day is before the first")
                return cls(first, last)
        except ValueError as e:
            raise ValueError(f"bad day range {text!r}: {e} (expected YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD)") from e
        raise ValueError(f"bad day range {text!r} (expected YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD)")

    def __contains__(self, day: dt.date) -> bool:
        return self.first <= day <= self.last


@dataclass(frozen=True)
class DayPartition:
    day: dt.date
    path: Path
    complete: bool

    @property
    def files(self) -> list[Path]:
        return sorted(self.path.glob("*.parquet"))


@dataclass(frozen=True)
class SkippedDay:
    """A partition folder that discovery did not return, and why."""

    path: Path
    reason: str


@dataclass
class DayScan:
    """What `scan_days` found (oldest first) and what it skipped."""

    found: list[DayPartition]
    skipped: list[SkippedDay]

    def summary(self) -> str:
        lines = [f"found {len(self.found)} day(s): " + ", ".join(
            f"{d.day}{'' if d.complete else ' (incomplete)'}" for d in self.found)]
        lines += [f"skipped {s.path.name}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def scan_days(root: str | Path, days: DayRange | None = None, *, partition_key: str = "day",
              require_success: bool = True) -> DayScan:
    """Day partitions under `root` in the range, and the folders skipped with the reason (not complete, ...)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root not found: {root}")
    files_by_value = _parquet_files_by_partition(root, partition_key)
    found, skipped = [], []
    prefix = f"{partition_key}="
    for path in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix)):
        value = path.name[len(prefix):]
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            skipped.append(SkippedDay(path, f"{value!r} is not a YYYY-MM-DD date (an unfinished write?)"))
            continue
        try:
            day = dt.date.fromisoformat(value)
        except ValueError:
            skipped.append(SkippedDay(path, f"{value!r} is not a valid date"))
            continue
        if days is not None and day not in days:
            continue
        complete = (path / SUCCESS).exists()
        if require_success and not complete:
            skipped.append(SkippedDay(path, f"no {SUCCESS} marker: the day is not complete"))
            continue
        if not files_by_value.get(value):  # kept, not skipped: a "complete" empty day is an upstream bug
            log.warning("%s is marked complete but holds no .parquet files", path)
        found.append(DayPartition(day, path, complete))
    return DayScan(found, skipped)


def _parquet_files_by_partition(root: Path, partition_key: str) -> dict[str, list[str]]:
    """partition value -> its .parquet files, listed by pyarrow.dataset with hive partitioning (one listing)."""
    partitioning = ds.partitioning(pa.schema([(partition_key, pa.string())]), flavor="hive")
    # An explicit schema: discovery must not open any file (a corrupt one is the reader's to report, by path).
    # The listing skips `_SUCCESS` and hidden files.
    dataset = ds.dataset(root, format="parquet", partitioning=partitioning,
                         schema=pa.schema([(partition_key, pa.string())]))
    out: dict[str, list[str]] = {}
    for fragment in dataset.get_fragments():
        value = ds.get_partition_keys(fragment.partition_expression).get(partition_key)
        if value is not None and fragment.path.endswith(".parquet"):
            out.setdefault(str(value), []).append(fragment.path)
    return out


def discover_days(root: str | Path, days: DayRange | None = None, *, partition_key: str = "day",
                  require_success: bool = True) -> list[DayPartition]:
    """Day folders under `root` in the range, oldest first; incomplete ones only if `require_success` is off.

    What was skipped, and why, is logged (see `scan_days` for the report itself).
    """
    scan = scan_days(root, days, partition_key=partition_key, require_success=require_success)
    for s in scan.skipped:
        log.warning("skipped %s: %s", s.path, s.reason)
    log.info("%s", scan.summary().splitlines()[0])
    return scan.found


def find_day(root: str | Path, day: dt.date, *, partition_key: str = "day",
             require_success: bool = True) -> DayPartition:
    """The partition of one day, or a FileNotFoundError saying why it cannot be used."""
    path = Path(root) / f"{partition_key}={day.isoformat()}"
    if not path.is_dir():
        raise FileNotFoundError(f"no partition for {day} under {root} (expected {path})")
    complete = (path / SUCCESS).exists()
    if require_success and not complete:
        raise FileNotFoundError(f"{path} has no {SUCCESS} marker: the day is not complete")
    return DayPartition(day, path, complete)


def next_complete_day(root: str | Path, after: dt.date, *, partition_key: str = "day", timeout_s: float = 0.0,
                      poll_s: float = 30.0) -> DayPartition | None:
    """The earliest complete day after `after`, waiting up to `timeout_s` for one to appear; None on timeout."""
    deadline = time.monotonic() + timeout_s
    window = DayRange(after + dt.timedelta(days=1), dt.date.max)
    while True:
        if Path(root).is_dir():
            found = scan_days(root, window, partition_key=partition_key).found
            if found:
                return found[0]
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(poll_s, left))


