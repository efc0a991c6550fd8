"""Managed tables through a run's checkpoints (pipeline/distributed/managed_state.py): the remap state is saved per
slot and reshards with the rows, so a day-end checkpoint continues on 2 -> 1 and 1 -> 2 ranks with the same
held-out metrics (the tolerance of tests/test_stream_lifecycle.py); a resized managed table is refused with the
config diff, or carried by --warm-start matching with its ids and their rows; the day's counts are reported."""

import json

import pytest
import torch

from hyrank.pipeline.config import with_values
from hyrank.pipeline.data.days import discover_days
from hyrank.pipeline.data.synth import generate_logs
from hyrank.pipeline.distributed.env import env_of_current_group
from hyrank.pipeline.train.resume import check_resumable
from hyrank.pipeline.train.trainer import RunPlan, Trainer

from conftest import latest_checkpoint_tensors, small_synth, tiny_cfg
from dist import run_distributed

pytestmark = pytest.mark.dist

# item (read by sequences: the MC-EC) by recency, user (pooled only: the MC-EBC) by frequency; intervals that do
# not divide the day's steps, so that a checkpoint's flush is what admits the last ids
MANAGED = ['features.tables.6.managed={eviction="lru", eviction_interval_steps=5}',
           'features.tables.0.managed={eviction="lfu", eviction_interval_steps=7}']


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("managed") / "data"
    generate_logs(small_synth(num_days=3, rows_per_day=3000), root)
    return root


def _train_then_score(rank, world_size, cfg, resume, warm_start=None):
    """Day 1 trained (or already trained by the checkpoint resumed), then day 3 scored."""
    days = discover_days(cfg.data.root)
    trainer = Trainer(cfg, env_of_current_group())
    result = trainer.run(RunPlan(train_days=days[:1], eval_days=days[2:], resume=resume, warm_start=warm_start))
    model = trainer.checkpointer.tensors["model"]
    return {"trained": [s.day for s in result.trained], "metrics": result.metrics[str(days[2].day)].to_dict(),
            "moved": sum(model.moved.values()), "dropped": dict(model.dropped), "rows": _rows_by_id(trainer)}


def _rows_by_id(trainer) -> dict[str, dict[int, list[float]]]:
    """Each managed table's (mixed) ids on this rank and the weights of their rows."""
    from hyrank.embeddings.managed import FREE
    from hyrank.embeddings.managed_lookup import table_shards

    out = {}
    for shard in table_shards(trainer.model):
        ids, weights = shard.slot_ids(), shard.weights()
        out[shard.name] = {int(i): weights[s].tolist() for s, i in enumerate(ids.tolist()) if i != FREE}
    return out


@pytest.mark.parametrize("saved_on,resumed_on", [(2, 1), (1, 2)])
def test_managed_day_end_checkpoint_continues_on_another_world_size_with_the_same_predictions(root, tmp_path,
                                                                                                 saved_on, resumed_on):
    cfg = tiny_cfg(root, tmp_path / "run", *MANAGED)
    before = run_distributed(_train_then_score, cfg, None, world_size=saved_on, timeout_s=300)
    after = run_distributed(_train_then_score, cfg, "latest", world_size=resumed_on, timeout_s=300)
    assert before[0]["trained"] == ["2026-11-01"] and after[0]["trained"] == []
    # every id kept its row, wherever it now lives
    for table in ("item", "user"):
        saved = {i: row for r in before for i, row in r["rows"][table].items()}
        loaded = {i: row for r in after for i, row in r["rows"][table].items()}
        assert loaded == saved and len(saved) > 100, table
    if resumed_on > saved_on:  # half of the ids live on the other rank now
        assert sum(r["moved"] for r in after) > len(saved) // 4
    assert all(not any(r["dropped"].values()) for r in after)
    m0, m1 = before[0]["metrics"], after[0]["metrics"]
    assert m1["num_rows"] == m0["num_rows"] == 3000
    for key in ("auc", "query_auc", "logloss", "calibration"):
        assert m1[key] == pytest.approx(m0[key], rel=1e-6, abs=1e-7), key
    tensors, _ = latest_checkpoint_tensors(tmp_path / "run")
    remap = "model.sparse.mc_ec._managed_collision_collection._managed_collision_modules.item."
    assert {k for k in tensors if k.startswith(remap)} == {remap + n for n in
                                                          ("slot_ids.", "slot_scores.", "_current_iter_tensor.")}
    day = json.loads((tmp_path / "run" / "train" / "day-2026-11-01.json").read_text())
    item = day["managed"]["item"]
    assert item["looked_up"] > item["missed"] > 0 and item["admitted"] == item["slots_used"] > 0
    assert day["managed"]["user"]["slots"] == 50_000 - saved_on  # a slot of each shard is the zero row


def test_managed_table_resized_is_refused_with_its_diff_or_warm_started_with_its_ids(root, tmp_path):
    cfg = tiny_cfg(root, tmp_path / "run", *MANAGED)
    (first,) = run_distributed(_train_then_score, cfg, None, world_size=1, timeout_s=300)
    old = first["rows"]["item"]
    smaller = len(old) // 2 + 2  # half of the ids fit in the new size (a slot per shard stays free)
    resized = with_values(cfg, {"features.tables": [dict(t, num_embeddings=smaller) if t["name"] == "item" else t
                                                    for t in _tables(cfg)]})
    with pytest.raises(ValueError, match=f"table 'item' resized: num_embeddings 100000 -> {smaller}.*--warm-start"):
        check_resumable(resized, "latest")
    carried = run_distributed(_train_then_score, resized, "latest", "matching", world_size=2, timeout_s=300)
    now = {i: row for r in carried for i, row in r["rows"]["item"].items()}
    assert len(now) == smaller - 2 and set(now) <= set(old)
    assert all(now[i] == old[i] for i in now)  # every id carried with its row, onto the rank that owns it
    assert sum(r["dropped"].get("item", 0) for r in carried) == len(old) - len(now)  # counted, never silent
    assert carried[0]["trained"] == []  # the run's progress carried: day 1 is not trained again


def _tables(cfg) -> list[dict]:
    from hyrank.pipeline.config import to_dict

    return to_dict(cfg)["features"]["tables"]
