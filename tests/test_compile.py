"""train.compile and train.autocast (pipeline/train/compile.py): a tower under torch.compile (inductor) gives the eager
tower's logits and gradients; a 2-rank run with it (DMP tables, DDP tower, the async dense sync with weight
prediction) trains like the eager run, resumes from its checkpoint, and exports from it. A bf16-autocast tower's
training step gives the fp32 step's logits and gradients within bf16's rounding (BF16_LOGITS, BF16_GRAD,
BF16_TENSOR), and a 2-rank run with train.autocast = "bf16" (default.toml's DLRM-MLP, tiny) trains like the fp32
one, checkpoints, and exports (the export's parity gate in fp32 against the checkpoint's weights).

Inductor fuses kernels and reorders float reductions, so "the same" is within TOL, not bit for bit. Compiling is
slow on a small machine (tens of seconds a tower): the default run covers HHFT (attention, per-token bmm, batched
projections); `-m heavy` covers every other registered tower.
"""

import pytest
import torch

from hyrank.models import MODELS
from hyrank.pipeline.config import with_values
from hyrank.pipeline.data.days import discover_days
from hyrank.pipeline.data.synth import generate_logs
from hyrank.pipeline.distributed.env import env_of_current_group
from hyrank.pipeline.train.compile import autocast_tower, compile_tower

from conftest import small_synth, tiny_cfg
from dist import run_distributed
from test_models import _logits_and_grads, build, make_input

TOL = {"rtol": 1e-4, "atol": 1e-5}
# bf16 keeps 8 mantissa bits (relative rounding 2^-9 per op). Measured on these towers (BCE loss, batch 2): logits
# within 0.011 (L2-relative) of fp32, the whole gradient within 0.06 (HHFT; HyFormer 0.006), each tensor within 0.1
# of its own size or of 1e-3 of the whole gradient's (attention key biases: zero gradient in exact arithmetic)
BF16_LOGITS, BF16_GRAD, BF16_TENSOR = 0.02, 0.1, 0.15


def _compiled_matches_eager(name):
    eager, compiled = build(name).eval(), build(name).eval()  # eval: no dropout, one function both ways
    compile_tower(compiled, report=False)
    x = make_input(batch_size=2)
    want_logits, want_grads = _logits_and_grads(eager, x)
    got_logits, got_grads = _logits_and_grads(compiled, x)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep the plain names
    torch.testing.assert_close(got_logits, want_logits, **TOL)
    assert got_grads.keys() == want_grads.keys()
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], **TOL, msg=n)


def test_compiled_tower_matches_eager_logits_and_gradients():
    _compiled_matches_eager("hhft")


@pytest.mark.heavy
@pytest.mark.parametrize("name", sorted(set(MODELS) - {"hhft"}))
def test_every_registered_tower_compiled_matches_eager(name):
    _compiled_matches_eager(name)


def _train_resume_score(rank, world_size, cfg):
    """Day 1 trained from scratch, then a new trainer resumes its checkpoint and trains day 2; day 2's logits."""
    from hyrank.pipeline.train.evaluate import score_day
    from hyrank.pipeline.train.trainer import RunPlan, Trainer

    days = discover_days(cfg.data.root)
    first = Trainer(cfg, env_of_current_group()).run(RunPlan(train_days=days[:1]))
    trainer = Trainer(cfg, env_of_current_group())
    result = trainer.run(RunPlan(train_days=days[1:2], resume=str(first.checkpoint)))
    scores = score_day(trainer.model, trainer._reader(days[1], 0), device=torch.device("cpu"))
    losses = first.trained[0].losses + result.trained[0].losses
    compiled = hasattr(trainer.model.module.tower.forward, "_torchdynamo_orig_callable")  # torch.compile's wrapper
    assert compiled == cfg.train.compile
    return str(result.checkpoint), losses, scores.logits


