"""A checkpoint's meta.json has one reader, pipeline/train/checkpoint.py's CheckpointMeta: export, evaluate and
resume read its parts through typed accessors, so a renamed part fails naming the checkpoint, never as a KeyError."""

import json

import pytest

from hyrank.pipeline.train.checkpoint import FORMAT_VERSION, PROGRESS, RUN, CheckpointError, read_meta
from hyrank.pipeline.train.state import Progress

from conftest import ROOT


def _write_meta(path, parts):
    path.mkdir()
    (path / "meta.json").write_text(json.dumps({"format": FORMAT_VERSION, "step": 7, "world_size": 2,
                                                "parts": parts, "ranks": [{"ledger": ["a"]}, {"ledger": ["b"]}],
                                                "files": {}}))


def test_the_accessors_read_the_saved_parts(tmp_path):
    progress = Progress(global_step=7, days_done=["2026-11-01"])
    _write_meta(tmp_path / "step-000000007", {RUN: {"config": {"name": "x"}}, PROGRESS: progress.state_dict()})
    meta = read_meta(tmp_path / "step-000000007")
    assert meta.step == 7 and meta.world_size == 2 and meta.config == {"name": "x"}
    assert meta.progress == progress and meta.per_rank("ledger") == [["a"], ["b"]]


def test_a_missing_part_names_the_checkpoint_and_the_part(tmp_path):
    _write_meta(tmp_path / "step-000000007", {"renamed": {}})
    with pytest.raises(CheckpointError, match=r"step-000000007: no part 'progress' in its meta.json"):
        read_meta(tmp_path / "step-000000007").progress


def test_no_module_but_the_checkpointer_reads_the_layout_by_hand():
    readers = [str(p.relative_to(ROOT)) for top in ("pipeline", "bench", "embeddings", "jobs")
               for p in (ROOT / top).rglob("*.py") if '["parts"]' in p.read_text() or "['parts']" in p.read_text()]
    assert readers == [], f"read a checkpoint through pipeline.train.checkpoint.read_meta: {readers}"
