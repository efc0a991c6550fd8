"""Synthetic click logs with known, learnable structure: hyrank's built-in default data.

    hyrank gen-logs --out data/synth --days 3 --rows-per-day 20000 --seed 0

Writes `<out>/day=YYYY-MM-DD/part-NNNNN.parquet` and a `_SUCCESS` marker per day. Rows come in requests (one
user, one context, 1-8 candidate items) and carry three behaviour sequences like the HyFormer paper's: one long
(`long_*`, ~25% unique ids per sequence) and two short (`click_*`, `short_author_ids`).

The click probability is known and written as `_oracle_p` (never a feature), so any day's oracle AUC is
computable. Its logit sums four parts, each recoverable only by a model that looks in the right place:
  (a) interest:  how much of the long sequence falls in the target item's category, and whether the target item
                 itself was consumed before (DIN-style target attention over the sequence);
  (b) cross:     a table W[user segment, item cluster, context] (segment = gender x age bucket, cluster =
                 the item's top-level category, context = device x day-part) that sums segment and cluster
                 effects, two 2-way crosses and a rank-2 3-way part: a high-order user/item/context cross
                 with the lower-order structure real crosses have, so that a day of data can reveal it;
  (c) dense:     the item's prior CTR (observed with noise) and the user's activity level;
  (d) drift:     W rotates slowly from day to day and the base rate oscillates, so yesterday's model is a little
                 stale today (what daily retraining is for).
Everything is a pure function of (seed, day index, chunk index): same seed, identical files.

With `drift` (`hyrank gen-logs --drift`, pipeline/data/synth_drift.py) the ids drift too: every day brings new user
and item ids (`new_id_share` of the impressions, in expectation), popularity churns (`popularity_churn`), and user and
item ids are 63-bit hashes, not indices: the feed managed tables are for (jobs/configs/drift.toml). The oracle is
unchanged: ids are names, the hidden attributes behind them decide the click.
"""

from __future__ import annotations

import datetime as dt
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hyrank.pipeline.data.synth_drift import Drift
from hyrank.pipeline.logs import progress as progress_bar

NUM_SEGMENTS = 16  # 2 genders x 8 age buckets
NUM_CLUSTERS = 16
NUM_CONTEXTS = 16  # 4 devices x 4 day-parts
CONTENT_DIM = 8


@dataclass
class SynthConfig:
    """Sizes of the synthetic world and of each day's log."""

    rows_per_day: int = 150_000  # one day of the default data: enough for the attention towers to learn from
    num_days: int = 3
    start_day: dt.date = dt.date(2026, 11, 1)
    seed: int = 0
    partition_key: str = "day"
    num_users: int = 50_000
    num_items: int = 100_000
    num_categories: int = 200
    num_authors: int = 10_000
    num_tags: int = 500
    num_cities: int = 300
    long_len_min: int = 64  # paper scale: 1000-3000 (--long-len); CPU-sized by default
    long_len_max: int = 128
    long_unique_frac: float = 0.25
    short_len: int = 50
    max_items_per_request: int = 8
    rows_per_chunk: int = 8192  # one Parquet row group per chunk
    chunks_per_file: int = 8
    drift: bool = False  # new ids every day, churning popularity, 63-bit user and item ids (synth_drift.py)
    new_id_share: float = 0.1  # with drift: the expected share of a day's impressions on ids born that day
    popularity_churn: float = 0.05  # with drift: the share of each popularity ranking that rotates away per day

    def __post_init__(self) -> None:
        if not 0 <= self.new_id_share < 1:
            raise ValueError(f"new_id_share must be in [0, 1), got {self.new_id_share}")
        if not 0 <= self.popularity_churn <= 1:
            raise ValueError(f"popularity_churn must be in [0, 1], got {self.popularity_churn}")
        if not 0 < self.long_len_min <= self.long_len_max:
            raise ValueError("need 0 < long_len_min <= long_len_max")
        if not 0 < self.long_unique_frac <= 1:
            raise ValueError("long_unique_frac must be in (0, 1]")
        for name in ("rows_per_day", "num_days", "rows_per_chunk", "chunks_per_file", "short_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")


