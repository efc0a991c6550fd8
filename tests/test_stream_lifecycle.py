"""The checkpoint lifecycle of a daily run: resharding 2 -> 1 and 1 -> 2 ranks with the same predictions, a
checkpoint of another model refused with a readable diff before any collective (or warm-started from on purpose),
and the best checkpoints kept by their progressive metric."""

import dataclasses
import json
import re

import pytest
import torch

from hyrank.pipeline.config import ModelConfig
from hyrank.pipeline.data.days import discover_days
from hyrank.pipeline.data.synth import generate_logs
from hyrank.pipeline.distributed.env import env_of_current_group
from hyrank.pipeline.stream import StreamOptions, stream
from hyrank.pipeline.train.resume import check_resumable
from hyrank.pipeline.train.state import model_diff
from hyrank.pipeline.train.trainer import RunPlan, Trainer

from conftest import small_synth, tiny_cfg
from dist import run_distributed

pytestmark = pytest.mark.dist

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle") / "data"
    generate_logs(small_synth(num_days=3, rows_per_day=3000), root)
    return root


def _train_then_score(rank, world_size, cfg, resume):
    """Day 1 trained (or, resuming, already trained by the checkpoint), then day 3 scored."""
    days = discover_days(cfg.data.root)
    result = Trainer(cfg, env_of_current_group()).run(RunPlan(train_days=days[:1], eval_days=days[2:],
                                                               resume=resume))
    return [s.day for s in result.trained], result.metrics[str(days[2].day)].to_dict()


@pytest.mark.parametrize("saved_on,resumed_on", [(2, 1), (1, 2)])
def test_a_day_end_checkpoint_continues_on_another_world_size_with_the_same_predictions(root, tmp_path, saved_on,
                                                                                         resumed_on):
    cfg = tiny_cfg(root, tmp_path / "run")
    (trained, before), *_ = run_distributed(_train_then_score, cfg, None, world_size=saved_on, timeout_s=300)
    (again, after), *_ = run_distributed(_train_then_score, cfg, "latest", world_size=resumed_on, timeout_s=300)
    assert trained == ["2026-11-01"] and again == []  # resumed: day 1 is done
    assert after["num_rows"] == before["num_rows"] == 3000
    # the same weights score the same rows: the batches are cut differently across ranks, so a row's logit may
    # differ in the last bits (GEMM blocking depends on the batch), far below what the metrics resolve
    for key in ("auc", "query_auc", "logloss", "calibration"):
        assert after[key] == pytest.approx(before[key], rel=1e-6, abs=1e-7), key


def _stream(rank, world_size, cfg, options):
    result = stream(cfg, env_of_current_group(), options)
    return [s.day for s in result.trained]


def test_a_checkpoint_of_another_model_is_refused_with_its_diff_before_any_collective(root, tmp_path):
    cfg = tiny_cfg(root, tmp_path / "run")
    run_distributed(_stream, cfg, StreamOptions(until=discover_days(root)[0].day), timeout_s=300)
    changed = dataclasses.replace(cfg, model=ModelConfig("dlrm_mlp", {"hidden": [64]}),
                                  features=dataclasses.replace(cfg.features, tables=[
                                      dataclasses.replace(t, num_embeddings=t.num_embeddings * 2)
                                      if t.name == "user" else t for t in cfg.features.tables]))
    # here, in a process with no process group at all: the refusal needs no collective
    with pytest.raises(ValueError) as e:
        check_resumable(changed, "latest-if-any")
    message = str(e.value)
    assert "table 'user' resized: num_embeddings 50000 -> 100000" in message
    assert "model.options.hidden: [32] -> [64]" in message and "--warm-start" in message
    check_resumable(changed, "latest-if-any", warm_start="tables")  # a warm start says what to carry instead
    check_resumable(cfg, "latest-if-any")


