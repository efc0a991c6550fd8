"""`hyrank bench paper`: one command per paper experiment, real train runs, a table with the oracle and a plot."""

import json
import subprocess
import sys

import pytest

from hyrank.bench.papers import EXPERIMENTS
from hyrank.pipeline.config import load_config
from tests.conftest import ROOT, TINY, small_synth

PAPERS_CONFIG = ROOT / "jobs" / "configs" / "papers.toml"


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_row_of_every_experiment_loads(name):
    """A typo in a row's settings fails here, not after hours of runs; a variant name means one set of settings
    across experiments (the runs are shared by name)."""
    from hyrank.bench.quality import run_overrides

    for row in EXPERIMENTS[name].rows:
        load_config(PAPERS_CONFIG, run_overrides("dlrm_mlp", row.model, [], [], list(row.sets), 0))
    settings: dict[tuple[str, str], tuple] = {}
    for exp in EXPERIMENTS.values():
        for row in exp.rows:
            assert settings.setdefault((row.model, row.variant), row.sets) == row.sets, (row.model, row.variant)


def test_papers_config_has_no_target_match_statistics():
    cfg = load_config(PAPERS_CONFIG)
    assert cfg.features.match == [] and "long_cat_match" not in cfg.features.blocks["item"]


def test_an_experiment_end_to_end_with_latency(tmp_path):
    """Hiformer's five rows x one seed at tiny size: the table has every row with the run files' AUC, the oracle,
    params, FLOPs and a latency; the plot is a PNG; the same command again trains nothing."""
    from hyrank.pipeline.data.synth import generate_logs

    data = tmp_path / "data"
    generate_logs(small_synth(rows_per_day=1200, num_days=2), data)
    out = tmp_path / "papers"
    cmd = [sys.executable, "-m", "hyrank.pipeline.cli", "bench", "paper", "hiformer", "--data", str(data), "--seeds", "1",
           "--nproc", "0", "--out", str(out), "--latency-repeats", "2", "--set", "model.options.d_model=16",
           *[a for s in TINY if not s.startswith("model.options") for a in ("--set", s)]]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    runs = json.loads((out / "papers.json").read_text())["runs"]
    assert sorted(r["variant"] for r in runs) == ["base", "full", "low_rank", "low_rank_32", "low_rank_pruned"]
    md = (out / "hiformer.md").read_text()
    assert "oracle AUC **0." in md and "infer ms (batch 512)" in md and "hiformer.png" in md
    head, rule, *rows = [line for line in md.splitlines() if line.startswith("|")]
    assert "infer ms, 4x d_model" in head and len(rows) == 5
    for row in rows:  # a latency at the run's width and at 4x: both measured, the wider one slower
        ms, wide_ms = (float(c) for c in row.strip("|").split("|")[-2:])
        assert 0 < ms < wide_ms, row
    for r in runs:
        assert f"{r['auc']:.4f}" in md and r["train_flops_per_row"] > 0
    low, full = (next(r for r in runs if r["variant"] == v) for v in ("low_rank", "full"))
    assert low["dense_params"] < full["dense_params"]
    assert (out / "hiformer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("not rerun") == 5, again.stdout + again.stderr


def test_scaling_plots_auc_against_flops_and_params(tmp_path):
    """The scaling plot draws every row of every series (base on each line) against FLOPs and against params;
    a row without an AUC (a failed run) is left off the plot, not drawn at zero."""
    from hyrank.bench.papers import EXPERIMENTS, plot

    exp = EXPERIMENTS["scaling"]
    rows = [{"label": r.label, "variant": r.variant, "series": r.series, "auc": 0.70 + 0.01 * i, "auc_se": 0.002,
             "train_flops_per_row": 1e6 * (i + 1), "dense_params": 10_000 * (i + 1)}
            for i, r in enumerate(exp.rows)]
    rows[-1]["auc"] = None
    path = tmp_path / "scaling.png"
    plot(exp, rows, 0.82, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
