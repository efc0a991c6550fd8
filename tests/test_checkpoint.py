"""DCP checkpoints: a resumed run takes exactly the steps of the uninterrupted one (2 gloo ranks), a checkpoint
reshards onto 1 rank, pending async gradients are applied exactly once, and a broken save is never picked up."""

import dataclasses
import json
import time

import pytest
import torch

from hyrank.pipeline.train.checkpoint import CheckpointError, Checkpointer
from hyrank.pipeline.train.state import check_same_model
from hyrank.pipeline.config import to_dict, with_values
from hyrank.pipeline.data.days import discover_days
from hyrank.pipeline.distributed.env import env_of_current_group
from hyrank.pipeline.train.trainer import Trainer

from dist import run_distributed

STEPS = 12  # steps of the first day
CUT = 5  # the mid-day checkpoint we resume from


def _dense(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.module.tower.state_dict().items()}


def _tables(trainer):
    """This rank's shards of every table (ShardedTensor local shards), in a stable order."""
    out = {}
    for key, value in trainer.model.state_dict().items():
        if hasattr(value, "local_shards"):
            out[key] = [s.tensor.detach().clone() for s in value.local_shards()]
    return out


def _uninterrupted_then_resumed(rank, world_size, cfg):
    days = discover_days(cfg.data.root)
    # reference: the same run with no checkpoint at all
    plain_cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=0,
                                                                         at_day_end=False))
    ref = Trainer(plain_cfg, env_of_current_group())
    ref.plan_lr(days[:1])
    ref_losses = ref.train_day(days[0]).losses
    # the run under test: checkpoints every CUT steps and at the day's end
    full = Trainer(cfg, env_of_current_group())
    full.plan_lr(days[:1])
    losses = full.train_day(days[0]).losses
    after_day = (_dense(full), _tables(full))
    # a fresh trainer resumes from the mid-day checkpoint and finishes the day
    ckpt = full.checkpointer.root / f"step-{CUT:09d}"
    resumed = Trainer(cfg, env_of_current_group())
    resumed.resume(ckpt)
    resume_day = resumed.progress.day
    resumed.plan_lr(days[:1])  # keeps the curve the checkpoint is on
    rest = resumed.train_day(days[0]).losses
    out = {"ref_losses": ref_losses, "losses": losses, "rest": rest, "resume_day": resume_day,
           "days_done": resumed.progress.days_done, "latest": full.checkpointer.latest().name,
           "complete": [p.name for p in full.checkpointer.complete()],
           "after_day": after_day, "resumed": (_dense(resumed), _tables(resumed)),
           "ref": (_dense(ref), _tables(ref)),
           "windows": (full.schedule.window, resumed.schedule.window),
           "lr_end": full.schedule.optimizer.param_groups[0]["lr"]}
    if cfg.train.allreduce == "async":
        # the same mid-day checkpoint into a sync run applies the pending gradient at once; an async run that
        # loads it and flushes must end at the same weights
        sync_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, allreduce="sync"))
        sync = Trainer(sync_cfg, env_of_current_group())
        sync.resume(ckpt)
        flushed = Trainer(cfg, env_of_current_group())
        flushed.resume(ckpt)
        out["pending_was_held"] = flushed.dense.in_flight
        # data-parallel tables (the planner makes the tiny ones so) are stepped by the dense optimizer with
        # their own, already reduced gradients: the flush of the tower's pending gradient must not step them again
        replicated = {k: v.clone() for k, v in flushed.model.state_dict().items()
                      if k.startswith("sparse.") and isinstance(v, torch.Tensor) and not hasattr(v, "local_shards")}
        flushed.dense.flush()
        after = flushed.model.state_dict()
        out["replicated_tables"] = sorted(replicated)
        out["replicated_untouched"] = all(torch.equal(v, after[k]) for k, v in replicated.items())
        out["sync_loaded"], out["async_flushed"] = _dense(sync), _dense(flushed)
    return out


