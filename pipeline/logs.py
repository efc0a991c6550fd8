"""Logging of hyrank's processes: one format with the rank, hyrank's own messages at INFO, the stack's known
harmless noise dropped.

    setup_logging(verbose=False)     # once, at the start of a command (pipeline/cli)
    bar = progress(total, "train 2026-11-01", "row")   # a tqdm bar on a terminal, a plain line now and then in a log
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings


SHARED_INPUT_LOGGERS = ("hyrank.pipeline.data.days", "hyrank.pipeline.data.split")


def setup_logging(*, verbose: bool) -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None else ""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("hyrank").setLevel(logging.DEBUG if verbose else logging.INFO)
    if rank not in (None, "0") and not verbose:
        # what these describe is the data root every rank reads alike (missing days, hashed string columns):
        # rank 0 says it once; another rank's own failure is an error, which still shows
        for name in SHARED_INPUT_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    if not verbose:
        silence_known_noise()


# What TorchRec / torch log on every run of this stack, all harmless: a sharding spec not found, FX tracing checks, a
# topology built directly, KJT's non-strict export.
_NOISE = ("Sharding spec not found", "is_fx_tracing will return true", "topology was constructed directly",
          "Trying to non-strict torch.export KJT")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_NOISE) and "is_fx_tracing" not in record.getMessage()


def silence_known_noise() -> None:
    """Drop the stack's harmless warnings so that a user sees hyrank's own messages."""
    for name in ("torchrec", "torch.distributed", "torch.fx", "fbgemm_gpu"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
    warnings.filterwarnings("ignore", message=".*an autograd kernel was not registered.*")
    warnings.filterwarnings("ignore", message=".*NumPy array is not writable.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="torchrec")




def progress(total: int, desc: str, unit: str):
    """A progress bar for long work: tqdm's on a terminal; in a log (stderr not a terminal), where tqdm's
    carriage-return updates would pile up into one endless line, a plain line every 5% or every minute."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True)
    return PlainProgress(total, desc, unit)


class PlainProgress:
    """tqdm's update / set_postfix / close, as a logged line when 5% more is done or a minute has passed."""

    def __init__(self, total: int, desc: str, unit: str, *, every_share: float = 0.05, every_s: float = 60.0):
        self.total, self.desc, self.unit, self.every_share, self.every_s = total, desc, unit, every_share, every_s
        self.done, self.postfix = 0, ""
        self._start = self._said_at = time.monotonic()
        self._said_done = 0
        self._log = logging.getLogger("hyrank.progress")

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.done - self._said_done >= self.every_share * self.total or now - self._said_at >= self.every_s:
            self._say(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.done != self._said_done:
            self._say(time.monotonic())

    def _say(self, now: float) -> None:
        rate = self.done / max(now - self._start, 1e-9)
        share = f"{100 * self.done / self.total:.0f}% " if self.total else ""
        self._log.info("%s: %s(%s/%s %ss) %s %ss/s%s", self.desc, share, f"{self.done:,}", f"{self.total:,}",
                       self.unit, f"{rate:,.0f}", self.unit, f", {self.postfix}" if self.postfix else "")
        self._said_at, self._said_done = now, self.done