def test_model_diff_names_tables_added_removed_and_the_tower():
    saved = json.loads(json.dumps({"features": {"tables": [{"name": "a", "num_embeddings": 10, "dim": 4},
                                                           {"name": "b", "num_embeddings": 5, "dim": 4}]},
                                   "model": {"name": "dcnv2", "options": {}}}))
    current = {"features": {"tables": [{"name": "a", "num_embeddings": 10, "dim": 8},
                                       {"name": "c", "num_embeddings": 7, "dim": 4}]},
               "model": {"name": "hyformer", "options": {}}}
    assert model_diff(saved, current) == ["table 'c' added (7 x 4)", "table 'b' removed",
                                          "table 'a' resized: dim 4 -> 8", "model.name 'dcnv2' -> 'hyformer'"]
    assert model_diff(saved, saved) == []


def _tables_and_tower(rank, world_size, cfg, options):
    days = _stream(rank, world_size, cfg, options)
    trainer = Trainer(cfg, env_of_current_group())
    trainer.resume("latest")
    state = trainer.model.state_dict()
    tables = {k: v.local_shards()[0].tensor.clone() if hasattr(v, "local_shards") else v.clone()
              for k, v in state.items() if k.startswith("sparse.")}
    return days, tables, trainer.progress.days_done


def test_warm_start_carries_the_tables_into_a_changed_tower(root, tmp_path):
    first = tiny_cfg(root, tmp_path / "run")
    one_day = StreamOptions(until=discover_days(root)[0].day)
    (days, tables, _), _ = run_distributed(_tables_and_tower, first, one_day, timeout_s=300)
    wider = dataclasses.replace(first, model=ModelConfig("dlrm_mlp", {"hidden": [48]}))
    options = StreamOptions(until=discover_days(root)[0].day, warm_start="tables")
    (days, carried, done), _ = run_distributed(_tables_and_tower, wider, options, timeout_s=300)
    assert days == [] and done == ["2026-11-01"]  # the run's progress carried: day 1 is not trained again
    assert carried.keys() == tables.keys()
    for key, value in tables.items():
        assert torch.equal(carried[key], value), key


def test_the_best_checkpoints_by_progressive_auc_outlive_the_newest_ones(root, tmp_path):
    cfg = tiny_cfg(root, tmp_path / "run", "checkpoint.keep=1", "checkpoint.keep_best=1")
    run_distributed(_stream, cfg, StreamOptions(), timeout_s=300)
    progressive = {d.day: json.loads((tmp_path / "run" / "metrics" / f"progressive-{d.day}.json").read_text())
                   for d in discover_days(root)}
    scored = {f"step-{p['model_step']:09d}": p["metrics"]["auc"] for p in progressive.values() if p["metrics"]}
    best = max(scored, key=scored.get)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    newest = sorted(kept)[-1]
    assert set(kept) == {best, newest}, (kept, scored)


def test_stream_publishes_each_day_behind_the_quality_gate(root, tmp_path):
    """A margin of -1 demands an AUC 1.0 above the published model's: the first day's model is published (there is
    nothing to compare with), the later ones are refused, recorded, and the run goes on."""
    cfg = tiny_cfg(root, tmp_path / "run")
    options = StreamOptions(until=discover_days(root)[1].day, export_to=tmp_path / "exports", quality_margin=-1.0)
    trained, _ = run_distributed(_stream, cfg, options, timeout_s=300)
    assert trained == ["2026-11-01", "2026-11-02"]
    first = (tmp_path / "exports" / "latest").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{8}-step-\d{9}", first), first  # <run id>-step-N
    assert [p.name for p in (tmp_path / "exports" / "versions").iterdir()] == [first]
    events = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] in ("published", "not_published")] == \
        ["published", "not_published"]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["last_export"].startswith(f"not published: {first[:9]}step-") and \
        "below the published" in status["last_export"]
    # the publish root's own history holds the same two events, whoever published there
    published = [json.loads(line) for line in (tmp_path / "exports" / "history.jsonl").read_text().splitlines()]
    assert [e["event"] for e in published] == ["published", "refused"]
