"""One-step-stale AllReduce hook: exact against a single-process simulation of the update rule."""

import dataclasses

import pytest
import torch
from torch import nn

from hyrank.pipeline.config import with_values
from hyrank.pipeline.distributed.dense_sync import DenseSync
from hyrank.pipeline.distributed.dmp import make_data_parallel_wrapper

from dist import run_distributed

pytestmark = pytest.mark.dist

NUM_STEPS = 6
BATCH = 16


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1))


def _data(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(BATCH, 8, generator=g)
    y = (torch.rand(BATCH, generator=g) < 0.3).float()
    return x, y


def _loss(model, x, y):
    return nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)


def _optimizer(params):
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.01)


def _train_ranks(rank, world_size, mode, compression, compensation=0.0, prediction=0.0, sync_steps=0):
    """The trainer's dense step (DenseSync) on a small net: the first `sync_steps` steps at staleness 0
    (train.allreduce_sync_steps), then one step stale; prediction and compensation as given."""
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    wrapper, state = make_data_parallel_wrapper(mode, compression, compensation, prediction)
    wrapper._bucket_cap_mb = 0.001  # several tiny buckets, so DDP's re-bucketing after step 1 is exercised
    dmp = DistributedModelParallel(_net(), env=ShardingEnv.from_process_group(torch.distributed.GroupMember.WORLD),
                                   device=torch.device("cpu"), plan=ShardingPlan({}), data_parallel_wrapper=wrapper)
    opt = _optimizer(dmp.parameters())
    dense = DenseSync(opt, dmp.module.named_parameters(), hook=state, mode=mode, sync_steps=sync_steps)
    ready = []
    for step in range(NUM_STEPS):
        x, y = _data(step, rank)
        opt.zero_grad()
        dense.before_forward(step)
        _loss(dmp, x, y).backward()
        ready.append(dense.after_backward())
    flushed = dense.flush()
    return {"params": [p.detach().clone() for p in dmp.module.parameters()], "ready": ready, "flushed": flushed,
            "in_flight": dense.in_flight}


def _simulate(world_size: int, stale: bool, compensation: float = 0.0, prediction: float = 0.0, sync_steps: int = 0):
    """Single process: gradient of the mean over ranks; applied at once, or one step late (after the first
    `sync_steps` steps, which apply theirs at once). Stale options: the gradient moved to the current weights by
    DC-ASGD-a, g + lambda0 * g^2 / sqrt(MS) * (W_now - W_then) with MS an EMA 0.95 of g^2; and computed at predicted
    weights W + s * (last update) when a step will follow."""
    model = _net()
    params = list(model.parameters())
    opt = _optimizer(params)
    pending, mean_square, last_update = None, None, None

    def apply(grads, computed_at):
        nonlocal mean_square, last_update
        before = [p.detach().clone() for p in params]
        if compensation:
            sq = [g * g for g in grads]
            mean_square = sq if mean_square is None else [0.95 * m + 0.05 * s for m, s in zip(mean_square, sq)]
            grads = [g + compensation * g * g * (p.detach() - w) / (m.sqrt() + 1e-7)
                     for g, p, w, m in zip(grads, params, computed_at, mean_square)]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        last_update = [p.detach() - b for p, b in zip(params, before)]

    for step in range(NUM_STEPS):
        model.zero_grad()
        shift = prediction and pending is not None and last_update is not None
        unshifted = [p.detach().clone() for p in params]
        if shift:
            with torch.no_grad():
                for p, u in zip(params, last_update):
                    p.add_(u, alpha=prediction)
        sum(_loss(model, *_data(step, r)) for r in range(world_size)).div(world_size).backward()
        fresh = ([p.grad.clone() for p in params], [p.detach().clone() for p in params])
        with torch.no_grad():
            for p, w in zip(params, unshifted):
                p.copy_(w)
        if not stale or step < sync_steps:
            apply(*fresh)
            continue
        if pending is not None:
            apply(*pending)
        pending = fresh
    if stale:
        apply(*pending)
    return [p.detach() for p in params]


