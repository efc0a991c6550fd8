"""Export to serving: a 2-rank checkpoint exports to an artifact that scores, in a process that never imports the
training code, exactly what the trainer's evaluation scored; the parity gate refuses a corrupted program and
publishes nothing; a worse model is refused by `hyrank export` and nothing published changes by a byte; a checkpoint
from outside its run needs --trust-checkpoint; bad request rows are named; quantized tables are smaller."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from hyrank.pipeline.data.days import discover_days
from hyrank.pipeline.data.synth import generate_logs
from hyrank.pipeline.distributed.env import env_of_current_group
from hyrank.pipeline.serving.artifact import Artifact, BadRows
from hyrank.pipeline.serving.export import ParityError, export_checkpoint

from conftest import ROOT, small_synth, tiny_cfg
from dist import run_distributed

pytestmark = pytest.mark.dist

def _hyrank(*args):
    """`hyrank` in a process of its own, as a person runs it."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "hyrank", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)


def _hashes(root):
    """sha256 of every file under a publish root but its history (append-only: it grows with every attempt)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "history.jsonl"}


def _history(root):
    return [json.loads(line) for line in (root / "history.jsonl").read_text().splitlines()]


def _train(rank, world_size, cfg):
    from hyrank.pipeline.train.trainer import RunPlan, Trainer

    result = Trainer(cfg, env_of_current_group()).run(RunPlan(train_days=discover_days(cfg.data.root)[:1]))
    return str(result.checkpoint)


def _train_and_score(rank, world_size, cfg):
    """Day 1 trained on this many ranks; each rank's logits of day 2 (the trainer's own evaluation path)."""
    from hyrank.pipeline.train.evaluate import score_day
    from hyrank.pipeline.train.trainer import RunPlan, Trainer

    days = discover_days(cfg.data.root)
    trainer = Trainer(cfg, env_of_current_group())
    result = trainer.run(RunPlan(train_days=days[:1]))
    reader = trainer._reader(days[1], 0)
    scores = score_day(trainer.model, reader, device=torch.device("cpu"))
    return str(result.checkpoint), scores.logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained on 2 ranks, its checkpoint, and the trainer's logits of day 2 in file order."""
    tmp = tmp_path_factory.mktemp("export")
    generate_logs(small_synth(num_days=2, rows_per_day=2000), tmp / "data")
    cfg = tiny_cfg(tmp / "data", tmp / "run")
    (checkpoint, logits0), (_, logits1) = run_distributed(_train_and_score, cfg, timeout_s=300)
    # each rank scored its contiguous half of the day, in file order (pipeline/data/split.py)
    return tmp, cfg, checkpoint, torch.cat([logits0, logits1])


@pytest.fixture(scope="module")
def worse(trained):
    """Another run on the same day and the same 2 ranks (so the same step numbers), whose learning rates are too
    small to learn anything: a worse model whose checkpoint is named like the good one's."""
    tmp, _, good, _ = trained
    cfg = tiny_cfg(tmp / "data", tmp / "worse_run", "train.lr=1e-9", "embeddings.lr=1e-9")
    checkpoint, _ = run_distributed(_train, cfg, timeout_s=300)
    assert os.path.basename(checkpoint) == os.path.basename(good)
    return checkpoint


