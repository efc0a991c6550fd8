"""Delta publishing (pipeline/serving/delta.py): a delta applied to its base holds the new program's tensors bit for
bit (against the plain reference: the new tensors themselves); a stream of jobs/configs/drift.toml on 2 ranks
publishes a full export, then deltas, and a real HTTP server scores the latest delta and counts unknown ids."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from hyrank.embeddings.managed import FREE, remap_of
from hyrank.embeddings.tables import ManagedTable, TableDef
from hyrank.pipeline.config import load_config
from hyrank.pipeline.data.days import discover_days
from hyrank.pipeline.data.synth import generate_logs
from hyrank.pipeline.distributed.env import env_of_current_group
from hyrank.pipeline.files import write_json
from hyrank.pipeline.serving.artifact import Artifact
from hyrank.pipeline.serving.delta import DeltaMismatch, apply_delta, describe, make_delta
from hyrank.pipeline.serving.publish import delta_base
from hyrank.pipeline.stream import StreamOptions, stream

from hyrank.bench.serve_load import ServerProcess, http_json, http_text
from conftest import ROOT, TINY, small_synth
from dist import run_distributed
from test_serve import _samples

TABLE = "m.embeddings.item.weight"
REMAP = "m._managed_collision_collection._managed_collision_modules.item."


def _remap_state(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sorted arrays an unsharded remap holding `ids` per slot looks ids up in (ManagedRemap.set_slots)."""
    remap = remap_of(TableDef("item", ids.numel(), 4, ManagedTable("lru", 5)), device=torch.device("cpu"),
                     num_buckets=1)
    remap.set_slots(ids, torch.zeros_like(ids))
    return {REMAP + "_mch_sorted_raw_ids": remap._mch_sorted_raw_ids.clone(),
            REMAP + "_mch_remapped_ids_mapping": remap._mch_remapped_ids_mapping.clone()}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_a_delta_applied_to_its_base_holds_the_new_tensors_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    rows = 64
    ids = torch.randint(0, 1 << 62, (rows,), generator=gen)
    ids[[10, 20, rows - 1]] = FREE
    weights = torch.rand(rows, 4, generator=gen)
    weights[7] = float("nan")  # unchanged: a NaN equals itself, bit for bit
    base = {TABLE: weights, **_remap_state(ids), "tower.weight": torch.rand(3, 5, generator=gen),
            "tower.steps": torch.tensor(4)}
    new_ids = ids.clone()
    new_ids[[3, 10]] = torch.tensor([5, 123])  # one id evicted for another, one admitted into a free slot
    new_weights = weights.clone()
    new_weights[3] += 1.0
    new_weights[5, 0] = -0.0 if weights[5, 0] == 0 else 0.0  # either way, other bits
    new_weights[5, 1:] = weights[5, 1:]
    new = {TABLE: new_weights, **_remap_state(new_ids), "tower.weight": base["tower.weight"] * 2,
           "tower.steps": torch.tensor(4)}
    delta = make_delta(base, new)
    assert describe(delta) == {"rows": 2, "remapped_slots": 2, "whole_tensors": 1}  # tower.steps did not change
    state = {k: v.clone() for k, v in base.items()}
    apply_delta(state, delta)
    assert all(_bits_equal(state[k], new[k]) for k in new)
    with pytest.raises(DeltaMismatch, match="tower.weight"):
        make_delta(base, {**new, "tower.weight": torch.rand(3, 6)})
    with pytest.raises(DeltaMismatch, match="only in the new one"):
        make_delta(base, {**new, "tower.extra": torch.rand(2)})


def test_stream_export_delta_bases_on_latest_until_the_chain_is_full(tmp_path):
    assert delta_base(tmp_path, 3) is None  # nothing published
    for version, chain in (("a", 0), ("b", 1), ("c", 2)):
        write_json(tmp_path / "versions" / version / "manifest.json", {"delta": {"chain": chain}} if chain else {})
    for latest, max_chain, base in (("a", 0, None), ("a", 1, "a"), ("b", 1, None), ("b", 2, "b"), ("c", 2, None)):
        (tmp_path / "latest").write_text(latest + "\n")
        assert delta_base(tmp_path, max_chain) == base, (latest, max_chain)


def _stream(rank, world_size, cfg, options):
    result = stream(cfg, env_of_current_group(), options)
    return [s.day for s in result.trained]


@pytest.mark.dist
def test_a_two_rank_managed_stream_of_drift_toml_publishes_deltas_that_a_server_scores(tmp_path):
    generate_logs(small_synth(num_days=3, rows_per_day=2000, drift=True), tmp_path / "data")
    cfg = load_config(ROOT / "jobs" / "configs" / "drift.toml",
                      [f'data.root="{tmp_path / "data"}"', f'out_dir="{tmp_path / "run"}"', *TINY])
    root = tmp_path / "exports"
    options = StreamOptions(export_to=root, export_delta=2, quality_margin=1.0)  # the gate is not what is tested
    trained, _ = run_distributed(_stream, cfg, options, timeout_s=600)
    assert trained == ["2026-11-01", "2026-11-02", "2026-11-03"]
    history = [json.loads(line) for line in (root / "history.jsonl").read_text().splitlines()]
    assert [e["event"] for e in history] == ["published"] * 3
    versions = [e["version"] for e in history]
    assert [e.get("delta_from") for e in history] == [None, versions[0], versions[1]]
    artifact = Artifact.load(root)
    assert artifact.version == versions[2] and artifact.manifest["delta"]["chain"] == 2
    assert artifact.manifest["parity"]["max_abs_logit_diff"] <= 1e-5
    full = sum(f.stat().st_size for f in (root / "versions" / versions[0]).iterdir())
    assert all(sum(f.stat().st_size for f in (root / "versions" / v).iterdir()) < 0.3 * full for v in versions[1:])

    day = discover_days(cfg.data.root)[2]
    rows = pq.read_table(day.files[0], columns=artifact.features).slice(0, 16).to_pylist()
    rows[3]["user_id"], rows[4]["item_id"] = 17, 19  # ids no log holds (drifting ids are 63-bit hashes)
    with ServerProcess(root, tmp_path / "server.log", "--reload-poll-s", "0") as server:
        server.wait_ready()
        status, answer = http_json(server.port, "POST", "/score", json.dumps({"rows": rows}).encode())
        assert status == 200 and answer["version"] == versions[2], answer
        np.testing.assert_array_equal(np.float32(answer["probabilities"]), artifact.score_rows(rows))
        metrics = _samples(http_text(server.port, "/metrics"))
        assert server.stop() == 0, (tmp_path / "server.log").read_text()[-3000:]
    counts = artifact.valid_outputs(artifact.table_of(rows))
    for t, table in enumerate(artifact.managed_tables):
        assert metrics[f'hyrank_unknown_ids_total{{table="{table}"}}'] == counts.unknown_ids[:, t].sum() >= 1
        assert metrics[f'hyrank_managed_ids_total{{table="{table}"}}'] == counts.managed_ids[:, t].sum()
