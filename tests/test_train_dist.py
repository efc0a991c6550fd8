"""Walking skeleton on 2 gloo ranks: DMP-sharded tables + DDP tower train, the loss falls, replicas agree."""

import dataclasses

import pyarrow.parquet as pq
import pytest
import torch

from hyrank.pipeline.config import with_values
from hyrank.pipeline.data.days import discover_days
from hyrank.pipeline.data.synth import generate_logs
from hyrank.pipeline.distributed.env import env_of_current_group
from hyrank.pipeline.train.trainer import RunPlan, Trainer

from conftest import small_synth
from dist import run_distributed

pytestmark = pytest.mark.dist


def _train_two_days(rank, world_size, cfg):
    trainer = Trainer(cfg, env_of_current_group())
    days = discover_days(cfg.data.root)
    result = trainer.run(RunPlan(train_days=days[:2], eval_days=[days[2]]))
    stats, metrics = result.trained, result.metrics[str(days[2].day)]
    dense = {k: v.detach().clone() for k, v in trainer.model.module.tower.state_dict().items()}
    return {"losses": [l for s in stats for l in s.losses], "dense": dense, "metrics": metrics,
            "rows": [s.rows for s in stats], "wait": [(s.input_wait_s, s.seconds) for s in stats],
            "agree": [(s.agree_wait_s, s.input_wait_s) for s in stats]}


@pytest.mark.parametrize("allreduce", ["sync", "async"])
def test_skeleton_trains_on_two_ranks(small_cfg, allreduce):
    r0, r1 = run_distributed(_train_two_days, with_values(small_cfg, {"train.allreduce": allreduce}), timeout_s=300)
    losses = r0["losses"]
    assert len(losses) == 2 * -(-3000 // 128)  # 3000 rows a rank; the last batch 56 rows and 72 of filler
    assert r0["rows"] == [6000, 6000]  # every row of both days
    assert all(0 < wait < seconds for wait, seconds in r0["wait"] + r1["wait"])  # the first batch is always waited on
    assert all(0 < agree <= wait for agree, wait in r0["agree"] + r1["agree"])  # the ranks' agreement: part of it
    assert r0["losses"] == r1["losses"]  # all-reduced per step
    head, tail = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert tail < head - 0.05, f"loss did not fall: first {head:.4f}, last {tail:.4f}"
    for name, w in r0["dense"].items():
        torch.testing.assert_close(w, r1["dense"][name], rtol=0, atol=0, msg=f"replicas differ at {name}")
    m = r0["metrics"]
    assert m == r1["metrics"]
    assert m.num_rows == 6000  # the whole evaluation day
    assert 0.55 < m.auc <= m.oracle_auc


def _train_few_steps(rank, world_size, cfg):
    trainer = Trainer(cfg, env_of_current_group())
    days = discover_days(cfg.data.root)
    stats = trainer.train_day(days[0])
    return stats.losses, trainer.evaluate(days[1]).auc


@pytest.mark.parametrize("name", sorted(__import__("hyrank.models").models.MODELS))
def test_every_registered_model_trains_on_two_ranks(small_cfg, name):
    cfg = with_values(small_cfg, {"model.name": name, "model.options": {}, "train.max_steps_per_day": 4,
                                  "train.eval_max_batches": 2,
                                  "embeddings.dedup": name == "hyformer"})  # the dedup path end to end, on HyFormer
    (losses, auc), (losses1, auc1) = run_distributed(_train_few_steps, cfg, timeout_s=300)
    assert len(losses) == 4 and losses == losses1 and auc == auc1
    assert all(0 < l < 2 for l in losses)


def _losses_one_day(rank, world_size, cfg):
    trainer = Trainer(cfg, env_of_current_group())
    days = discover_days(cfg.data.root)
    losses = trainer.train_day(days[0]).losses
    if cfg.train.pipeline == "sparse_dist":
        assert trainer.pipelined_modules == 2, "the EBC and the EC should both be pipelined"
    return losses, trainer.evaluate(days[1]).auc


@pytest.mark.parametrize("allreduce", ["sync", "async", "async_predicted"])
def test_train_pipeline_sparse_dist_matches_the_plain_loop(small_cfg, allreduce):
    """async_predicted: the weight prediction shifts the weights around the pipeline's forward and backward."""
    cfg = with_values(small_cfg, {"train.allreduce": allreduce.removesuffix("_predicted"),
                                  "train.allreduce_weight_prediction": 1.0 if allreduce.endswith("_predicted") else 0.0,
                                  "train.max_steps_per_day": 8, "train.eval_max_batches": 3})
    plain, _ = run_distributed(_losses_one_day, cfg, timeout_s=300)
    piped, piped1 = run_distributed(_losses_one_day, with_values(cfg, {"train.pipeline": "sparse_dist"}), timeout_s=300)
    assert piped == piped1
    assert piped[0] == plain[0]  # same losses step by step
    assert piped[1] == plain[1]  # and the same model after the day (evaluation runs unpipelined)


def _train_and_evaluate_one_day(rank, world_size, cfg):
    days = discover_days(cfg.data.root)
    result = Trainer(cfg, env_of_current_group()).run(RunPlan(train_days=days[:1], eval_days=days[:1]))
    stats = result.trained[0]
    return stats.steps, stats.rows, result.metrics[str(days[0].day)].num_rows


def test_a_day_of_one_row_group_trains_and_evaluates_every_row_on_two_ranks(tmp_path, small_cfg):
    """Issue 14's 5000-rows-a-day case: one row group, two ranks. Whole row groups dealt to ranks left one rank
    without rows and the day trained 0 steps and was recorded as done."""
    root = tmp_path / "one_group"
    generate_logs(small_synth(num_days=1, rows_per_day=5000, rows_per_chunk=5000, chunks_per_file=1), root)
    [day] = discover_days(root)
    assert sum(pq.ParquetFile(f).metadata.num_row_groups for f in day.files) == 1
    cfg = dataclasses.replace(small_cfg, data=dataclasses.replace(small_cfg.data, root=str(root)))
    (steps, rows, evaluated), _ = run_distributed(_train_and_evaluate_one_day, cfg, timeout_s=300)
    assert steps == -(-2500 // 128) and rows == 5000 and evaluated == 5000


def test_input_clock_counts_only_the_wait_for_batches():
    """The input-wait share of a day (DayStats.input_wait_s, `hyrank bench e2e`) is the time spent inside next():
    a source that takes 30 ms a batch under a consumer that takes 10 ms a step is 3/4 input."""
    import time

    from hyrank.pipeline.train.pipelined import InputClock

    def slow_source():
        for i in range(5):
            time.sleep(0.03)
            yield i

    clock = InputClock(slow_source())
    start = time.perf_counter()
    assert [b for b in clock if time.sleep(0.01) is None] == [0, 1, 2, 3, 4]
    total = time.perf_counter() - start
    assert 0.15 <= clock.wait_s < total - 0.045, (clock.wait_s, total)
