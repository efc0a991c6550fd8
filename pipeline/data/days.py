"""Day partitions of a log root: which days exist, which are complete, and waiting for the next one.

    scan = scan_days(root, DayRange.parse("2026-11-01..2026-11-03"))    # found + skipped (and why)
    gaps = missing_days(DayRange.parse("2026-11-01..2026-11-03"), scan)  # days of the range not there whole, and why
    describe_missing(gaps)                                                # them in one line, however many
    days = discover_days(root, DayRange.parse("2026-11-01..2026-11-03"))   # found; logs what was skipped or missing
    day = find_day(root, dt.date(2026, 11, 4))

Layout: `<root>/<partition_key>=YYYY-MM-DD/*.parquet` (hive style); a day is complete when `_SUCCESS` exists in
its folder. `scan_days` lists the files with pyarrow.dataset and reports every partition folder it skipped;
`missing_days` turns that into the calendar days of a range that will not be read whole (no folder, no `_SUCCESS`,
no .parquet file), so a range with holes is not trained across the gap without a word.

`root` may be `s3://bucket/prefix` (pipeline/storage.py): the same layout, found by listing the prefix, with
`_SUCCESS` an object of the day's prefix.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from hyrank.pipeline.storage import S3Path, arrow_dataset_source, location

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
MAX_NAMED_MISSING = 6  # missing days of a range named one by one, each with its reason; more are summarised

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

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}..{self.last}"

    def dates(self) -> list[dt.date]:
        """Every calendar day of the range, oldest first (a bounded range: one to train on, not a polling window)."""
        return [self.first + dt.timedelta(days=i) for i in range((self.last - self.first).days + 1)]


@dataclass(frozen=True)
class DayPartition:
    day: dt.date
    path: Path | S3Path
    complete: bool

    @property
    def files(self) -> list[Path | S3Path]:
        return sorted(self.path.glob("*.parquet"))

    @property
    def label(self) -> str:
        """How runs name what they read: the day, YYYY-MM-DD."""
        return self.day.isoformat()

    @property
    def days(self) -> list[str]:
        return [self.label]

    def days_of(self) -> list["DayPartition"]:
        """The partitions read: this one."""
        return [self]


@dataclass(frozen=True)
class DaySpan:
    """Consecutive days read as one set: their files in day order, split across ranks and batched as one day's are.

    Evaluating a span gives exact metrics over all of its rows (`--eval-days A..B`); training many small days as
    spans keeps batches full (`group_days`). It reads like a DayPartition: `day` (the first, which seeds the
    shuffle), `label` ("A..B"), `path` (the first day's folder, for messages), `files`, `days`.
    """

    parts: tuple[DayPartition, ...]

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("a span of days needs at least one day")

    @property
    def day(self) -> dt.date:
        return self.parts[0].day

    @property
    def path(self) -> Path | S3Path:
        return self.parts[0].path

    @property
    def complete(self) -> bool:
        return all(p.complete for p in self.parts)

    @property
    def files(self) -> list[Path | S3Path]:
        return [f for p in self.parts for f in p.files]

    @property
    def label(self) -> str:
        first, last = self.parts[0].label, self.parts[-1].label
        return first if len(self.parts) == 1 else f"{first}..{last}"

    @property
    def days(self) -> list[str]:
        return [p.label for p in self.parts]

    def days_of(self) -> list[DayPartition]:
        """The partitions read, in order."""
        return list(self.parts)


Days = DayPartition | DaySpan  # what a reader reads and a trainer trains or evaluates as one unit


def as_span(days: list[DayPartition]) -> Days:
    """One day as itself, several as a DaySpan."""
    if not days:
        raise ValueError("no day to read")
    return days[0] if len(days) == 1 else DaySpan(tuple(days))


@dataclass(frozen=True)
class SkippedDay:
    """A partition folder that discovery did not return, and why."""

    path: Path | S3Path
    reason: str
    day: dt.date | None = None  # the day it would have been; None when the folder name is not a date


@dataclass
class DayScan:
    """What `scan_days` found (oldest first) and what it skipped."""

    found: list[DayPartition]
    skipped: list[SkippedDay]
    empty: list[DayPartition] = field(default_factory=list)  # found, but holding no .parquet file

    def summary(self) -> str:
        lines = [f"found {len(self.found)} day(s): " + ", ".join(
            f"{d.day}{'' if d.complete else ' (incomplete)'}" for d in self.found)]
        lines += [f"skipped {s.path.name}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def scan_days(root: str | Path, days: DayRange | None = None, *, partition_key: str = "day",
              require_success: bool = True) -> DayScan:
    """Day partitions under `root` in the range, and the folders skipped with the reason (not complete, ...)."""
    root = location(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root not found: {root}")
    files_by_value = _parquet_files_by_partition(root, partition_key)
    found, skipped, empty = [], [], []
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
            skipped.append(SkippedDay(path, f"no {SUCCESS} marker: the day is not complete", day))
            continue
        found.append(DayPartition(day, path, complete))
        if not files_by_value.get(value):  # kept, not skipped: a "complete" empty day is an upstream bug
            empty.append(found[-1])
    return DayScan(found, skipped, empty)


def _parquet_files_by_partition(root: Path | S3Path, partition_key: str) -> dict[str, list[str]]:
    """partition value -> its .parquet files, listed by pyarrow.dataset with hive partitioning (one listing)."""
    partitioning = ds.partitioning(pa.schema([(partition_key, pa.string())]), flavor="hive")
    # An explicit schema: discovery must not open any file (a corrupt one is the reader's to report, by path).
    # The listing skips `_SUCCESS` and hidden files.
    source, filesystem = arrow_dataset_source(root)
    dataset = ds.dataset(source, filesystem=filesystem, format="parquet", partitioning=partitioning,
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
        if days is None or s.day is None:  # a dated folder is a day of the range: named with the gaps below
            log.warning("skipped %s: %s", s.path, s.reason)
    if days is None:
        for d in scan.empty:
            log.warning("%s is marked complete but holds no .parquet files", d.path)
    elif gaps := missing_days(days, scan, partition_key=partition_key):
        log.warning("%d of the %d day(s) of %s under %s are missing or incomplete: %s", len(gaps), len(days.dates()),
                    days, root, describe_missing(gaps))
    log.info("%s", scan.summary().splitlines()[0])
    return scan.found


@dataclass(frozen=True)
class MissingDay:
    """A calendar day of a range that will not be read whole, and why."""

    day: dt.date
    reason: str


def missing_days(days: DayRange, scan: DayScan, *, partition_key: str = "day") -> list[MissingDay]:
    """Every day of `days` (a bounded range) that `scan` did not find complete with data, oldest first: no
    partition folder, no `_SUCCESS` marker (skipped, or read as it is when `require_success` is off) or no .parquet
    files."""
    found = {d.day: d for d in scan.found}
    skipped = {s.day: s.reason for s in scan.skipped if s.day is not None}
    empty = {d.day for d in scan.empty}
    out = []
    for day in days.dates():
        if day in skipped:
            reasons = [skipped[day]]
        elif day not in found:
            reasons = [f"no folder {partition_key}={day}"]
        else:
            reasons = [] if found[day].complete else [f"no {SUCCESS} marker: read as it is (require_success is off)"]
            reasons += ["no .parquet files in its folder"] if day in empty else []
        if reasons:
            out.append(MissingDay(day, "; ".join(reasons)))
    return out


def describe_missing(gaps: list[MissingDay], *, edge: int = MAX_NAMED_MISSING // 2) -> str:
    """Missing days in one line: each with its reason when there are at most MAX_NAMED_MISSING; else how many, the
    first and last `edge`, the longest run of consecutive missing days and the count per reason. A sparse calendar
    (22 years of daily folders with data on a few days) printed a line per missing day, thousands, before the rest.
    """
    if len(gaps) <= MAX_NAMED_MISSING:
        return "; ".join(f"{g.day}: {g.reason}" for g in gaps)
    longest = run = (gaps[0].day, gaps[0].day)
    for g in gaps[1:]:
        run = (run[0], g.day) if g.day == run[1] + dt.timedelta(days=1) else (g.day, g.day)
        if run[1] - run[0] > longest[1] - longest[0]:
            longest = run
    length = (longest[1] - longest[0]).days + 1
    # the reason without its day ("no folder day=2026-11-03" -> "no folder"), so that days of one reason count as one
    reasons = Counter(re.sub(r" \S+=\d{4}-\d{2}-\d{2}", "", g.reason) for g in gaps)
    return (f"{len(gaps)} days, first {', '.join(str(g.day) for g in gaps[:edge])}, last "
            f"{', '.join(str(g.day) for g in gaps[-edge:])}; longest gap {longest[0]}..{longest[1]} ({length} "
            f"day(s)); {'; '.join(f'{reason}: {n}' for reason, n in reasons.most_common())}")


def find_day(root: str | Path, day: dt.date, *, partition_key: str = "day",
             require_success: bool = True) -> DayPartition:
    """The partition of one day, or a FileNotFoundError saying why it cannot be used."""
    path = location(root) / f"{partition_key}={day.isoformat()}"
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
        if location(root).is_dir():
            found = scan_days(root, window, partition_key=partition_key).found
            if found:
                return found[0]
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(poll_s, left))


