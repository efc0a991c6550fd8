"""Bounded data: several passes with a validation span that picks the pass to keep, an exact resume in the middle
of a pass, spans of days evaluated as one set, and many small days trained in full batches, on 2 gloo ranks."""

import json
import shutil

import numpy as np
import pytest
import torch

from hyrank.pipeline.data.days import as_span, discover_days
from hyrank.pipeline.data.split import group_days
from hyrank.pipeline.data.synth import generate_logs
from hyrank.pipeline.distributed.env import env_of_current_group
from hyrank.pipeline.metrics import EvalMetrics, compute_metrics
from hyrank.pipeline.pass_report import write_pass_report
from hyrank.pipeline.train.checkpoint import read_meta
from hyrank.pipeline.train.evaluate import score_day
from hyrank.pipeline.train.plan import best_record, pass_order, passes_since_best
from hyrank.pipeline.train.state import read_ledger
from hyrank.pipeline.train.trainer import RunPlan, Trainer

from conftest import latest_checkpoint_tensors, small_synth, tiny_cfg
from dist import run_distributed

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("passes") / "data"
    generate_logs(small_synth(num_days=4, rows_per_day=1500, rows_per_chunk=500), root)
    return root


@pytest.fixture(scope="module")
def small_days(tmp_path_factory):
    """Twelve days of 50 rows: each alone would be one mostly-filler batch."""
    root = tmp_path_factory.mktemp("small") / "data"
    generate_logs(small_synth(num_days=12, rows_per_day=50, rows_per_chunk=50), root)
    return root


def _fit(rank, world_size, cfg, resume=None):
    days = discover_days(cfg.data.root)
    trainer = Trainer(cfg, env_of_current_group())
    result = trainer.run(RunPlan(train_days=days[:2], valid_days=days[2], eval_days=[as_span(days[2:])],
                                 resume=resume))
    return {"trained": [(s.pass_index, s.day, s.steps) for s in result.trained], "valid": result.valid,
            "best": result.best, "metrics": {k: m.to_dict() for k, m in result.metrics.items()},
            "step": trainer.global_step, "early_stop": result.early_stop}


def test_passes_are_validated_and_the_best_pass_evaluates(root, tmp_path):
    cfg = tiny_cfg(root, tmp_path / "run", "train.passes=3", "data.shuffle=true", "checkpoint.keep=1",
                   "train.min_unit_rows=1")
    r0, r1 = run_distributed(_fit, cfg, world_size=2, timeout_s=300)
    assert r0 == r1
    # every pass trains both days once, each pass in its own seeded order
    assert sorted((p, d) for p, d, _ in r0["trained"]) == [(p, d) for p in range(3)
                                                          for d in ("2026-11-01", "2026-11-02")]
    assert [v["pass"] for v in r0["valid"]] == [0, 1, 2]
    best = max(r0["valid"], key=lambda v: v["auc"])
    assert r0["best"] == best
    # the kept pass's checkpoint survives checkpoint.keep = 1 and is the model the eval span was scored with
    kept = tmp_path / "run" / "checkpoints" / best["checkpoint"]
    assert (kept / "meta.json").is_file()
    assert json.loads((tmp_path / "run" / "metrics" / "best.json").read_text())["checkpoint"] == str(kept)
    assert r0["step"] == best["step"]
    assert set(r0["metrics"]) == {"2026-11-03..2026-11-04"}
    assert r0["metrics"]["2026-11-03..2026-11-04"]["num_rows"] == 3000  # both days, every row
    # the validation curve a person looks at: one row per pass, the kept one marked, and its PNG
    report = write_pass_report(tmp_path / "run")
    assert [r["pass"] for r in report.rows] == [1, 2, 3]
    assert [r["kept"] for r in report.rows] == [r["pass"] == best["pass"] for r in r0["valid"]]
    assert all(r["train_loss"] is not None and r["steps"] > 0 for r in report.rows)
    assert report.png_path.stat().st_size > 10_000 and report.csv_path.read_text().startswith("pass,steps")


def test_patience_stops_after_passes_without_a_better_validation(root, tmp_path, monkeypatch):
    """The control flow, with the validation metric scripted (the real one is measured in the test above)."""
    scripted = iter([0.70, 0.72, 0.71, 0.715, 0.80])
    real = Trainer.evaluate

    def evaluate(self, day, *, kind="eval"):
        m = real(self, day, kind=kind)
        if kind == "valid":
            m = EvalMetrics(**{**m.to_dict(), "auc": next(scripted)})
        return m

    monkeypatch.setattr(Trainer, "evaluate", evaluate)  # forked ranks inherit it
    cfg = tiny_cfg(root, tmp_path / "run", "train.passes=5", "train.patience=2", "train.max_steps_per_day=2",
                   "train.min_unit_rows=1")
    r0, _ = run_distributed(_fit, cfg, world_size=2, timeout_s=300)
    assert [v["auc"] for v in r0["valid"]] == [0.70, 0.72, 0.71, 0.715]  # pass 5 (0.80) never ran
    assert r0["best"]["pass"] == 1 and "stopped after pass 4 of 5" in r0["early_stop"]


