"""Drifting ids for the synthetic logs (`hyrank gen-logs --drift`, SynthConfig.drift): the id side of a real feed.

    drift = Drift(seed=0, num_users=50_000, num_items=100_000, new_id_share=0.1, popularity_churn=0.05)
    user_ids = drift.user_ids(users, day_index)        # internal indices -> 63-bit ids of that day
    rank = drift.shifted(rank, size, day_index)         # a popularity rank after the day's churn

The generator's world keeps its users and items (their hidden attributes, hence the oracle probability, stay
exactly known); what drifts is the ids the logs show and who is popular:
  new ids     from the second day on, each user and each item is re-born on a day with probability `new_id_share`
              (seeded per entity and day): its id changes to one never used before, so that share of a day's
              impressions, in expectation, lands on ids born that day (ids of the long tail seen for the first
              time add to what a model meets as new);
  63-bit ids  an id is a seeded hash of (kind, internal index, generation) in [0, 2**63): ids are drawn from the
              full space, nothing like a dense range a table could index;
  churn       the popularity ranking of users, and of items inside each category, rotates by `popularity_churn`
              of its length per day: yesterday's head drifts into the tail.
"""

from __future__ import annotations

import numpy as np

_USER, _ITEM = 1, 2
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (numpy's uint64 arithmetic wraps modulo 2**64, as it must here)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def id63(seed: int, kind: int, index: np.ndarray, generation: np.ndarray) -> np.ndarray:
    """The 63-bit id (int64 >= 0) of entity `index` of a kind in its `generation`: a seeded hash."""
    with np.errstate(over="ignore"):
        key = (np.uint64(seed & 0xFFFFFFFF) << np.uint64(32)) ^ np.uint64(kind << 28)
        x = index.astype(np.uint64) ^ (generation.astype(np.uint64) << np.uint64(40)) ^ key
        return (_splitmix64(_splitmix64(x) + np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(1)).astype(np.int64)


class Drift:
    """Which generation each user and item is in on a day, and where the day's churn moved the popular ones."""

    def __init__(self, *, seed: int, num_users: int, num_items: int, new_id_share: float, popularity_churn: float):
        self.seed, self.share, self.churn = seed, new_id_share, popularity_churn
        self.sizes = {_USER: num_users, _ITEM: num_items}
        self._generations: dict[tuple[int, int], np.ndarray] = {}

    def generations(self, kind: int, day_index: int) -> np.ndarray:
        """(num entities,) how many times each was re-born up to `day_index` (day 0: none)."""
        key = (kind, day_index)
        if key not in self._generations:
            if day_index == 0:
                self._generations[key] = np.zeros(self.sizes[kind], dtype=np.int64)
            else:
                born = np.random.default_rng([self.seed, 0xD21F7, kind, day_index]).random(self.sizes[kind])
                self._generations[key] = self.generations(kind, day_index - 1) + (born < self.share)
        return self._generations[key]

    def born_on(self, kind: int, day_index: int) -> np.ndarray:
        """(num entities,) bool: re-born on `day_index` (their ids that day are new)."""
        if day_index == 0:
            return np.zeros(self.sizes[kind], dtype=bool)
        return self.generations(kind, day_index) > self.generations(kind, day_index - 1)

    def user_ids(self, users: np.ndarray, day_index: int) -> np.ndarray:
        return id63(self.seed, _USER, users, self.generations(_USER, day_index)[users])

    def item_ids(self, items: np.ndarray, day_index: int) -> np.ndarray:
        return id63(self.seed, _ITEM, items, self.generations(_ITEM, day_index)[items])

    def shifted(self, rank: np.ndarray, size: np.ndarray | int, day_index: int) -> np.ndarray:
        """A popularity rank (0: the most popular) in a ranking of `size`, rotated by the churn of `day_index` days."""
        shift = np.floor(self.churn * day_index * np.asarray(size)).astype(np.int64)
        return (rank + shift) % size