class World:
    """The hidden, day-independent state: users and items with latent attributes."""

    def __init__(self, cfg: SynthConfig):
        rng = np.random.default_rng([cfg.seed, 0xC0FFEE])
        self.cfg = cfg
        # users: observable gender/age (their product is the hidden segment), city, main device, activity
        self.user_gender = rng.integers(0, 2, cfg.num_users)
        self.user_age = rng.integers(0, 8, cfg.num_users)
        self.user_city = rng.integers(0, cfg.num_cities, cfg.num_users)
        self.city_names = pa.array([f"city_{i}" for i in range(cfg.num_cities)])  # a string-id column
        self.user_device = rng.integers(0, 4, cfg.num_users)
        self.user_activity = rng.lognormal(0.0, 1.0, cfg.num_users).astype(np.float32)
        # each user likes 3 categories with weights 0.5 / 0.3 / 0.2
        self.user_interest = rng.integers(0, cfg.num_categories, (cfg.num_users, 3))
        self.user_perm = rng.permutation(cfg.num_users)  # popularity rank -> user id
        # items: category, author, tags, prior CTR logit; sorted into per-category runs for sampling
        self.item_cat = rng.integers(0, cfg.num_categories, cfg.num_items)
        self.item_author = rng.integers(0, cfg.num_authors, cfg.num_items)
        self.item_prior = rng.normal(0.0, 0.6, cfg.num_items).astype(np.float32)
        self.item_num_tags = rng.integers(1, 5, cfg.num_items)
        self.item_tags = rng.integers(0, cfg.num_tags, (cfg.num_items, 4))
        self.by_cat = np.argsort(self.item_cat, kind="stable")
        counts = np.bincount(self.item_cat, minlength=cfg.num_categories)
        self.cat_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.cat_count = np.maximum(counts, 1)
        # top-level categories: each category belongs to one of 16 clusters (observed as item_top_category)
        self.cat_cluster = rng.integers(0, NUM_CLUSTERS, cfg.num_categories)
        self.cluster_vec = rng.normal(0.0, 1.0, (NUM_CLUSTERS, CONTENT_DIM)).astype(np.float32)
        # the cross table rotates between two random tables as days pass (see _cross_tensor)
        self.w0 = _cross_tensor(rng, scale=0.7)
        self.w1 = _cross_tensor(rng, scale=0.7)
        self.drift = Drift(seed=cfg.seed, num_users=cfg.num_users, num_items=cfg.num_items,
                           new_id_share=cfg.new_id_share, popularity_churn=cfg.popularity_churn) if cfg.drift else None

    def cross_table(self, day_index: int) -> np.ndarray:
        theta = 0.08 * day_index
        return math.cos(theta) * self.w0 + math.sin(theta) * self.w1

    def sample_items(self, rng: np.random.Generator, cats: np.ndarray, day_index: int = 0) -> np.ndarray:
        """Items of the given categories, Zipf-like within each category (rank r has weight ~ r^-0.67); with drift
        the ranking of the day (churned)."""
        rank = np.floor(self.cat_count[cats] * rng.random(cats.shape) ** 3).astype(np.int64)
        if self.drift is not None:
            rank = self.drift.shifted(rank, self.cat_count[cats], day_index)
        return self.by_cat[self.cat_start[cats] + rank]

    def sample_users(self, rng: np.random.Generator, num: int, day_index: int) -> np.ndarray:
        """Users by popularity (rank r has weight ~ r^-0.6); with drift the ranking of the day (churned)."""
        rank = np.floor(self.cfg.num_users * rng.random(num) ** 2.5).astype(np.int64)
        if self.drift is not None:
            rank = self.drift.shifted(rank, self.cfg.num_users, day_index)
        return self.user_perm[rank]

    def sample_interest_cats(self, rng: np.random.Generator, users: np.ndarray, explore: float) -> np.ndarray:
        """One category per user: one of its 3 interests (0.5/0.3/0.2), or a random one w.p. `explore`."""
        slot = np.searchsorted([0.5, 0.8], rng.random(users.shape), side="right")
        cats = self.user_interest[users, slot]
        wander = rng.random(users.shape) < explore
        return np.where(wander, rng.integers(0, self.cfg.num_categories, users.shape), cats)