def test_the_pass_rules():
    records = [{"pass": i, "auc": a, "logloss": l} for i, (a, l) in enumerate([(0.7, 0.5), (0.72, 0.45),
                                                                                (0.72, 0.47)])]
    assert best_record(records, "auc")["pass"] == 1  # a later tie is not better
    assert best_record(records, "logloss")["pass"] == 1
    assert passes_since_best(records, "auc") == 1 and passes_since_best([], "auc") == 0
    units = list(range(10))
    assert pass_order(units, 3, seed=0, shuffle=False) == units
    shuffled = [pass_order(units, p, seed=0, shuffle=True) for p in range(3)]
    assert all(sorted(s) == units for s in shuffled) and shuffled[0] != shuffled[1]
    assert pass_order(units, 1, seed=0, shuffle=True) == shuffled[1]  # a resumed pass is the same pass


def _train_passes(rank, world_size, cfg, resume):
    days = discover_days(cfg.data.root)
    Trainer(cfg, env_of_current_group()).run(RunPlan(train_days=days[:2], resume=resume))


def test_a_resume_in_the_middle_of_a_later_pass_is_exact(root, tmp_path):
    extra = ["train.passes=3", "data.shuffle=true", "checkpoint.every_steps=5", "checkpoint.keep=100",
             "train.min_unit_rows=1", "train.lr_schedule=\"cosine\""]
    full = tmp_path / "full"
    run_distributed(_train_passes, tiny_cfg(root, full, *extra), None, world_size=2, timeout_s=300)
    # a mid-day checkpoint of the second pass: the run as a crash there would have left it
    mid = None
    for ckpt in sorted((full / "checkpoints").glob("step-*")):
        progress = read_meta(ckpt).progress
        if progress.pass_index == 1 and progress.day is not None and progress.days_done:
            mid = ckpt
            break
    assert mid is not None, "no checkpoint inside the second pass's second day"
    crashed = tmp_path / "crashed"
    (crashed / "checkpoints").mkdir(parents=True)
    shutil.copytree(mid, crashed / "checkpoints" / mid.name)
    (crashed / "checkpoints" / "latest").write_text(mid.name)
    shutil.copytree(full / "ledger", crashed / "ledger")  # (the ledger a crash would have left, at least this)
    run_distributed(_train_passes, tiny_cfg(root, crashed, *extra), "latest", world_size=2, timeout_s=300)
    want, want_meta = latest_checkpoint_tensors(full)
    got, got_meta = latest_checkpoint_tensors(crashed)
    assert got_meta.progress.global_step == want_meta.progress.global_step
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def _score(rank, world_size, cfg):
    days = discover_days(cfg.data.root)
    trainer = Trainer(cfg, env_of_current_group())
    trainer.train_day(days[0])
    span = trainer.evaluate(as_span(days[1:3]))
    parts = [score_day(trainer.model, trainer._reader(d, 0, training=False), device=trainer.env.device) for d in days[1:3]]
    return span, [(p.logits.numpy(), p.labels.numpy(), p.groups.numpy(), p.oracle.numpy()) for p in parts]


def test_a_span_is_evaluated_as_one_set(root, tmp_path):
    (span, parts), (_, parts1) = run_distributed(_score, tiny_cfg(root, tmp_path / "run"), world_size=2,
                                                 timeout_s=300)
    joined = [np.concatenate([p[i] for p in parts + parts1]) for i in range(4)]
    want = compute_metrics(*joined)
    assert span.num_rows == 3000
    assert span.auc == pytest.approx(want.auc, abs=1e-12)  # over all rows of both days, not a mean of two days
    assert span.query_auc == pytest.approx(want.query_auc, abs=1e-12)
    assert span.num_queries == want.num_queries


def test_small_days_are_grouped_into_units():
    class Day:  # a day of `rows` rows, as group_days sees one
        def __init__(self, i, rows):
            self.i, self.rows = i, rows

    import hyrank.pipeline.data.split as split

    days = [Day(i, r) for i, r in enumerate([50, 50, 50, 500, 50, 50, 20])]
    real_rows, real_span = split._footer_rows, split.as_span
    try:
        split._footer_rows = lambda f: f.rows
        split.as_span = lambda ds: [d.i for d in ds]
        Day.files = property(lambda self: [self])
        assert group_days(days, 120) == [[0, 1, 2], [3], [4, 5, 6]]
        assert group_days(days, 1) == [[i] for i in range(7)]
        assert group_days(days, 10_000) == [list(range(7))]
        assert group_days(days[:4] + days[6:], 120) == [[0, 1, 2], [3, 6]]  # a short tail joins the unit before
    finally:
        split._footer_rows, split.as_span = real_rows, real_span


def _train_small(rank, world_size, cfg):
    days = discover_days(cfg.data.root)
    result = Trainer(cfg, env_of_current_group()).run(RunPlan(train_days=days))
    return [(s.day, s.steps, s.rows) for s in result.trained]


def test_many_small_days_train_every_row_once_in_full_batches(small_days, tmp_path):
    cfg = tiny_cfg(small_days, tmp_path / "run", "data.batch_size_per_rank=16")  # units of >= 16 * 16 * 2 rows
    trained, _ = run_distributed(_train_small, cfg, world_size=2, timeout_s=300)
    assert [d for d, _, _ in trained] == ["2026-11-01..2026-11-12"]  # 600 rows: one unit (12 steps, not 12 x 2)
    assert trained[0][1:] == (-(-300 // 16), 600)
    _, meta = latest_checkpoint_tensors(tmp_path / "run")
    ledger = read_ledger(tmp_path / "run", meta.per_rank("ledger"))
    rows = sorted((e["file"], e["row_group"], r) for e in ledger for r in range(e["start"], e["stop"]))
    assert len(rows) == len(set(rows)) == 600  # every row of every day, once
    assert len({f for f, _, _ in rows}) == 12