@pytest.mark.parametrize("mode", ["sync", "async", "hook_sync"])
def test_dense_updates_match_the_simulated_rule(mode):
    """async: the stale rule; sync (plain DDP) and the hook with staleness disabled: the fresh rule."""
    r0, r1 = run_distributed(_train_ranks, mode, "none")
    expected = _simulate(2, stale=(mode == "async"))
    for a, b, e in zip(r0["params"], r1["params"], expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # replicas identical
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    if mode == "async":
        assert r0["ready"] == [False] + [True] * (NUM_STEPS - 1)  # no gradient to apply at the first step
        assert r0["flushed"] and not r0["in_flight"]


def test_delay_compensation_matches_the_simulated_rule():
    """DC-ASGD-a on the stale gradient, at each step and at the final flush, equals the rule done by hand."""
    r0, r1 = run_distributed(_train_ranks, "async", "none", 2.0)
    expected = _simulate(2, stale=True, compensation=2.0)
    plain_stale = _simulate(2, stale=True)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(expected, plain_stale))  # it does something
    for a, b, e in zip(r0["params"], r1["params"], expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compensation", [0.0, 2.0], ids=["prediction", "prediction_and_compensation"])
def test_weight_prediction_matches_the_simulated_rule(compensation):
    """Forward/backward at W + s * (last update) whenever a dense step follows, weights restored exactly after;
    with compensation too, the gradient is moved from the predicted weights to the real ones."""
    r0, r1 = run_distributed(_train_ranks, "async", "none", compensation, 1.0)
    expected = _simulate(2, stale=True, compensation=compensation, prediction=1.0)
    without = _simulate(2, stale=True, compensation=compensation)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(expected, without))  # it does something
    for a, b, e in zip(r0["params"], r1["params"], expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compensation,prediction", [(0.0, 0.0), (2.0, 1.0)], ids=["plain", "both_fixes"])
def test_sync_steps_then_stale_matches_the_simulated_rule(compensation, prediction):
    """train.allreduce_sync_steps: the first steps reduce synchronously, the stale rule takes over after them (its
    first stale step takes no dense step), the compensation's mean squares and the prediction's last update carry
    across the switch."""
    r0, r1 = run_distributed(_train_ranks, "async", "none", compensation, prediction, 3)
    expected = _simulate(2, stale=True, compensation=compensation, prediction=prediction, sync_steps=3)
    for other in (_simulate(2, stale=True, compensation=compensation, prediction=prediction),
                  _simulate(2, stale=False)):
        assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(expected, other))  # neither rule alone
    for a, b, e in zip(r0["params"], r1["params"], expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    assert r0["ready"] == [True] * 3 + [False] + [True] * (NUM_STEPS - 4)


def _back_to_sync_without_flush(rank, world_size):
    wrapper, state = make_data_parallel_wrapper("async")
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    dmp = DistributedModelParallel(_net(), env=ShardingEnv.from_process_group(torch.distributed.GroupMember.WORLD),
                                   device=torch.device("cpu"), plan=ShardingPlan({}), data_parallel_wrapper=wrapper)
    _loss(dmp, *_data(0, rank)).backward()
    state.staleness = 0
    try:
        _loss(dmp, *_data(1, rank)).backward()
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_staleness_back_to_0_with_a_pending_gradient_fails_loudly():
    """It would overwrite the pending gradient with this step's: a lost step, so the hook refuses."""
    assert all("flush() first" in r for r in run_distributed(_back_to_sync_without_flush))


def test_async_differs_from_sync():
    """Guard against a hook that is silently synchronous: the stale rule must give other weights."""
    stale = _simulate(2, stale=True)
    fresh = _simulate(2, stale=False)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(stale, fresh))


def test_bf16_compression_stays_close_to_fp32():
    (r0, r1) = run_distributed(_train_ranks, "async", "bf16")
    expected = _simulate(2, stale=True)
    for a, b, e in zip(r0["params"], r1["params"], expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, e, rtol=0, atol=2e-2)


def _trainer_steps(rank, world_size, cfg):
    from hyrank.pipeline.data.days import discover_days
    from hyrank.pipeline.distributed.env import env_of_current_group
    from hyrank.pipeline.train.trainer import Trainer

    trainer = Trainer(cfg, env_of_current_group())
    reader = trainer._reader(discover_days(cfg.data.root)[0], cfg.train.max_steps_per_day)
    losses = [trainer.train_step(batch).item() for batch in reader]
    return losses, {n: p.detach().clone() for n, p in trainer.dense_named_parameters()}