def _cross_tensor(rng: np.random.Generator, scale: float) -> np.ndarray:
    """W[segment, cluster, context]: main effects + segment x cluster + cluster x context + a rank-2 3-way part.

    A pure 3-way table (zero-mean CP factors) has no lower-order signal at all and could not be learned from a
    day of data (measured: no model picked any of it up); real crosses have main effects and pairwise parts too.
    Each part has equal variance before the whole is scaled to std `scale`.
    """
    s, c, x = NUM_SEGMENTS, NUM_CLUSTERS, NUM_CONTEXTS
    parts = [
        rng.normal(0, 1, (s, 1, 1)) * np.ones((s, c, x)),
        rng.normal(0, 1, (1, c, 1)) * np.ones((s, c, x)),
        rng.normal(0, 1, (s, c, 1)) * np.ones((s, c, x)),
        rng.normal(0, 1, (1, c, x)) * np.ones((s, c, x)),
    ]
    factors = [rng.normal(0.0, 1.0, (2, n)) for n in (s, c, x)]
    parts.append(np.einsum("ra,rb,rc->abc", *factors))
    t = sum(p / p.std() for p in parts)
    return scale * t / t.std()


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def _repeat_index(lengths: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gather index that repeats jagged row r `times[r]` times: returns (row_lengths, index into values)."""
    rows = np.repeat(np.arange(len(lengths)), times)
    out_lengths = lengths[rows]
    # element j of output row o reads values[in_off[r] + j]; out position is out_off[o] + j
    shift = _offsets(lengths)[rows] - _offsets(out_lengths)[:-1]
    return out_lengths, np.arange(out_lengths.sum()) + np.repeat(shift, out_lengths)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)])


def generate_chunk(world: World, day_index: int, chunk_index: int, num_rows: int, day_start_s: int) -> pa.Table:
    """`num_rows` rows of one day as an Arrow table (deterministic in seed, day and chunk)."""
    cfg = world.cfg
    rng = np.random.default_rng([cfg.seed, day_index, chunk_index])
    # -- requests: user, context, how many candidates -----------------------------------------------------------
    k = np.minimum(1 + rng.poisson(3.0, num_rows), cfg.max_items_per_request)
    num_req = int(np.searchsorted(np.cumsum(k), num_rows)) + 1
    k = k[:num_req]
    k[-1] -= k.sum() - num_rows  # trim the last request so that the chunk has exactly num_rows rows
    users = world.sample_users(rng, num_req, day_index)
    ts = day_start_s + np.sort(rng.integers(0, 86_400, num_req))
    hour = (ts // 3600) % 24
    device = np.where(rng.random(num_req) < 0.8, world.user_device[users], rng.integers(0, 4, num_req))
    context = device * 4 + hour // 6
    query_id = (np.int64(day_index) << 40) | (np.int64(chunk_index) << 24) | np.arange(num_req)

    # -- long sequence: a per-request pool of ~25% distinct items, events drawn from the pool ------------------
    long_len = rng.integers(cfg.long_len_min, cfg.long_len_max + 1, num_req)
    # drawing L events uniformly from m slots leaves ~2% of slots unused at L/m = 4, hence the 0.98
    pool_len = np.maximum(1, np.ceil(long_len * cfg.long_unique_frac / 0.98).astype(np.int64))
    pool_req = np.repeat(np.arange(num_req), pool_len)
    pool_items = world.sample_items(rng, world.sample_interest_cats(rng, users[pool_req], explore=0.1), day_index)
    pool_items = _distinct_per_request(rng, pool_req, pool_items, cfg.num_items)
    pool_off = _offsets(pool_len)
    event_req = np.repeat(np.arange(num_req), long_len)
    event_slot = pool_off[event_req] + np.floor(rng.random(event_req.shape) * pool_len[event_req]).astype(np.int64)
    long_items = pool_items[event_slot]
    # timestamps oldest first: a per-request mean gap, events evenly spread back from the request time
    gap = rng.integers(60, 3600, num_req)
    back = _offsets(long_len)[1:][event_req] - np.arange(long_len.sum())  # L, L-1, ..., 1
    long_ts = ts[event_req] - back * gap[event_req]

    # -- short sequences: recent clicks (top interest), authors of recently watched items ---------------------
    short_users = np.repeat(users, cfg.short_len)
    click_items = world.sample_items(rng, world.sample_interest_cats(rng, short_users, explore=0.05), day_index)
    author_items = world.sample_items(rng, world.sample_interest_cats(rng, short_users, explore=0.3), day_index)
    short_authors = world.item_author[author_items]

    # -- candidates: half from the user's interests, half popular anywhere -------------------------------------
    row_req = np.repeat(np.arange(num_req), k)
    row_user = users[row_req]
    explore = np.where(rng.random(num_rows) < 0.5, 0.05, 1.0)
    cand_cats = np.where(
        rng.random(num_rows) < explore,
        rng.integers(0, cfg.num_categories, num_rows),
        world.sample_interest_cats(rng, row_user, explore=0.0),
    )
    items = world.sample_items(rng, cand_cats, day_index)
    # a few candidates are re-recommendations of something already in the long sequence
    again = rng.random(num_rows) < 0.1
    pick = pool_off[row_req] + np.floor(rng.random(num_rows) * pool_len[row_req]).astype(np.int64)
    items = np.where(again, pool_items[pick], items)
    cats = world.item_cat[items]

    # -- the label -------------------------------------------------------------------------------------------------
    frac_in_cat, in_seq = _interest(world, pool_items, pool_len, long_items, event_slot, long_len, row_req, items)
    segment = world.user_gender[row_user] * 8 + world.user_age[row_user]
    cluster = world.cat_cluster[cats]
    cross = world.cross_table(day_index)[segment, cluster, context[row_req]]
    activity = world.user_activity[row_user]
    logit = (
        -3.3
        + 0.25 * math.sin(day_index / 4.0)
        + 1.6 * np.log1p(8.0 * frac_in_cat)
        + 0.5 * in_seq
        + cross
        + 0.8 * world.item_prior[items]
        + 0.3 * np.tanh(np.log(activity))
    )
    p = 1.0 / (1.0 + np.exp(-logit))
    click = (rng.random(num_rows) < p).astype(np.int8)

    # -- observed dense features (noisy) ----------------------------------------------------------------------
    ctr_prior = (world.item_prior[items] + rng.normal(0, 0.3, num_rows)).astype(np.float32)
    content = world.cluster_vec[cluster] + rng.normal(0, 0.5, (num_rows, CONTENT_DIM)).astype(np.float32)
    tags_len = world.item_num_tags[items]
    tags = world.item_tags[np.repeat(items, tags_len), _within(tags_len)]

    long_l, long_idx = _repeat_index(long_len, k)
    long_off = _offsets(long_l)
    short_l = np.full(num_rows, cfg.short_len)
    short_rows = np.repeat(np.arange(num_req), k)
    short_idx = (short_rows[:, None] * cfg.short_len + np.arange(cfg.short_len)).ravel()
    click_rows = click_items[short_idx]
    user_ids, item_ids, long_ids, click_ids = row_user, items, long_items[long_idx], click_rows
    if world.drift is not None:  # the ids the logs show: 63-bit names of the day's generation of each entity
        d = world.drift
        user_ids, item_ids = d.user_ids(row_user, day_index), d.item_ids(items, day_index)
        long_ids, click_ids = d.item_ids(long_ids, day_index), d.item_ids(click_ids, day_index)
    return pa.table(
        {
            "query_id": query_id[row_req],
            "ts": ts[row_req],
            "user_id": user_ids,
            "user_gender": world.user_gender[row_user],
            "user_age_bucket": world.user_age[row_user],
            "user_city": world.city_names.take(world.user_city[row_user]),
            "user_activity": activity,
            "device": device[row_req],
            "hour": hour[row_req],
            "item_id": item_ids,
            "item_category": cats,
            "item_top_category": cluster,
            "item_author": world.item_author[items],
            "item_tags": _list_array(_offsets(tags_len), tags),
            "item_ctr_prior": ctr_prior,
            "item_content": pa.FixedSizeListArray.from_arrays(pa.array(content.ravel()), CONTENT_DIM),
            "long_item_ids": _list_array(long_off, long_ids),
            "long_item_cats": _list_array(long_off, world.item_cat[long_items][long_idx]),
            "long_ts": _list_array(long_off, long_ts[long_idx]),
            "click_item_ids": _list_array(_offsets(short_l), click_ids),
            "click_item_cats": _list_array(_offsets(short_l), world.item_cat[click_rows]),
            "short_author_ids": _list_array(_offsets(short_l), short_authors[short_idx]),
            "click": click,
            "_oracle_p": p.astype(np.float32),
        }
    )


def _distinct_per_request(rng: np.random.Generator, req: np.ndarray, items: np.ndarray, num_items: int) -> np.ndarray:
    """Replace items repeated inside a request's pool by random catalogue items, so a pool of m slots holds
    (almost surely) m distinct ids whatever the catalogue size."""
    order = np.lexsort((items, req))
    dup_sorted = np.r_[False, (req[order][1:] == req[order][:-1]) & (items[order][1:] == items[order][:-1])]
    dup = np.zeros(len(items), dtype=bool)
    dup[order] = dup_sorted
    items = items.copy()
    items[dup] = rng.integers(0, num_items, int(dup.sum()))
    return items


def _within(lengths: np.ndarray) -> np.ndarray:
    """0..len-1 for each run: the position of each element inside its jagged row."""
    return np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def _interest(world, pool_items, pool_len, long_items, event_slot, long_len, row_req, items):
    """Per row: share of the long sequence in the target's category, and whether the target was consumed."""
    slot_hits = np.bincount(event_slot, minlength=len(pool_items))  # events per pool slot
    pool_off = _offsets(pool_len)
    # pair every row with every pool slot of its request; pools are ~25% of L, so this is cheap
    pair_len = pool_len[row_req]
    pair_row = np.repeat(np.arange(len(row_req)), pair_len)
    pair_slot = np.repeat(pool_off[row_req], pair_len) + _within(pair_len)
    same_cat = world.item_cat[pool_items[pair_slot]] == world.item_cat[items[pair_row]]
    same_item = (pool_items[pair_slot] == items[pair_row]) & (slot_hits[pair_slot] > 0)
    hits_in_cat = np.bincount(pair_row, weights=same_cat * slot_hits[pair_slot], minlength=len(row_req))
    in_seq = np.bincount(pair_row, weights=same_item, minlength=len(row_req)) > 0
    return hits_in_cat / long_len[row_req], in_seq.astype(np.float64)


def day_dir(root: Path, day: dt.date, partition_key: str = "day") -> Path:
    return Path(root) / f"{partition_key}={day.isoformat()}"


def write_day(world: World, out_dir: Path, day_index: int) -> Path:
    """Write one complete day atomically: files go to a temp folder that is renamed, then `_SUCCESS`."""
    cfg = world.cfg
    day = cfg.start_day + dt.timedelta(days=day_index)
    final = day_dir(out_dir, day, cfg.partition_key)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    day_start_s = int(dt.datetime.combine(day, dt.time(), tzinfo=dt.timezone.utc).timestamp())
    num_chunks = math.ceil(cfg.rows_per_day / cfg.rows_per_chunk)
    writer = None
    for chunk in range(num_chunks):
        rows = min(cfg.rows_per_chunk, cfg.rows_per_day - chunk * cfg.rows_per_chunk)
        table = generate_chunk(world, day_index, chunk, rows, day_start_s)
        if chunk % cfg.chunks_per_file == 0:
            if writer is not None:
                writer.close()
            path = tmp / f"part-{chunk // cfg.chunks_per_file:05d}.parquet"
            writer = pq.ParquetWriter(path, table.schema, compression="zstd", compression_level=1)
        writer.write_table(table, row_group_size=cfg.rows_per_chunk)
    writer.close()
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (final / "_SUCCESS").touch()
    return final


def generate_logs(cfg: SynthConfig, out_dir: str | Path, *, workers: int = 1, progress: bool = False) -> list[Path]:
    """Write `cfg.num_days` days of logs under `out_dir`, `workers` days at a time; returns the day folders.

    Days are independent (each is seeded by its index), so the files are identical for any `workers`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(cfg.num_days, "gen-logs", "day") if progress else None
    if workers <= 1:
        world = World(cfg)
        paths = []
        for d in range(cfg.num_days):
            paths.append(write_day(world, out, d))
            if bar is not None:
                bar.update(1)
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_write_day_in_worker, cfg, out, d) for d in range(cfg.num_days)]
            for f in cf.as_completed(futures):
                f.result()
                if bar is not None:
                    bar.update(1)
            paths = [f.result() for f in futures]
    if bar is not None:
        bar.close()
    return paths


_WORKER_WORLD: World | None = None


def _write_day_in_worker(cfg: SynthConfig, out: Path, day_index: int) -> Path:
    global _WORKER_WORLD
    if _WORKER_WORLD is None or _WORKER_WORLD.cfg != cfg:
        _WORKER_WORLD = World(cfg)
    return write_day(_WORKER_WORLD, out, day_index)


def oracle_auc(day_path: str | Path, label: str = "click", oracle: str = "_oracle_p") -> float:
    """AUC of the true click probability on one written day: the ceiling for any model on that day."""
    from hyrank.pipeline.metrics import auc

    table = pq.read_table(Path(day_path), columns=[label, oracle])
    return auc(table.column(oracle).to_numpy(), table.column(label).to_numpy())
