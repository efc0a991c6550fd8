"""MovieLens-100K as day-partitioned click logs: one row per rating, label `click` = rating >= 4.

    hyrank import movielens-100k --out data/ml100k            # --src defaults to ../shared/data/movielens-100k
    summary = import_movielens(src, "data/ml100k", max_len=100)   # the same from Python; summary.lines() to print

Reads the files as GroupLens ships them (u.data, u.user, u.item, u.genre, u.occupation; research use only, so the
data is never committed or downloaded here) and writes `<out>/day=YYYY-MM-DD/part-00000.parquet` plus `_SUCCESS`
for each UTC day of a rating timestamp (1997-09-20..1998-04-22; 1997-12-11 and 1997-12-16 have no rating and so
no folder), then `<out>/_import.json` (sources with their sha256, options, counts, columns). Each day is written
to `day=....tmp`, `_SUCCESS` included, and renamed into place: a re-run replaces days whole, a crash leaves at
most a `.tmp` folder that readers skip and the next run removes. Same input, identical files.

Columns (rows ordered by timestamp, then user, then item; every rating is a row, none is dropped):
  ts                 int64         Unix seconds (UTC) of the rating; not a feature
  rating             int64         1..5, the source of the label: never a feature
  click              int8          rating >= 4
  user_id            int64         u.user id (1..943)
  user_age_bucket    int64         0..6: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+
  user_gender        int64         0 M, 1 F
  user_occupation    int64         line of u.occupation, from 0
  user_zip3          int64         the user's zip prefix (first 3 characters) as its index among u.user's
                                   distinct prefixes, sorted (0..381; the list is in _import.json)
  item_id            int64         u.item id (1..1682)
  item_genres        list<int64>   the item's genres (u.genre ids 0..18; an item with none is "unknown", 0)
  item_primary_genre int64         the item's rarest genre in the catalogue (ties: lower id): one genre per item
  item_year_bucket   int64         release year: 0 unknown, 1 <1940, 2..5 the 1940s..1970s, 6 the 1980s,
                                   7..15 each year 1990..1998 (8 = 1991, ...; 1998 and later are 15)
  hour, weekday      int64         UTC hour 0..23 and weekday 0..6 (Monday 0) of the rating
  user_prior_ratings float32       the user's ratings strictly before this one (all of them, not truncated)
  item_prior_ratings float32       the item's ratings, by any user, strictly before this one
  hist_item_ids      list<int64>   the items the user rated strictly before this rating, oldest first, the most
  hist_item_genres   list<int64>     recent `max_len` of them; aligned: each one's primary genre
  click_item_ids     list<int64>   the same over the user's earlier ratings >= 4 (the click sequence)
  click_item_genres  list<int64>

"Strictly before" is by timestamp: ratings of the same second (half of MovieLens-100K's ratings share their
second with the user's previous one) are never in each other's sequences; earlier events of one second are in
item order. The sequences are built for all rows at once (`earlier_events`: a sort and two searchsorted).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hyrank.pipeline.data.days import SUCCESS, DayRange
from hyrank.pipeline.files import sha256, write_atomic, write_json

FILES = ("u.data", "u.user", "u.item", "u.genre", "u.occupation")
DEFAULT_MAX_LEN = 100
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens-1M's age groups
YEAR_EDGES = (1940, 1950, 1960, 1970, 1980, 1990, 1991, 1992, 1993, 1994, 1995, 1996, 1997, 1998)
NUM_AGE_BUCKETS = len(AGE_EDGES) + 1
NUM_YEAR_BUCKETS = len(YEAR_EDGES) + 2  # unknown + one more than the edges
# Time-ordered split of the 100k ratings (~80/10/10): train on the past, validate and test on what followed
SPLITS = {
    "train": DayRange(dt.date(1997, 9, 20), dt.date(1998, 3, 7)),
    "validate": DayRange(dt.date(1998, 3, 8), dt.date(1998, 3, 31)),
    "test": DayRange(dt.date(1998, 4, 1), dt.date(1998, 4, 22)),
}
_EPOCH = dt.date(1970, 1, 1)


def default_source() -> Path | None:
    """`../shared/data/movielens-100k` beside the repository, if it is there."""
    path = Path(__file__).resolve().parents[4] / "shared" / "data" / "movielens-100k"
    return path if path.is_dir() else None


# -- reading -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MovieLens:
    """The dataset as read: ratings in file order; user and item attributes indexed by their raw id."""

    user: np.ndarray  # (R,) int64, per rating
    item: np.ndarray
    rating: np.ndarray
    ts: np.ndarray
    user_age: np.ndarray  # (max user id + 1,) int64
    user_gender: np.ndarray
    user_occupation: np.ndarray
    user_zip3: np.ndarray  # by user id: index into zip3_vocab
    item_genres: np.ndarray  # (max item id + 1, number of genres) bool
    item_year: np.ndarray  # (max item id + 1,) int64, 0 when unknown
    genres: list[str]
    occupations: list[str]
    zip3_vocab: list[str]  # the distinct zip prefixes of u.user, sorted


def read_movielens(src: str | Path) -> MovieLens:
    """Read and check the five files; a bad line raises ValueError naming the file, the line and the field."""
    src = Path(src)
    missing = [name for name in FILES if not (src / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{src} is not MovieLens-100K as GroupLens ships it: {', '.join(missing)} missing "
                                f"(expected {', '.join(FILES)})")
    occupations = [fields[0] for _, fields in _lines(src / "u.occupation", 1)]
    genres = _read_genres(src / "u.genre")
    age, gender, occupation, zip3, zip3_vocab = _read_users(src / "u.user", occupations)
    item_genres, item_year = _read_items(src / "u.item", len(genres))
    user, item, rating, ts = _read_ratings(src / "u.data", known_users=age >= 0, known_items=item_year >= 0)
    return MovieLens(user, item, rating, ts, user_age=age, user_gender=gender, user_occupation=occupation,
                     user_zip3=zip3, item_genres=item_genres, item_year=np.maximum(item_year, 0), genres=genres,
                     occupations=occupations, zip3_vocab=zip3_vocab)


def _lines(path: Path, num_fields: int):
    """(line number, fields) of each non-empty '|'-separated line. MovieLens' text is Latin-1."""
    for number, line in enumerate(path.read_text(encoding="latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) != num_fields:
            raise ValueError(f"{path}:{number}: expected {num_fields} '|'-separated fields, got {len(fields)}")
        yield number, fields


def _int(path: Path, number: int, name: str, text: str, low: int = 0) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{path}:{number}: field {name!r} is not an integer: {text!r}") from None
    if value < low:
        raise ValueError(f"{path}:{number}: field {name!r} must be >= {low}, got {value}")
    return value


def _read_genres(path: Path) -> list[str]:
    pairs = [(_int(path, n, "genre id", f[1]), f[0]) for n, f in _lines(path, 2)]
    if [i for i, _ in pairs] != list(range(len(pairs))):
        raise ValueError(f"{path}: genre ids must be 0, 1, 2, ... in order, got {[i for i, _ in pairs]}")
    return [name for _, name in pairs]


def _read_users(path: Path, occupations: list[str]):
    """(age, gender, occupation, zip3 index) by user id, and the zip3 vocabulary; age -1 marks an id no user
    has."""
    rows = []
    for n, (uid, age, gender, occupation, zip_code) in _lines(path, 5):
        if gender not in ("M", "F"):
            raise ValueError(f"{path}:{n}: field 'gender' must be M or F, got {gender!r}")
        if occupation not in occupations:
            raise ValueError(f"{path}:{n}: field 'occupation' {occupation!r} is not in u.occupation")
        rows.append((_int(path, n, "user id", uid), _int(path, n, "age", age), int(gender == "F"),
                     occupations.index(occupation), zip_code.strip()[:3].upper(), n))
    size = _check_unique_ids(path, [(r[0], r[5]) for r in rows]) + 1
    vocab = sorted({r[4] for r in rows})
    index = {z: i for i, z in enumerate(vocab)}
    age, gender, occupation, zip3 = (np.full(size, -1, dtype=np.int64) for _ in range(4))
    for uid, a, g, o, z, _ in rows:
        age[uid], gender[uid], occupation[uid], zip3[uid] = a, g, o, index[z]
    return age, gender, occupation, zip3, vocab


def _read_items(path: Path, num_genres: int) -> tuple[np.ndarray, np.ndarray]:
    """(genre flags, release year) by item id; year -1 marks an id no item has, 0 an unknown release date."""
    rows = []
    for n, fields in _lines(path, 5 + num_genres):
        date = fields[2].strip()
        year = _int(path, n, "release date", date.rsplit("-", 1)[-1], low=1) if date else 0
        flags = [_int(path, n, f"genre {g}", fields[5 + g]) for g in range(num_genres)]
        if max(flags) > 1:
            raise ValueError(f"{path}:{n}: genre flags must be 0 or 1, got {flags}")
        rows.append((_int(path, n, "movie id", fields[0]), year, flags, n))
    size = _check_unique_ids(path, [(r[0], r[3]) for r in rows]) + 1
    genres = np.zeros((size, num_genres), dtype=bool)
    year = np.full(size, -1, dtype=np.int64)
    for iid, y, flags, _ in rows:
        genres[iid], year[iid] = flags, y
    real = year >= 0
    genres[real & ~genres.any(1), 0] = True  # no genre flagged: the "unknown" genre, id 0
    return genres, year


def _check_unique_ids(path: Path, ids: list[tuple[int, int]]) -> int:
    """The largest id; a repeated one raises naming both lines."""
    seen: dict[int, int] = {}
    for value, number in ids:
        if value in seen:
            raise ValueError(f"{path}:{number}: id {value} already defined on line {seen[value]}")
        seen[value] = number
    if not seen:
        raise ValueError(f"{path}: no rows")
    return max(seen)


def _read_ratings(path: Path, known_users: np.ndarray, known_items: np.ndarray):
    try:
        data = np.loadtxt(path, dtype=np.int64, delimiter="\t", ndmin=2)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if data.shape[1] != 4 or not len(data):
        raise ValueError(f"{path}: expected rows of 4 tab-separated integers (user, item, rating, timestamp), "
                         f"got {data.shape[0]} rows of {data.shape[1]}")
    user, item, rating, ts = data.T.copy()
    checks = [
        ("user id", user, "is not in u.user", ~_known(known_users, user)),
        ("item id", item, "is not in u.item", ~_known(known_items, item)),
        ("rating", rating, "is not in 1..5", (rating < 1) | (rating > 5)),
        ("timestamp", ts, "is not in [0, 2^32)", (ts < 0) | (ts >= 1 << 32)),
    ]
    for name, values, problem, bad in checks:
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(f"{path}:{row + 1}: {name} {values[row]} {problem} ({int(bad.sum())} such line(s))")
    return user, item, rating, ts


def _known(known: np.ndarray, ids: np.ndarray) -> np.ndarray:
    inside = (ids >= 0) & (ids < len(known))
    return inside & known[np.where(inside, ids, 0)]


# -- sequences -----------------------------------------------------------------------------------------------------


def _key(group: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """(group, ts) as one sortable int64; groups in [0, 2^31), timestamps in [0, 2^32)."""
    group, ts = np.asarray(group, dtype=np.int64), np.asarray(ts, dtype=np.int64)
    if len(group) and (group.min() < 0 or group.max() >= 1 << 31 or ts.min() < 0 or ts.max() >= 1 << 32):
        raise ValueError("ids must be in [0, 2^31) and timestamps in [0, 2^32)")
    return (group << 32) | ts


def earlier_bounds(event_group: np.ndarray, event_ts: np.ndarray, row_group: np.ndarray,
                   row_ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, end) per row: events[first:end] are the events of the row's group with a timestamp strictly
    before the row's. Events must be sorted by (group, timestamp); rows may come in any order."""
    events = _key(event_group, event_ts)
    if len(events) > 1 and (events[1:] < events[:-1]).any():
        raise ValueError("events must be sorted by (group, timestamp)")
    end = np.searchsorted(events, _key(row_group, row_ts), side="left")
    first = np.searchsorted(events, _key(row_group, np.zeros_like(row_ts)), side="left")
    return first, end


def earlier_events(event_group: np.ndarray, event_ts: np.ndarray, row_group: np.ndarray, row_ts: np.ndarray,
                   max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's sequence: the events of its group strictly before it, the most recent `max_len`, oldest first.

    Events sorted by (group, timestamp), ties in the order they should appear. Returns (lengths (R,), index):
    `event_values[index]` holds the rows' sequences one after the other (offsets = cumsum of the lengths).
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    first, end = earlier_bounds(event_group, event_ts, row_group, row_ts)
    lengths = np.minimum(end - first, max_len)
    return lengths, _ranges(end - lengths, lengths)


def _ranges(start: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """start[0]..start[0]+lengths[0]-1, then the same for each row: the index of jagged rows' values."""
    offsets = _offsets(lengths)
    return np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _list_array(lengths: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(_offsets(lengths).astype(np.int32)), pa.array(values, pa.int64()))


# -- the table -----------------------------------------------------------------------------------------------------


def primary_genres(item_genres: np.ndarray) -> np.ndarray:
    """(items,) the rarest genre of each item in the catalogue (ties: the lower genre id); 0 for no genre."""
    by_rarity = np.argsort(item_genres.sum(0), kind="stable")  # rank -> genre, rarest first
    rank = np.argsort(by_rarity)  # genre -> rank
    best = np.where(item_genres, rank[None, :], len(rank)).min(1)
    return np.where(best < len(rank), by_rarity[np.minimum(best, len(rank) - 1)], 0)


def year_buckets(year: np.ndarray) -> np.ndarray:
    """0 for an unknown year (0), else 1 + the number of YEAR_EDGES at or below it."""
    return np.where(year > 0, 1 + np.searchsorted(YEAR_EDGES, year, side="right"), 0)


def build_table(ml: MovieLens, *, max_len: int = DEFAULT_MAX_LEN) -> pa.Table:
    """Every rating as a row of the log (see the module docstring for the columns), ordered by (ts, user, item)."""
    rows = np.lexsort((ml.item, ml.user, ml.ts))
    user, item, ts, rating = ml.user[rows], ml.item[rows], ml.ts[rows], ml.rating[rows]
    events = np.lexsort((ml.item, ml.ts, ml.user))  # each user's ratings in time order, a second's in item order
    ev_user, ev_ts, ev_item = ml.user[events], ml.ts[events], ml.item[events]
    ev_click = ml.rating[events] >= 4
    primary = primary_genres(ml.item_genres)

    hist_len, hist = earlier_events(ev_user, ev_ts, user, ts, max_len)
    click_len, clicks = earlier_events(ev_user[ev_click], ev_ts[ev_click], user, ts, max_len)
    hist_items, click_items = ev_item[hist], ev_item[ev_click][clicks]
    user_first, user_end = earlier_bounds(ev_user, ev_ts, user, ts)
    by_item = np.lexsort((ml.ts, ml.item))
    item_first, item_end = earlier_bounds(ml.item[by_item], ml.ts[by_item], item, ts)

    genre_item, genre = np.nonzero(ml.item_genres)  # item-major, so each item's genres are one run
    genre_off = _offsets(np.bincount(genre_item, minlength=len(ml.item_genres)))
    genres_len = genre_off[item + 1] - genre_off[item]
    return pa.table({
        "ts": ts,
        "rating": rating,
        "click": (rating >= 4).astype(np.int8),
        "user_id": user,
        "user_age_bucket": np.searchsorted(AGE_EDGES, ml.user_age[user], side="right").astype(np.int64),
        "user_gender": ml.user_gender[user],
        "user_occupation": ml.user_occupation[user],
        "user_zip3": ml.user_zip3[user],
        "item_id": item,
        "item_genres": _list_array(genres_len, genre[_ranges(genre_off[item], genres_len)]),
        "item_primary_genre": primary[item],
        "item_year_bucket": year_buckets(ml.item_year[item]).astype(np.int64),
        "hour": (ts // 3600) % 24,
        "weekday": (ts // 86400 + 3) % 7,  # 1970-01-01 was a Thursday
        "user_prior_ratings": (user_end - user_first).astype(np.float32),
        "item_prior_ratings": (item_end - item_first).astype(np.float32),
        "hist_item_ids": _list_array(hist_len, hist_items),
        "hist_item_genres": _list_array(hist_len, primary[hist_items]),
        "click_item_ids": _list_array(click_len, click_items),
        "click_item_genres": _list_array(click_len, primary[click_items]),
    })


# -- writing -------------------------------------------------------------------------------------------------------


def write_days(table: pa.Table, out: str | Path, *, partition_key: str = "day") -> list[tuple[dt.date, int]]:
    """One folder per UTC day of `ts` (the table ordered by it), each written whole; returns (day, rows)."""
    day_number = table.column("ts").to_numpy() // 86400
    if len(day_number) > 1 and (day_number[1:] < day_number[:-1]).any():
        raise ValueError("the table must be ordered by ts")
    numbers, starts, counts = np.unique(day_number, return_index=True, return_counts=True)
    written = []
    for number, start, count in zip(numbers.tolist(), starts.tolist(), counts.tolist()):
        day = _EPOCH + dt.timedelta(days=number)
        _write_day(table.slice(start, count), Path(out) / f"{partition_key}={day.isoformat()}")
        written.append((day, count))
    return written


def _write_day(part: pa.Table, final: Path) -> None:
    """Files and `_SUCCESS` into `<final>.tmp` (fsynced), then renamed over `final`: a day appears whole."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_atomic(tmp / "part-00000.parquet", lambda path: pq.write_table(part, path, compression="zstd"))
    write_atomic(tmp / SUCCESS, b"")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


@dataclass
class ImportSummary:
    """What an import wrote; `lines()` is the report the CLI prints, the fields go to `<out>/_import.json`."""

    src: str
    out: str
    partition_key: str
    max_len: int
    sources: dict[str, str]  # file -> sha256
    rows: int
    positives: int
    users: int
    items: int
    days: list[tuple[dt.date, int]]  # (day, rows), oldest first
    mean_hist_len: float
    mean_click_len: float
    columns: dict[str, str]  # column -> Arrow type
    vocabularies: dict[str, list[str]]  # column -> the names of its ids 0, 1, ...
    seconds: float = 0.0
    other_days: list[str] = dataclasses.field(default_factory=list)  # day folders under out this import did not write

    @property
    def empty_days(self) -> list[dt.date]:
        """Days of the span without a rating (so without a folder)."""
        have = {d for d, _ in self.days}
        span = DayRange(self.days[0][0], self.days[-1][0])
        return [d for d in span.dates() if d not in have]

    def split_rows(self) -> dict[str, int]:
        return {name: sum(n for d, n in self.days if d in span) for name, span in SPLITS.items()}

    def lines(self) -> list[str]:
        first, last = self.days[0][0], self.days[-1][0]
        empty = ", ".join(map(str, self.empty_days)) or "none"
        out = [
            f"wrote {len(self.days)} days to {self.out}: {self.partition_key}={first} .. {self.partition_key}={last} "
            f"(days without a rating, so without a folder: {empty})",
            f"{self.rows:,} rows (every rating of {self.src}), positive rate {self.positives / self.rows:.4f} "
            f"(rating >= 4), {self.users} users, {self.items} items",
            f"sequences (last {self.max_len}): hist_item_ids mean length {self.mean_hist_len:.1f}, "
            f"click_item_ids {self.mean_click_len:.1f}",
            f"in {self.seconds:.1f} s ({self.rows / max(self.seconds, 1e-9):,.0f} rows/s)",
            "recommended split (by time):",
        ]
        rows = self.split_rows()
        out += [f"  {name:<9} {span}  {rows[name]:>7,} rows" for name, span in SPLITS.items()]
        if self.other_days:
            out.append(f"warning: {len(self.other_days)} other day folder(s) under {self.out} were not written by "
                       f"this import: {', '.join(self.other_days[:5])}{' ...' if len(self.other_days) > 5 else ''}")
        return out


def import_movielens(src: str | Path, out: str | Path, *, max_len: int = DEFAULT_MAX_LEN,
                     partition_key: str = "day") -> ImportSummary:
    """Read MovieLens-100K from `src`, write its days under `out` and `<out>/_import.json`; returns the summary."""
    if max_len <= 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    if not partition_key.isidentifier():
        raise ValueError(f"partition_key must be an identifier such as 'day' or 'dt', got {partition_key!r}")
    start = time.perf_counter()
    src, out = Path(src), Path(out)
    ml = read_movielens(src)
    table = build_table(ml, max_len=max_len)
    days = write_days(table, out, partition_key=partition_key)
    written = {f"{partition_key}={d}" for d, _ in days}
    other = sorted(p.name for p in out.glob(f"{partition_key}=*") if p.is_dir() and p.name not in written)
    summary = ImportSummary(
        src=str(src), out=str(out), partition_key=partition_key, max_len=max_len,
        sources={name: sha256(src / name) for name in FILES}, rows=table.num_rows,
        positives=int(np.count_nonzero(table.column("click").to_numpy())),
        users=len(np.unique(ml.user)), items=len(np.unique(ml.item)), days=days,
        mean_hist_len=pc.mean(pc.list_value_length(table.column("hist_item_ids"))).as_py(),
        mean_click_len=pc.mean(pc.list_value_length(table.column("click_item_ids"))).as_py(),
        columns={f.name: str(f.type) for f in table.schema}, other_days=other,
        vocabularies={"user_zip3": ml.zip3_vocab, "user_occupation": ml.occupations, "item_genres": ml.genres})
    summary.seconds = time.perf_counter() - start
    write_json(out / "_import.json", dataclasses.asdict(summary) | {"splits": {k: str(v) for k, v in SPLITS.items()}})
    return summary
