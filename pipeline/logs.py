"""Logging of hyrank's processes: one format with the rank, hyrank's own messages at INFO, the stack's known
harmless noise dropped.

    setup_logging(verbose=False)     # once, at the start of a command (pipeline/cli)
"""

from __future__ import annotations

import logging
import os
import warnings


SHARED_INPUT_LOGGERS = ("hyrank.pipeline.data.days", "hyrank.pipeline.data.split")


def setup_logging(*, verbose: bool) -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None else ""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("hyrank", "pipeline", "embeddings", "models", "jobs"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
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


