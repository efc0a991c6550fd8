"""Shared fixtures. Threads are pinned to one before torch loads: forked 2-rank tests need a parent with no
OpenMP pool, and a 2-core CI machine runs faster without oversubscription."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import datetime as dt  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from hyrank.pipeline.config import load_config  # noqa: E402
from hyrank.pipeline.data.synth import SynthConfig, generate_logs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "jobs" / "configs" / "default.toml"
FIRST_DAY = dt.date(2026, 11, 1)


def small_synth(**overrides) -> SynthConfig:
    """A few thousand rows a day with short sequences: seconds to write, enough to learn from."""
    base = dict(rows_per_day=6000, num_days=3, seed=7, long_len_min=40, long_len_max=80, short_len=12,
                num_users=2000, num_items=5000, num_categories=40, num_authors=500, rows_per_chunk=1000,
                chunks_per_file=3)
    base.update(overrides)
    return SynthConfig(**base)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate_logs(small_synth(), root)
    return root


@pytest.fixture
def small_cfg(synth_root, tmp_path):
    """The shipped default config pointed at the small synthetic logs, with a small tower; an async run is one
    step stale from its first step (the tests take a handful of steps, fewer than default.toml's synchronous ones)."""
    return load_config(DEFAULT_CONFIG, [f'data.root="{synth_root}"', f'out_dir="{tmp_path / "run"}"',
                                        "data.batch_size_per_rank=128", "model.options.hidden=[64,32]",
                                        "features.sequences.0.max_len=64", "features.sequences.1.max_len=12",
                                        "features.sequences.2.max_len=12", "train.allreduce_sync_steps=0",
                                        *FAST_SPARSE])


# Tests learn from a few thousand rows in a few dozen steps: the fast-moving sparse setting (TorchRec's init, lr
# 0.5) shows learning there; the shipped one (tables in +-0.05, lr 0.05) is chosen on full days (docs/results.md)
FAST_SPARSE = ["embeddings.lr=0.5", "embeddings.init_scale=0"]
# A tiny tower and short sequences: a run of a few thousand rows takes seconds (stream, export, lifecycle tests)
TINY = ["data.batch_size_per_rank=64", "model.options.hidden=[32]", "features.sequences.0.max_len=32",
        "features.sequences.1.max_len=8", "features.sequences.2.max_len=8", "train.tensorboard=false", *FAST_SPARSE]


def tiny_cfg(root, out_dir, *extra):
    """The shipped default config on `root`, writing to `out_dir`, with TINY and `extra` overrides."""
    return load_config(DEFAULT_CONFIG, [f'data.root="{root}"', f'out_dir="{out_dir}"', *TINY, *extra])


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc): a launcher's ranks, which run in sessions of their own."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def latest_checkpoint_tensors(out_dir):
    """Every tensor of a run's latest checkpoint by dotted name (DCP read offline, tables whole), and its meta.json
    (a CheckpointMeta)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out_dir = Path(out_dir)
    latest = out_dir / "checkpoints" / (out_dir / "checkpoints" / "latest").read_text().strip()
    dcp_to_torch_save(latest, out_dir / "final.pt")
    flat: dict = {}

    def walk(value, prefix):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk(torch.load(out_dir / "final.pt", weights_only=False), "")
    from hyrank.pipeline.train.checkpoint import read_meta

    return flat, read_meta(latest)


@pytest.fixture(autouse=True)
def _no_process_group_left_behind():
    """A test that leaves a default process group in this (parent) process breaks every forked 2-rank test after
    it ("trying to initialize the default process group twice"): fail the test that left it, not the others."""
    yield
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail("the test left a default process group initialised in the pytest process")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 for the session's s3 tests (tests/s3.py), stopped at the end."""
    from s3 import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket on the test S3 server, with the standard AWS variables pointing this process (and the
    processes it starts) at it."""
    from s3 import Bucket, set_env

    set_env(s3_server.env, monkeypatch)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return Bucket(s3_server)
