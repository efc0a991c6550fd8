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


def test_a_run_id_is_drawn_at_a_fresh_start_and_kept_by_every_resume(tmp_path):
    """Published versions are named `<run id>-step-N`: two runs never share an id, a resumed run keeps its own, and
    a checkpoint from before run ids gets a stable one from its config."""
    from hyrank.pipeline.config import load_config
    from hyrank.pipeline.train.state import RunIdentity

    from conftest import DEFAULT_CONFIG

    cfg = load_config(DEFAULT_CONFIG, [f'out_dir="{tmp_path / "run"}"'])
    first, second = RunIdentity(cfg), RunIdentity(cfg)
    assert first.run_id != second.run_id  # the same config and out_dir: still two runs
    resumed = RunIdentity(cfg)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict(), default=str)))
    assert resumed.run_id == first.run_id
    saved = json.loads(json.dumps(first.state_dict(), default=str))
    _write_meta(tmp_path / "step-000000007", {RUN: saved, PROGRESS: Progress().state_dict()})
    assert read_meta(tmp_path / "step-000000007").run_id == first.run_id
    del saved["run_id"]
    _write_meta(tmp_path / "step-000000008", {RUN: saved, PROGRESS: Progress().state_dict()})
    legacy = read_meta(tmp_path / "step-000000008").run_id
    assert len(legacy) == 8 and legacy == read_meta(tmp_path / "step-000000008").run_id != first.run_id