def test_a_two_rank_checkpoint_exports_and_scores_like_the_trainer_without_the_training_code(trained):
    tmp, cfg, checkpoint, trainer_logits = trained
    result = export_checkpoint(checkpoint, tmp / "exports")
    assert result.parity["max_abs_logit_diff"] <= 1e-5 and result.parity["rows"] == 2000
    assert (tmp / "exports" / "latest").read_text().strip() == result.version
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["days_trained"] == ["2026-11-01"] and manifest["model"]["name"] == cfg.model.name
    assert set(manifest["files"]) == {"model.pt2"} and manifest["versions"]["torch"]
    day = discover_days(cfg.data.root)[1]
    code = (
        "import sys, json, numpy as np, pyarrow.parquet as pq\n"
        "from hyrank.pipeline.serving.artifact import Artifact\n"
        f"artifact = Artifact.load({str(tmp / 'exports')!r})\n"
        f"table = pq.read_table({str(day.files[0])!r})\n"
        "logits = artifact.logits(table.select(artifact.features)).numpy()\n"
        "np.save(sys.argv[1], logits)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('hyrank.pipeline.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp / "served.npy")], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    training = ("hyrank.pipeline.train", "hyrank.pipeline.distributed", "hyrank.pipeline.stream")
    assert not [m for m in loaded if m.startswith(training)]
    served = np.load(tmp / "served.npy")
    assert pq.ParquetFile(day.files[0]).metadata.num_rows == len(served) == len(trainer_logits)
    np.testing.assert_allclose(served, trainer_logits.numpy(), rtol=0, atol=1e-5)


def test_a_corrupted_program_fails_the_parity_gate_and_nothing_is_published(trained, monkeypatch):
    tmp, _, checkpoint, _ = trained
    save = torch.export.save

    def save_with_a_flipped_weight(program, path, **kw):
        weight = next(v for k, v in program.state_dict.items() if "tower" in k and k.endswith("weight"))
        weight.data.neg_()  # one tower weight matrix with its sign flipped: a silently wrong model
        save(program, path, **kw)

    monkeypatch.setattr(torch.export, "save", save_with_a_flipped_weight)
    with pytest.raises(ParityError, match="nothing published"):
        export_checkpoint(checkpoint, tmp / "bad_exports")
    assert not (tmp / "bad_exports" / "latest").exists()
    assert [p.name for p in (tmp / "bad_exports" / "versions").iterdir()] == []


def test_bad_request_rows_are_named_by_row_and_field(trained):
    tmp, cfg, checkpoint, _ = trained
    export_checkpoint(checkpoint, tmp / "exports")
    artifact = Artifact.load(tmp / "exports")
    rows = pq.read_table(discover_days(cfg.data.root)[1].files[0]).select(artifact.features).slice(0, 4).to_pylist()
    assert artifact.score_rows(rows).shape == (4,)
    broken = [dict(r) for r in rows]
    broken[1]["bogus"] = 1
    del broken[2]["user_id"]
    broken[3]["item_ctr_prior"] = "high"
    with pytest.raises(BadRows) as e:
        artifact.score_rows(broken)
    assert e.value.problems == ["row 1: unknown field 'bogus'", "row 2: missing field 'user_id'"]
    broken = [dict(r) for r in rows]
    broken[3]["item_ctr_prior"] = "high"
    broken[0]["long_item_ids"] = list(range(200_000))
    with pytest.raises(BadRows) as e:
        artifact.score_rows(broken)
    assert any(p.startswith("row 3: field 'item_ctr_prior'") for p in e.value.problems), e.value.problems
    broken[3]["item_ctr_prior"] = 0.5
    with pytest.raises(BadRows, match="row 0: field 'long_item_ids': list_too_long"):
        artifact.score_rows(broken)
    with pytest.raises(BadRows, match="more than the 3 one request may hold"):
        artifact.score_rows(rows, max_rows=3)


def test_export_refuses_a_worse_model_and_never_rewrites_a_published_version(trained, worse, tmp_path):
    _, _, good, _ = trained
    root = tmp_path / "exports"
    first = export_checkpoint(good, root)
    assert first.version.endswith("-step-" + os.path.basename(good).split("-")[1])  # <run id>-step-N
    before = _hashes(root)
    refused = _hyrank("export", "--checkpoint", worse, "--out", root)
    assert refused.returncode != 0, refused.stdout + refused.stderr[-2000:]
    assert "below the published" in refused.stderr and first.version in refused.stderr
    assert _hashes(root) == before  # `latest` and every published file, byte for byte
    assert [e["event"] for e in _history(root)] == ["published", "refused"]

    # the same checkpoint again: already published, left as it is (a server following the root sees no change)
    again = _hyrank("export", "--checkpoint", good, "--out", root)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{first.version} is already published" in again.stdout
    assert _hashes(root) == before

    # publishing it anyway is an explicit choice, recorded in the manifest and the root's history
    forced = _hyrank("export", "--checkpoint", worse, "--out", root, "--skip-quality-gate")
    assert forced.returncode == 0, forced.stderr[-2000:]
    now = _hashes(root)
    assert {k: now[k] for k in before if k != "latest"} == {k: v for k, v in before.items() if k != "latest"}
    version = (root / "latest").read_text().strip()
    assert version != first.version and version.endswith(first.version[first.version.index("-step-"):])
    manifest = json.loads((root / "versions" / version / "manifest.json").read_text())
    assert manifest["quality_gate"]["result"] == "skipped" and "--skip-quality-gate" in manifest["quality_gate"]["by"]
    last = _history(root)[-1]
    assert last["event"] == "published" and last["version"] == version and last["quality_gate"]["result"] == "skipped"


def test_export_of_a_checkpoint_from_outside_its_run_needs_trust(trained, tmp_path):
    _, _, checkpoint, _ = trained
    copy = tmp_path / "copied" / os.path.basename(checkpoint)
    shutil.copytree(checkpoint, copy)
    refused = _hyrank("export", "--checkpoint", copy, "--out", tmp_path / "exports")
    assert refused.returncode != 0
    assert f"{copy} is not a checkpoint of its run" in refused.stderr and "--trust-checkpoint" in refused.stderr
    assert not (tmp_path / "exports").exists()
    result = export_checkpoint(copy, tmp_path / "exports", trust_checkpoint=True)
    assert (tmp_path / "exports" / "latest").read_text().strip() == result.version


@pytest.mark.parametrize("tables", ["fp16", "int8"])
def test_quantized_tables_stay_within_their_stated_bound(trained, tables):
    from hyrank.pipeline.serving.export import QUANTIZATION_BOUNDS

    tmp, cfg, checkpoint, trainer_logits = trained
    result = export_checkpoint(checkpoint, tmp / f"exports_{tables}", tables=tables)
    p, bound = result.parity, QUANTIZATION_BOUNDS[tables]
    assert p["max_abs_logit_diff"] <= 1e-5  # the program is the quantized model it was traced from
    assert 0 < p["max_abs_logit_diff_vs_fp32"] <= bound["logit"]  # and quantization did change something
    assert abs(p["auc_artifact"] - p["auc_fp32"]) <= bound["auc"]
    served = Artifact.load(tmp / f"exports_{tables}").logits(
        pq.read_table(discover_days(cfg.data.root)[1].files[0]))
    assert float((served - trainer_logits).abs().max()) <= bound["logit"]
    # the tables are stored once, in rows of their own precision (int8: dim bytes + a 2-byte scale and bias): the
    # model's tables are ~94% of its fp32 program, so int8 lands near 0.34 and fp16 near 0.53 of it
    fp32 = export_checkpoint(checkpoint, tmp / "exports_fp32")  # (for the second tables: already published)
    ratio = os.path.getsize(result.path / "model.pt2") / os.path.getsize(fp32.path / "model.pt2")
    assert ratio <= {"fp16": 0.6, "int8": 0.4}[tables], ratio


@pytest.mark.heavy
def test_an_aoti_package_passes_the_same_parity_gate(trained):
    """Heavy (AOTInductor compiles for about a minute and a half on CPU); the fp32 export test above is its light
    twin for the export, load-back and parity path."""
    tmp, _, checkpoint, _ = trained
    result = export_checkpoint(checkpoint, tmp / "exports_aoti", aoti=True)
    assert result.parity["aoti_max_abs_logit_diff"] <= 1e-5
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.pt2", "model.aoti.pt2"}
    Artifact.load(tmp / "exports_aoti")  # both files verified against their sha256