def _assert_same(a, b, what):
    dense_a, tables_a = a
    dense_b, tables_b = b
    for name, w in dense_a.items():
        torch.testing.assert_close(w, dense_b[name], rtol=0, atol=0, msg=f"{what}: dense {name} differs")
    for name, shards in tables_a.items():
        for x, y in zip(shards, tables_b[name]):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=f"{what}: table {name} differs")


@pytest.mark.dist
@pytest.mark.parametrize("allreduce,schedule,compensation", [
    ("sync", "constant", 0.0), ("async", "constant", 0.0), ("async", "cosine", 0.0), ("async", "cosine", 2.0)])
def test_resume_from_a_mid_day_checkpoint_takes_the_same_steps(small_cfg, allreduce, schedule, compensation):
    """compensation: with the delay compensation and the weight prediction on, their state (weights the pending
    gradient was computed at, mean squares, the last update) travels with the checkpoint; without it the resumed
    steps would differ."""
    cfg = with_values(small_cfg, {"train.allreduce": allreduce, "train.lr_schedule": schedule,
                                  "train.allreduce_delay_compensation": compensation,
                                  "train.allreduce_weight_prediction": 1.0 if compensation else 0.0,
                                  "train.max_steps_per_day": STEPS, "checkpoint.every_steps": CUT,
                                  "checkpoint.keep": 10})
    results = run_distributed(_uninterrupted_then_resumed, cfg, timeout_s=300)
    for r in results:
        assert r["losses"] == r["ref_losses"], "saving a checkpoint changed the training"
        assert r["resume_day"] == "2026-11-01" and r["days_done"] == ["2026-11-01"]
        # the resumed day's record holds the whole day: the steps before the checkpoint (carried in it) and after
        assert r["rest"] == r["losses"], "the resumed run took different steps, or its record lost the first ones"
        _assert_same(r["after_day"], r["ref"], "with vs without checkpoints")
        _assert_same(r["resumed"], r["after_day"], "resumed vs uninterrupted")
        if schedule == "cosine":  # one curve over the day's 12 dense steps, ending at lr * lr_min_ratio
            assert r["windows"] == ((0, STEPS), (0, STEPS))
            lr = small_cfg.train.lr
            assert r["lr_end"] == pytest.approx(lr * small_cfg.train.lr_min_ratio)
        else:
            assert r["windows"] == (None, None) and r["lr_end"] == small_cfg.train.lr
        # mid-day at 5 and 10, then the day's end at 12
        assert r["complete"] == [f"step-{s:09d}" for s in (5, 10, 12)] and r["latest"] == "step-000000012"
        if allreduce == "async":
            assert r["pending_was_held"]
            assert r["replicated_tables"] and r["replicated_untouched"], r["replicated_tables"]
            if compensation:  # a sync run applies the pending gradient as saved, uncompensated, unpredicted
                continue
            for name, w in r["sync_loaded"].items():
                torch.testing.assert_close(w, r["async_flushed"][name], rtol=0, atol=0)


def _train_and_save(rank, world_size, cfg):
    days = discover_days(cfg.data.root)
    trainer = Trainer(cfg, env_of_current_group())
    trainer.train_day(days[0])
    return str(trainer.checkpointer.latest()), {k: v for k, v in _dense(trainer).items()}


def _load_on_one_rank(rank, world_size, cfg, path):
    trainer = Trainer(cfg, env_of_current_group())
    trainer.resume(path)
    state = {k: (v.local_shards()[0].tensor if hasattr(v, "local_shards") else v).detach().clone()
             for k, v in trainer.model.state_dict().items()}
    return trainer.progress.days_done, trainer.global_step, state, _dense(trainer)


