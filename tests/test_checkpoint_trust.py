"""Checkpoints under damage and as a trust boundary: a damaged checkpoint is named with its reason in one line,
`latest` falls back to the newest one that loads, `latest` never leads out of the checkpoint folder, and a folder
from elsewhere is loaded only when the caller says it trusts it (DCP unpickles what it finds)."""

import json

import pytest

from hyrank.pipeline.config import with_values
from hyrank.pipeline.distributed.env import env_of_current_group
from hyrank.pipeline.data.days import discover_days
from hyrank.pipeline.train.checkpoint import CheckpointError, Checkpointer
from hyrank.pipeline.train.trainer import RunPlan, Trainer

from dist import run_distributed

STEPS, EVERY = 6, 3


def _train(rank, world_size, cfg):
    Trainer(cfg, env_of_current_group()).run(RunPlan(train_days=discover_days(cfg.data.root)[:1]))


def _resume(rank, world_size, cfg, where, trust=False):
    trainer = Trainer(cfg, env_of_current_group())
    try:
        path = trainer.resume(where, trust=trust)
    except CheckpointError as e:
        return "error", str(e)
    return "ok", (path.name, trainer.global_step)


@pytest.fixture
def trained(small_cfg):
    """Checkpoints at steps 3 and 6 (the day's end) of a 1-rank run."""
    cfg = with_values(small_cfg, {"train.max_steps_per_day": STEPS, "checkpoint.every_steps": EVERY})
    run_distributed(_train, cfg, world_size=1, timeout_s=300)
    return cfg, Checkpointer(cfg.out_dir + "/checkpoints", env=None, keep=3, tensors={})


def _truncate_a_shard(path):
    shard = sorted(path.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard


@pytest.mark.dist
def test_a_damaged_latest_is_named_and_latest_falls_back(trained, caplog):
    cfg, ck = trained
    newest = ck.latest()
    assert newest.name == f"step-{STEPS:09d}"
    shard = _truncate_a_shard(newest)
    [(status, message)] = run_distributed(_resume, cfg, str(newest), world_size=1, timeout_s=300)
    assert status == "error" and str(newest) in message and shard.name in message and "sha256" in message
    assert "\n" not in message
    [(status, (name, step))] = run_distributed(_resume, cfg, "latest", world_size=1, timeout_s=300)
    assert status == "ok" and name == f"step-{EVERY:09d}" and step == EVERY


@pytest.mark.dist
def test_a_shard_that_fails_in_dcp_is_named_in_one_line(trained):
    """Checksums re-recorded over the damage (as if it happened before the save finished): DCP itself fails, and
    the error still names the checkpoint in one line."""
    cfg, ck = trained
    newest = ck.latest()
    shard = _truncate_a_shard(newest)
    meta = json.loads((newest / "meta.json").read_text())
    from hyrank.pipeline.files import sha256

    meta["files"][shard.name] = sha256(shard)
    (newest / "meta.json").write_text(json.dumps(meta))
    [(status, message)] = run_distributed(_resume, cfg, str(newest), world_size=1, timeout_s=300)
    assert status == "error" and message.startswith(f"{newest} cannot be loaded: ") and "\n" not in message


def test_latest_pointer_never_leaves_the_checkpoint_folder(tmp_path):
    ck = Checkpointer(tmp_path / "ck", env=None, keep=3, tensors={})
    for name in ("step-000000001", "elsewhere/step-000000009"):
        (tmp_path / "ck" / name).mkdir(parents=True)
        (tmp_path / "ck" / name / "meta.json").write_text("{}")
    outside = tmp_path / "outside"
    (outside / "step-000000005").mkdir(parents=True)
    (outside / "step-000000005" / "meta.json").write_text("{}")
    for pointer in ("../outside/step-000000005", str(outside / "step-000000005"), "elsewhere/step-000000009"):
        (tmp_path / "ck" / "latest").write_text(pointer + "\n")
        assert ck.latest() == tmp_path / "ck" / "step-000000001", pointer
    assert ck.inside(tmp_path / "ck" / "step-000000001")
    assert not ck.inside(tmp_path / "ck" / ".." / "outside" / "step-000000005")


@pytest.mark.dist
def test_a_checkpoint_from_elsewhere_needs_trust(trained, tmp_path):
    import shutil

    cfg, ck = trained
    copy = tmp_path / "copied" / "step-000000006"
    shutil.copytree(ck.latest(), copy)
    [(status, message)] = run_distributed(_resume, cfg, str(copy), world_size=1, timeout_s=300)
    assert status == "error" and "not a checkpoint of this run" in message and "--trust-checkpoint" in message
    [(status, (name, step))] = run_distributed(_resume, cfg, str(copy), True, world_size=1, timeout_s=300)
    assert status == "ok" and step == STEPS
