"""How a day is read: the reader's knobs, defined once, and the `data.*` keys of the run config by inheritance.

    DayReader(day, spec, batch_size=512, options=cfg.data)          # pipeline.config.DataConfig is a ReaderOptions
    DayReader(day, spec, batch_size=512, options=ReaderOptions(shuffle=True, num_workers=2))   # tests, benchmarks

`pipeline.config.DataConfig` subclasses ReaderOptions, so a field added here is a config key (loaded, checked,
saved with the resolved config) and reaches the reader with no copy to keep in step. Kept free of torch and
pyarrow: loading a config imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, kw_only=True)
class ReaderOptions:
    """Reader knobs (pipeline/data/reader.py); every field is also a `data.*` config key."""

    shuffle: bool = False  # shuffle a day by row group and within a buffer, seeded by the run seed
    shuffle_buffer_rows: int = 8192  # rows shuffled together (rounded up to a multiple of the batch size)
    error_budget: float = 0.01  # stop the run when more than this fraction of a day's rows fails validation
    max_list_len: int = 100_000  # hard cap: a longer list is a bad row (truncation to max_len is separate)
    on_corrupt_file: Literal["fail", "skip"] = "fail"  # an undecodable file: stop, or skip it and count it
    # Under "skip": how many files of a day with an unreadable footer may be skipped. Their rows are unknown, so no
    # error_budget (a fraction of the day's rows) can cover them: more such files stop the run before the day.
    max_corrupt_files: int = 0
    num_workers: int = 1  # loader threads decoding, validating and converting row groups
    prefetch_batches: int = 4  # batches decoded ahead of the trainer
    pin_memory: bool | None = None  # pin batches in host memory for the copy to the GPU; unset: when CUDA is there

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_budget < 1.0:
            raise ValueError(f"error_budget must be in [0, 1), got {self.error_budget}")
        if self.on_corrupt_file not in ("fail", "skip"):
            raise ValueError(f"on_corrupt_file must be 'fail' or 'skip', got {self.on_corrupt_file!r}")
        if self.max_corrupt_files < 0:
            raise ValueError(f"max_corrupt_files must be >= 0, got {self.max_corrupt_files}")
        for name in ("shuffle_buffer_rows", "max_list_len", "num_workers", "prefetch_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