def _trainer_manual_stale(rank, world_size, cfg, sync_steps=0):
    """Plain DDP, with the stale rule applied by hand: the tower steps on the previous step's reduced gradient,
    data-parallel tables on their own fresh one, and the first step takes no dense step (as the hook's); the
    first `sync_steps` steps take plain DDP's step."""
    from hyrank.pipeline.data.days import discover_days
    from hyrank.pipeline.distributed.env import env_of_current_group
    from hyrank.pipeline.train.trainer import Trainer

    trainer = Trainer(cfg, env_of_current_group())
    tower = [p for _, p in trainer.dense_named_parameters()]
    reader = trainer._reader(discover_days(cfg.data.root)[0], cfg.train.max_steps_per_day)
    losses, previous = [], None
    for batch in reader:
        loss, _ = trainer.model(batch)
        trainer.optimizer.zero_grad()
        loss.backward()
        fresh = [p.grad.clone() for p in tower]
        if len(losses) < sync_steps:
            trainer.dense.optimizer_step()
            losses.append(loss.item())
            continue
        if previous is not None:
            for p, g in zip(tower, previous):
                p.grad.copy_(g)
            trainer.dense.optimizer_step()
        previous = fresh
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in trainer.dense_named_parameters()}


@pytest.mark.parametrize("hook_mode,reference", [("hook_sync", _trainer_steps), ("async", _trainer_manual_stale)],
                         ids=["staleness0_vs_plain_ddp", "async_vs_stale_rule_by_hand"])
def test_hook_on_hyformer_takes_the_reference_steps(small_cfg, hook_mode, reference):
    """The hook on a real tower (hundreds of parameters, DDP re-bucketing across steps, a data-parallel table
    beside it): with staleness 0 it takes plain DDP's steps; async, exactly those of plain DDP with the
    one-step-stale rule applied by hand."""
    cfg = with_values(small_cfg, {"model.name": "hyformer", "model.options": {}, "train.max_steps_per_day": 6,
                                  "train.allreduce_weight_prediction": 0.0,  # the plain rule
                                  "train.allreduce_delay_compensation": 0.0, "train.allreduce": "sync"})
    (ref_losses, ref), _ = run_distributed(reference, cfg, timeout_s=300)
    # "hook_sync" is a test-only mode that loading a config refuses: set past the loader's check
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, allreduce=hook_mode))
    (hook_losses, hook), _ = run_distributed(_trainer_steps, cfg, timeout_s=300)
    assert len(hook) > 100
    torch.testing.assert_close(hook_losses, ref_losses, rtol=0, atol=1e-6)
    for name, w in ref.items():
        torch.testing.assert_close(hook[name], w, rtol=1e-5, atol=1e-6, msg=f"{name} differs ({hook_mode})")


def test_trainer_reduces_synchronously_for_its_first_steps(small_cfg):
    """train.allreduce_sync_steps = 3 on the trainer: plain DDP's steps for 3 steps, then the stale rule by hand."""
    import functools

    cfg = with_values(small_cfg, {"model.name": "hyformer", "model.options": {}, "train.max_steps_per_day": 6,
                                  "train.allreduce_weight_prediction": 0.0,
                                  "train.allreduce_delay_compensation": 0.0, "train.allreduce": "sync"})
    (ref_losses, ref), _ = run_distributed(functools.partial(_trainer_manual_stale, sync_steps=3), cfg,
                                           timeout_s=300)
    cfg = with_values(cfg, {"train.allreduce": "async", "train.allreduce_sync_steps": 3})
    (losses, params), _ = run_distributed(_trainer_steps, cfg, timeout_s=300)
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=1e-6)
    for name, w in ref.items():
        torch.testing.assert_close(params[name], w, rtol=1e-5, atol=1e-6, msg=f"{name} differs")


def _raise_sync_steps_midway(rank, world_size, cfg):
    """Two async steps, then allreduce_sync_steps raised above the step count (as a resumed run with a new config
    would see it): the trainer flushes the pending gradient instead of losing it, and reduces synchronously."""
    from hyrank.pipeline.data.days import discover_days
    from hyrank.pipeline.distributed.env import env_of_current_group
    from hyrank.pipeline.train.trainer import Trainer

    trainer = Trainer(cfg, env_of_current_group())
    batches = iter(trainer._reader(discover_days(cfg.data.root)[0], 4))
    for _ in range(2):
        trainer.train_step(next(batches))
    pending = trainer.dense.in_flight
    dense_steps = trainer.schedule.num_steps
    trainer.dense.sync_steps = 100
    trainer.train_step(next(batches))
    return pending, trainer.schedule.num_steps - dense_steps, trainer.dense.hook.staleness, trainer.dense.in_flight


def test_raising_sync_steps_over_a_pending_gradient_flushes_it(small_cfg):
    cfg = with_values(small_cfg, {"train.allreduce": "async"})
    (pending, steps_taken, staleness, in_flight), _ = run_distributed(_raise_sync_steps_midway, cfg, timeout_s=300)
    assert pending and staleness == 0 and not in_flight
    assert steps_taken == 2  # the flushed pending gradient, then the step's own synchronous one