@pytest.mark.dist
def test_a_compiled_two_rank_run_trains_resumes_and_exports_like_the_eager_one(tmp_path):
    from hyrank.pipeline.serving.export import export_checkpoint

    generate_logs(small_synth(num_days=2, rows_per_day=1000), tmp_path / "data")
    async_sync = {"train.allreduce": "async", "train.allreduce_weight_prediction": 1.0,
                  "train.allreduce_sync_steps": 2}
    eager = with_values(tiny_cfg(tmp_path / "data", tmp_path / "eager"), async_sync)
    compiled = with_values(tiny_cfg(tmp_path / "data", tmp_path / "compiled"), async_sync | {"train.compile": True})
    (_, want_losses, want0), (_, _, want1) = run_distributed(_train_resume_score, eager, timeout_s=600)
    (checkpoint, losses, got0), (_, losses1, got1) = run_distributed(_train_resume_score, compiled, timeout_s=600)
    assert losses == losses1 and len(losses) == len(want_losses) == 2 * -(-500 // 64)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(torch.cat([got0, got1]), torch.cat([want0, want1]), rtol=1e-3, atol=1e-4)
    result = export_checkpoint(checkpoint, tmp_path / "exports")  # the export's own parity gate against the trainer
    assert result.parity["max_abs_logit_diff"] <= 1e-5 and result.parity["rows"] == 1000


def _relative(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-12) -> float:
    return ((got - want).norm() / want.norm().clamp_min(floor)).item()


def _bce_logits_and_grads(model, x):
    model.zero_grad()
    logits = model(x).logits
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 0.0])).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["hyformer", "hhft", "hiformer"])
def test_a_bf16_autocast_training_step_gives_the_fp32_logits_and_gradients_within_bf16_rounding(name):
    no_dropout = {"head_dropout": 0.0} if name == "hyformer" else {}  # train mode: one function both ways
    fp32, bf16 = build(name, **no_dropout), build(name, **no_dropout)
    autocast_tower(bf16, "cpu")
    x = make_input(batch_size=2)
    want_logits, want_grads = _bce_logits_and_grads(fp32, x)
    got_logits, got_grads = _bce_logits_and_grads(bf16, x)
    assert got_logits.dtype == torch.float32 and list(bf16.state_dict()) == list(fp32.state_dict())
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in bf16.parameters() if p.grad is not None)
    assert 0 < _relative(got_logits, want_logits) < BF16_LOGITS  # > 0: it really ran in bf16
    assert got_grads.keys() == want_grads.keys()
    whole = torch.cat([g.flatten() for g in want_grads.values()])
    assert _relative(torch.cat([got_grads[n].flatten() for n in want_grads]), whole) < BF16_GRAD
    for n in want_grads:
        assert _relative(got_grads[n], want_grads[n], 1e-3 * whole.norm().item()) < BF16_TENSOR, n
    bf16.eval()  # evaluation and scoring: plain fp32, the same function as the fp32 tower
    fp32.eval()
    torch.testing.assert_close(bf16(x).logits, fp32(x).logits, rtol=0, atol=0)


def _train_and_keep(rank, world_size, cfg):
    from hyrank.pipeline.train.trainer import RunPlan, Trainer

    days = discover_days(cfg.data.root)
    result = Trainer(cfg, env_of_current_group()).run(RunPlan(train_days=days[:1]))
    return str(result.checkpoint), result.trained[0].losses


@pytest.mark.dist
def test_a_bf16_autocast_two_rank_run_trains_checkpoints_and_exports(tmp_path):
    from hyrank.pipeline.serving.export import export_checkpoint

    generate_logs(small_synth(num_days=1, rows_per_day=1000), tmp_path / "data")
    fp32 = tiny_cfg(tmp_path / "data", tmp_path / "fp32")
    bf16 = with_values(tiny_cfg(tmp_path / "data", tmp_path / "bf16"), {"train.autocast": "bf16"})
    (_, want), _ = run_distributed(_train_and_keep, fp32, timeout_s=600)
    (checkpoint, losses), _ = run_distributed(_train_and_keep, bf16, timeout_s=600)
    assert len(losses) == len(want) == -(-500 // 64) and losses != want  # bf16 ran, and trained like fp32
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want), rtol=0.02, atol=0.01)
    result = export_checkpoint(checkpoint, tmp_path / "exports")  # parity: fp32 program vs fp32 trainer forward
    assert result.parity["max_abs_logit_diff"] <= 1e-5 and result.parity["rows"] == 1000


def _compile_in_rank(rank, world_size):
    f = torch.compile(lambda x: (x * 2).sin() + x.cos())
    return float(f(torch.full((4,), float(rank))).sum())


def test_a_forked_rank_compiles_after_the_parent_started_its_compile_pool(tmp_path, monkeypatch):
    """A fork copies inductor's compile thread pool without its threads: run_local's ranks must start their own, or
    the first compile in a rank waits forever (it hung the suite once a test before had compiled in the parent)."""
    from torch._inductor.async_compile import AsyncCompile

    from hyrank.pipeline.distributed.local import run_local

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a cold cache: the ranks really compile
    AsyncCompile.pool().submit(int).result()
    got = run_local(_compile_in_rank, world_size=2, timeout_s=180)
    want = [float(((torch.full((4,), float(r)) * 2).sin() + torch.full((4,), float(r)).cos()).sum()) for r in (0, 1)]
    assert got == pytest.approx(want, rel=1e-6)
