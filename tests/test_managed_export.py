"""Managed tables exported and served (pipeline/serving/managed.py, delta.py): a 2-rank checkpoint of drifting ids
exports with its remap rebuilt whole and scores what the trainer scored; an unknown id reads the zero fallback row
and is counted; lookups never admit; a delta of the next day's checkpoint scores bit for bit as its full export,
is a fraction of its bytes, is refused when its base is missing or damaged, and a server hot-reloads onto it."""

import json
import shutil
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from hyrank.embeddings.managed import FREE, by_slot
from hyrank.pipeline.data.days import discover_days
from hyrank.pipeline.data.synth import generate_logs
from hyrank.pipeline.distributed.env import env_of_current_group
from hyrank.pipeline.files import write_atomic
from hyrank.pipeline.serving.artifact import Artifact
from hyrank.pipeline.serving.delta import DELTA, DeltaBaseError, state_of
from hyrank.pipeline.serving.export import DeltaRefused, export_checkpoint

from hyrank.bench.serve_load import ServerProcess, http_json, http_text
from conftest import small_synth, tiny_cfg
from dist import run_distributed
from test_export import _hyrank
from test_serve import _samples

pytestmark = pytest.mark.dist

MANAGED = ['features.tables.6.managed={eviction="lru", eviction_interval_steps=5}',
           'features.tables.0.managed={eviction="lfu", eviction_interval_steps=7}']
REMAP = "model.sparse.{}._managed_collision_collection._managed_collision_modules.{}."
WEIGHT = {"user": "model.sparse.mc_ebc._embedding_module.embedding_bags.user.weight",
          "item": "model.sparse.mc_ec._embedding_module.embeddings.item.weight"}
COLLECTION = {"user": "mc_ebc", "item": "mc_ec"}


def _train_and_score(rank, world_size, cfg, days_trained):
    """Train up to day `days_trained` (resuming), then each rank's logits of the next day (the trainer's own
    evaluation path)."""
    from hyrank.pipeline.train.evaluate import score_day
    from hyrank.pipeline.train.trainer import RunPlan, Trainer

    days = discover_days(cfg.data.root)
    trainer = Trainer(cfg, env_of_current_group())
    result = trainer.run(RunPlan(train_days=days[:days_trained], resume="latest-if-any"))
    scores = score_day(trainer.model, trainer._reader(days[days_trained], 0), device=torch.device("cpu"))
    return str(result.checkpoint), scores.logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Drifting ids, user and item managed, 2 ranks: the checkpoints after day 1 and day 2, and the trainer's
    logits of day 2 after day 1 (file order)."""
    tmp = tmp_path_factory.mktemp("mexport")
    generate_logs(small_synth(num_days=3, rows_per_day=2000, drift=True), tmp / "data")
    cfg = tiny_cfg(tmp / "data", tmp / "run", *MANAGED)
    (day1, logits0), (_, logits1) = run_distributed(_train_and_score, cfg, 1, timeout_s=300)
    (day2, _), _ = run_distributed(_train_and_score, cfg, 2, timeout_s=300)
    return tmp, cfg, day1, torch.cat([logits0, logits1]), day2


@pytest.fixture(scope="module")
def published(trained):
    """root `a`: day 1's model in full, then day 2's as a delta of it; root `b`: day 2's model in full."""
    tmp, _, day1, _, day2 = trained
    first = export_checkpoint(day1, tmp / "a")
    done = _hyrank("export", "--checkpoint", day2, "--out", tmp / "a", "--delta-from", first.version)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "a delta of" in done.stdout and "remap slots" in done.stdout, done.stdout
    full = export_checkpoint(day2, tmp / "b")
    return tmp / "a", tmp / "b", first.version, full.version


def _day_rows(cfg, day: int, artifact):
    return pq.read_table(discover_days(cfg.data.root)[day].files[0]).select(artifact.features)