@pytest.mark.dist
def test_day_end_checkpoint_reshards_onto_one_rank(small_cfg, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    cfg = with_values(small_cfg, {"train.max_steps_per_day": 6, "train.allreduce": "async"})
    (path, dense2), _ = run_distributed(_train_and_save, cfg, timeout_s=300)
    full = tmp_path / "full.pt"
    dcp_to_torch_save(path, full)  # offline, no process group: the unsharded tables as saved
    saved = torch.load(full, weights_only=False)["model"]
    [(days_done, step, state, dense1)] = run_distributed(_load_on_one_rank, cfg, path, world_size=1,
                                                         timeout_s=300)
    assert days_done == ["2026-11-01"] and step == 6
    assert state.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=f"{key} differs after resharding")
    for name, w in dense2.items():
        torch.testing.assert_close(dense1[name], w, rtol=0, atol=0)


def _plain_async_then_compensated(rank, world_size, cfg):
    days = discover_days(cfg.data.root)
    Trainer(cfg, env_of_current_group()).train_day(days[0])
    dc_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, allreduce_delay_compensation=0.5,
                                                                allreduce_weight_prediction=1.0))
    resumed = Trainer(dc_cfg, env_of_current_group())
    resumed.resume(resumed.checkpointer.root / "step-000000003")
    held = resumed.dense.in_flight
    rest = resumed.train_day(days[0])
    return held, rest.steps, resumed.dense.in_flight


@pytest.mark.dist
def test_a_checkpoint_without_compensation_state_resumes_with_compensation(small_cfg):
    """Turning delay compensation and weight prediction on for a run whose async checkpoints predate them: the
    pending gradient loads (counted as computed at the loaded weights, nothing to predict from) and the day
    finishes."""
    cfg = with_values(small_cfg, {"train.allreduce": "async", "train.allreduce_weight_prediction": 0.0,
                                  "train.allreduce_delay_compensation": 0.0, "train.max_steps_per_day": 6,
                                  "checkpoint.every_steps": 3})
    for held, steps, in_flight in run_distributed(_plain_async_then_compensated, cfg, timeout_s=300):
        assert held and steps == 6 and not in_flight  # the day's record: 3 steps before the checkpoint, 3 after


def test_latest_skips_interrupted_saves_and_load_refuses_them(small_cfg, tmp_path):
    ck = Checkpointer(tmp_path / "ck", env=None, keep=3, tensors={})
    assert ck.latest() is None
    for name, complete in (("step-000000010", True), ("step-000000020", True), ("step-000000030.tmp", False),
                           ("step-000000040.old", True)):  # .old: moved aside while the same step was re-saved
        (tmp_path / "ck" / name).mkdir(parents=True)
        if complete:
            (tmp_path / "ck" / name / "meta.json").write_text("{}")
            time.sleep(0.01)
    assert ck.latest().name == "step-000000020"  # no pointer: the newest complete one
    (tmp_path / "ck" / "latest").write_text("step-000000010\n")
    assert ck.latest().name == "step-000000010"
    (tmp_path / "ck" / "latest").write_text("step-000000030.tmp\n")  # a pointer to a broken save is ignored
    assert ck.latest().name == "step-000000020"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ck.load(tmp_path / "ck" / "step-000000030.tmp")
    # a fresh run in the same folder: its step 5 is newer than the older run's step 20
    (tmp_path / "ck" / "step-000000005").mkdir()
    (tmp_path / "ck" / "step-000000005" / "meta.json").write_text("{}")
    (tmp_path / "ck" / "latest").unlink()
    assert [p.name for p in ck.complete()] == ["step-000000010", "step-000000020", "step-000000005"]
    assert ck.latest().name == "step-000000005"


def test_a_checkpoint_of_another_model_is_refused_by_name(small_cfg):
    saved = json.loads(json.dumps(to_dict(small_cfg), default=str))
    current = json.loads(json.dumps(saved))
    check_same_model(saved, current)
    current["model"]["options"]["hidden"] = [128, 64]
    with pytest.raises(ValueError, match=r"another model: model.options.hidden: \[64, 32\] -> \[128, 64\]"):
        check_same_model(saved, current)
    current = json.loads(json.dumps(saved))
    current["features"]["tables"][0]["dim"] = 32
    with pytest.raises(ValueError, match=r"table 'user' resized: dim 16 -> 32"):
        check_same_model(saved, current)
