"""`hyrank bench quality`: real train runs per (model, seed), metrics read from each run's files, mean +- s.e."""

import json
import math
import subprocess
import sys

import pytest

from hyrank.bench.quality import aggregate, format_table, mean_se, parse_variant, split_top_level
from tests.conftest import DEFAULT_CONFIG, ROOT, TINY, small_synth


def test_mean_and_standard_error():
    mean, se = mean_se([0.70, 0.72, 0.74])
    assert mean == pytest.approx(0.72)
    assert se == pytest.approx(0.02 / math.sqrt(3))  # sample std 0.02 over sqrt(3)
    assert mean_se([0.7]) == (0.7, None)  # one seed: no error bar
    assert mean_se([0.7, None]) == (None, None)  # a metric one run lacks (no group column) is n/a, not a mean of some
    assert mean_se([]) == (None, None)


def test_aggregate_skips_failed_runs_and_groups_by_model_and_variant():
    def ok(model, seed, auc):
        return {"model": model, "variant": "base", "seed": seed, "status": "ok", "auc": auc, "query_auc": None,
                "logloss": 0.5, "oracle_auc": None, "rows_per_s": 100.0, "dense_params": 10,
                "embedding_params": 20, "chosen_pass": seed + 1}

    runs = [ok("b", 0, 0.60), ok("a", 0, 0.70), ok("a", 1, 0.80),
            {"model": "a", "variant": "base", "seed": 2, "status": "failed", "error": "exit code 2", "log": "x"}]
    rows = aggregate(runs)
    assert [(r["model"], r["seeds"]) for r in rows] == [("b", [0]), ("a", [0, 1])]
    assert rows[1]["auc"] == pytest.approx(0.75) and rows[1]["auc_se"] == pytest.approx(0.05)
    assert rows[1]["chosen_pass"] == [1, 2]
    table = format_table(rows)
    assert "0.7500 ± 0.0500" in table and "n/a" in table  # query-AUC n/a


def test_variant_values_keep_their_commas():
    assert split_top_level('a=[1,2],b="x,y", c={d=1,e=2}') == ["a=[1,2]", 'b="x,y"', "c={d=1,e=2}"]
    assert parse_variant("wide:model.options.hidden=[64,32],train.lr=0.01") == \
        ("wide", ["model.options.hidden=[64,32]", "train.lr=0.01"])
    assert parse_variant("base") == ("base", [])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_variant("v:train.lr")
    with pytest.raises(ValueError, match="unbalanced"):
        split_top_level("a=[1,2")


def test_two_models_end_to_end_from_the_run_files(tmp_path):
    """Two towers x one seed, one rank in the train process: both rows carry the metrics of their run's files; the
    same command again trains nothing (resumable)."""
    from hyrank.pipeline.data.synth import generate_logs

    data = tmp_path / "data"
    generate_logs(small_synth(rows_per_day=1500, num_days=2), data)
    record, md = tmp_path / "q.json", tmp_path / "q.md"
    cmd = [sys.executable, "-m", "hyrank.pipeline.cli", "bench", "quality", "--config", str(DEFAULT_CONFIG),
           "--days", "2026-11-01", "--eval-days", "2026-11-02", "--models", "dlrm_mlp,dcnv2", "--seeds", "1",
           "--nproc", "0", "--json", str(record), "--markdown", str(md), "--set", f'data.root="{data}"',
           *[a for s in TINY if not s.startswith("model.options") for a in ("--set", s)],
           "--model-set", "dlrm_mlp:model.options.hidden=[16]"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    runs = json.loads(record.read_text())["runs"]
    assert [(r["model"], r["seed"], r["status"]) for r in runs] == [("dlrm_mlp", 0, "ok"), ("dcnv2", 0, "ok")]
    for r in runs:
        files = json.loads(open(f"{r['out_dir']}/metrics/eval-2026-11-02.json").read())
        assert r["auc"] == files["auc"] and r["query_auc"] == files["query_auc"] and 0.5 < r["auc"] < 1.0
        assert r["oracle_auc"] == files["oracle_auc"] and r["rows_per_s"] > 0 and r["dense_params"] > 0
        assert f"{r['auc']:.4f}" in first.stdout  # the printed table shows the file's AUC
    assert runs[0]["dense_params"] < runs[1]["dense_params"]  # hidden [16] DLRM vs a default DCNv2
    assert "model.options={}" in runs[1]["overrides"] and "model.options={}" not in runs[0]["overrides"]
    table = md.read_text()
    assert table.count("| dlrm_mlp | base | 1 |") == 1 and table.count("| dcnv2 | base | 1 |") == 1
    assert "oracle AUC" in table
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("not rerun") == 2 and "training, log" not in again.stdout
    assert json.loads(record.read_text())["runs"] == runs


def test_a_folder_of_a_run_with_other_settings_is_not_resumed(tmp_path):
    from hyrank.bench.quality import MARKER, check_folder

    folder = tmp_path / "dlrm_mlp-base-s0"
    check_folder(folder, ["train.lr=0.01"])  # nothing there yet
    folder.mkdir()
    (folder / MARKER).write_text(json.dumps({"overrides": ["train.lr=0.01"]}))
    (folder / "checkpoints").mkdir()
    check_folder(folder, ["train.lr=0.01"])  # the same run, stopped part-way: continued
    with pytest.raises(ValueError, match="other settings"):
        check_folder(folder, ["train.lr=0.02"])