def test_a_two_rank_managed_checkpoint_exports_its_remap_whole_and_scores_like_the_trainer(trained, tmp_path):
    tmp, cfg, day1, trainer_logits, _ = trained
    result = export_checkpoint(day1, tmp_path / "exports")
    assert result.parity["max_abs_logit_diff"] <= 1e-5
    artifact = Artifact.load(tmp_path / "exports")
    assert artifact.manifest["managed"] == {"tables": ["user", "item"], "fallback": "zero"}
    assert artifact.manifest["format"] == 2
    # the artifact scores day 2 as the 2-rank trainer did (its ids routed by shard, each miss row zeroed)
    served = artifact.logits(_day_rows(cfg, 1, artifact))
    assert served.shape == trainer_logits.shape
    torch.testing.assert_close(served, trainer_logits, rtol=0, atol=1e-5)
    # every id the checkpoint holds sits in its own slot with its trained row; every row no id holds is zero
    dcp_to_torch_save(day1, tmp_path / "checkpoint.pt")
    saved = {"model." + k: v for k, v in torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"].items()}
    program = state_of(torch.export.load(str(result.path / "model.pt2")))
    for table, collection in COLLECTION.items():
        prefix = REMAP.format(collection, table)
        ids = saved[prefix + "slot_ids"]
        assert torch.equal(by_slot(program[prefix + "_mch_sorted_raw_ids"],
                                   program[prefix + "_mch_remapped_ids_mapping"]), ids)
        held = ids != FREE
        assert 100 < int(held.sum()) < ids.numel() - 1 and not held[-1], table
        assert torch.equal(program[WEIGHT[table]][held], saved[WEIGHT[table]][held])
        assert not program[WEIGHT[table]][~held].any(), table


def test_an_unknown_managed_id_reads_the_zero_fallback_row_is_counted_and_never_admitted(trained, published):
    _, cfg, _, _, _ = trained
    artifact = Artifact.load(published[1])
    rows = artifact.table_of(_day_rows(cfg, 2, artifact).slice(0, 6).to_pylist())
    known = artifact.valid_outputs(rows)
    user = artifact.managed_tables.index("user")
    assert known.managed_ids[:, user].tolist() == [1] * 6
    before = {k: v.clone() for k, v in artifact.program.state_dict().items()}
    # ids no log holds (the drifting ids are 63-bit hashes): each reads the zero row, so any two score alike
    scored = []
    for new_ids in ([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]):
        unknown = rows.set_column(rows.schema.get_field_index("user_id"), "user_id", [np.array(new_ids)])
        for _ in range(12):  # more lookups than the admission interval (7 steps in training)
            out = artifact.valid_outputs(unknown)
        assert out.unknown_ids[:, user].tolist() == [1] * 6
        assert torch.equal(out.unknown_ids[:, 1 - user], known.unknown_ids[:, 1 - user])
        scored.append(out.logits)
    assert torch.equal(scored[0], scored[1]) and not torch.equal(scored[0], known.logits)
    after = artifact.program.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # eval mode: nothing admitted or evicted


def test_a_managed_delta_scores_bit_identically_to_the_full_export_and_is_a_fraction_of_its_bytes(trained, published):
    _, cfg, _, _, _ = trained
    a, b, first, second = published
    delta, full = Artifact.load(a), Artifact.load(b)
    assert delta.version == full.version == second
    assert delta.manifest["delta"]["base"] == first and delta.manifest["delta"]["chain"] == 1
    assert set(delta.manifest["files"]) == {DELTA}
    rows = _day_rows(cfg, 2, full)
    for got, want in zip(delta.valid_outputs(rows), full.valid_outputs(rows)):
        assert torch.equal(got, want)
    assert delta.manifest["parity"]["max_abs_logit_diff"] == 0.0  # the gate scored the delta as loaded
    size = (a / "versions" / second / DELTA).stat().st_size
    assert size < 0.3 * (b / "versions" / second / "model.pt2").stat().st_size
    history = [json.loads(line) for line in (a / "history.jsonl").read_text().splitlines()]
    assert [(e["event"], e.get("delta_from")) for e in history] == [("published", None), ("published", first)]


def test_a_delta_whose_base_is_missing_or_damaged_is_refused_by_name(trained, published, tmp_path):
    tmp, _, day1, _, day2 = trained
    a, _, first, second = published
    with pytest.raises(DeltaRefused, match="no such version"):
        export_checkpoint(day2, tmp_path / "empty", delta_from=first)
    assert json.loads((tmp_path / "empty" / "history.jsonl").read_text())["event"] == "refused"
    assert not (tmp_path / "empty" / "latest").exists()

    def broken(damage, match):
        root = tmp_path / damage.__name__
        shutil.copytree(a, root)
        damage(root / "versions" / first)
        with pytest.raises(DeltaBaseError, match=match):
            Artifact.load(root)

    def manifest_edited(base):
        (base / "manifest.json").write_text((base / "manifest.json").read_text() + "\n")

    def program_damaged(base):
        with open(base / "model.pt2", "r+b") as f:
            f.seek(1000)
            f.write(b"\0" * 16)

    broken(manifest_edited, "not the one the delta was made on")
    broken(program_damaged, "does not load: .*sha256")
    broken(shutil.rmtree, f"{first}.*not a version published beside it")


def test_a_server_hot_reloads_a_managed_delta_onto_its_base_and_counts_unknown_ids(trained, published, tmp_path):
    _, cfg, _, _, _ = trained
    a, b, first, second = published
    root = tmp_path / "root"
    (root / "versions").mkdir(parents=True)
    shutil.copytree(a / "versions" / first, root / "versions" / first)
    write_atomic(root / "latest", first + "\n")
    full = Artifact.load(b)
    rows = _day_rows(cfg, 2, full).slice(0, 8).to_pylist()
    rows[0]["user_id"] = 5  # never in the logs
    with ServerProcess(root, tmp_path / "server.log", "--reload-poll-s", "0.2") as server:
        server.wait_ready()
        status, answer = http_json(server.port, "POST", "/score", json.dumps({"rows": rows}).encode())
        assert status == 200 and answer["version"] == first
        shutil.copytree(a / "versions" / second, root / "versions" / second)
        write_atomic(root / "latest", second + "\n")
        deadline = time.monotonic() + 120
        while answer["version"] != second and time.monotonic() < deadline:
            time.sleep(0.2)
            status, answer = http_json(server.port, "POST", "/score", json.dumps({"rows": rows}).encode())
        assert status == 200 and answer["version"] == second, (tmp_path / "server.log").read_text()[-3000:]
        np.testing.assert_array_equal(np.float32(answer["probabilities"]), full.score_rows(rows))  # bit for bit
        metrics = _samples(http_text(server.port, "/metrics"))
        # a delta made on another base than the one published under its name: refused, the served one stays
        bad = root / "versions" / (second + "-bad")
        shutil.copytree(root / "versions" / second, bad)
        manifest = json.loads((bad / "manifest.json").read_text())
        manifest["delta"]["base_manifest_sha256"] = "0" * 64
        (bad / "manifest.json").write_text(json.dumps(manifest))
        write_atomic(root / "latest", bad.name + "\n")
        while _samples(http_text(server.port, "/metrics"))['hyrank_model_reloads_total{result="failed"}'] < 1:
            assert time.monotonic() < deadline + 120, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.2)
        status, answer = http_json(server.port, "POST", "/score", json.dumps({"rows": rows}).encode())
        assert status == 200 and answer["version"] == second
        assert server.stop() == 0
    assert "not the one the delta was made on" in (tmp_path / "server.log").read_text()
    calls = metrics['hyrank_rows_scored_total'] / len(rows)
    assert metrics['hyrank_unknown_ids_total{table="user"}'] >= calls  # row 0's user, at every call
    assert metrics['hyrank_managed_ids_total{table="user"}'] == calls * len(rows)
    assert metrics['hyrank_managed_ids_total{table="item"}'] > metrics['hyrank_unknown_ids_total{table="item"}']

