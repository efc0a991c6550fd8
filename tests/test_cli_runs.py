"""The command line of a run as a user meets it: `hyrank evaluate` scores like train's --eval-days, metrics that do
not apply say so, an inherited key can be removed, and an error raised on the ranks of a launched job reaches the
terminal once, as one line, with exit code 2 (the traceback in the run's log file)."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hyrank.pipeline.config import ConfigError, load_config
from hyrank.pipeline.data.synth import generate_logs

from conftest import DEFAULT_CONFIG, TINY, small_synth


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_runs") / "data"
    generate_logs(small_synth(num_days=3, rows_per_day=1200, rows_per_chunk=400), root)
    return root


def _hyrank(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "hyrank.pipeline.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _sets(root, out_dir):
    return [a for item in [f'data.root="{root}"', f'out_dir="{out_dir}"', *TINY] for a in ("--set", item)]


def test_evaluate_scores_a_span_like_train_eval_days(root, tmp_path):
    trained = _hyrank("train", "--config", str(DEFAULT_CONFIG), "--quiet", *_sets(root, tmp_path / "run"),
                      "--days", "2026-11-01", "--eval-days", "2026-11-02..2026-11-03")
    assert trained.returncode == 0, trained.stderr[-2000:]
    line = next(l for l in trained.stdout.splitlines() if l.startswith("eval 2026-11-02..2026-11-03: "))
    checkpoint = tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    evaluated = _hyrank("evaluate", "--checkpoint", str(checkpoint), "--days", "2026-11-02..2026-11-03",
                        "--days", "2026-11-03", "--out", str(tmp_path / "m.json"), "--quiet")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    # the config comes from the checkpoint; the same code scores the same rows
    assert line.split(": ", 1)[1] in evaluated.stdout
    saved = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert saved["2026-11-02..2026-11-03"]["num_rows"] == 2400 and saved["2026-11-03"]["num_rows"] == 1200
    # without a group column, query-level AUC is not a number made up from one big "query"
    no_group = _hyrank("evaluate", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "latest"), "--days",
                       "2026-11-03", "--unset",
                       "features.group", "--quiet")
    assert no_group.returncode == 0, no_group.stderr[-2000:]
    assert "query-AUC n/a (no group column)" in no_group.stdout


def test_stream_evaluates_a_span_once_it_stops(root, tmp_path):
    run = _hyrank("stream", "--config", str(DEFAULT_CONFIG), "--quiet", *_sets(root, tmp_path / "run"),
                  "--until", "2026-11-01", "--eval-days", "2026-11-02..2026-11-03")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "eval 2026-11-02..2026-11-03: AUC" in run.stdout and "(2,400 rows)" in run.stdout, run.stdout


def test_an_inherited_key_is_removed_with_unset(tmp_path):
    (tmp_path / "mine.toml").write_text(f'extends = "{DEFAULT_CONFIG}"\nunset = ["features.oracle"]\n'
                                        'name = "mine"\n')
    assert load_config(DEFAULT_CONFIG).features.oracle == "_oracle_p"
    assert load_config(tmp_path / "mine.toml").features.oracle is None
    assert load_config(DEFAULT_CONFIG, unsets=["features.group"]).features.group is None
    with pytest.raises(ConfigError, match="unset 'features.grop': there is no 'features.grop'"):
        load_config(DEFAULT_CONFIG, unsets=["features.grop"])
    (tmp_path / "alone.toml").write_text('unset = ["features.oracle"]\n')
    with pytest.raises(ConfigError, match="extends none"):
        load_config(tmp_path / "alone.toml")


def test_a_column_of_the_wrong_type_stops_the_launch_before_any_rank_starts(root, tmp_path):
    bad = tmp_path / "bad" / "day=2026-11-01"
    bad.mkdir(parents=True)
    table = pq.read_table(root / "day=2026-11-01")
    col = table.schema.get_field_index("item_ctr_prior")
    table = table.set_column(col, "item_ctr_prior", table.column(col).cast(pa.string()))
    pq.write_table(table, bad / "part-0.parquet")
    (bad / "_SUCCESS").touch()
    run = _hyrank("train", "--config", str(DEFAULT_CONFIG), "--quiet", *_sets(bad.parent, tmp_path / "run"),
                  "--days", "2026-11-01", "--nproc-per-node", "2")
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [l for l in run.stderr.splitlines() if " ERROR " in l]
    assert len(errors) == 1, run.stderr[-3000:]
    assert str(bad / "part-0.parquet") in errors[0] and "item_ctr_prior" in errors[0], errors[0]
    assert "string" in errors[0] and "float" in errors[0], errors[0]  # found and expected
    assert "[rank" not in run.stderr and not (tmp_path / "run").exists()  # no rank ran, nothing was written


def test_an_error_on_the_ranks_is_one_line_with_exit_code_2(root, tmp_path):
    # a day whose every row is bad: each rank raises the same budget error after reading its share
    bad = tmp_path / "bad"
    day = bad / "day=2026-11-01"
    day.mkdir(parents=True)
    table = pq.read_table(root / "day=2026-11-01")
    ids = pa.array([-5] * table.num_rows, pa.int64())
    pq.write_table(table.set_column(table.schema.get_field_index("item_id"), "item_id", ids),
                   day / "part-0.parquet", row_group_size=300)
    (day / "_SUCCESS").touch()
    run = _hyrank("train", "--config", str(DEFAULT_CONFIG), "--quiet", *_sets(bad, tmp_path / "run"),
                  "--days", "2026-11-01", "--nproc-per-node", "2")
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [l for l in run.stderr.splitlines() if " ERROR " in l]
    assert len(errors) == 1, run.stderr[-3000:]
    assert "2026-11-01" in errors[0] and "negative_id" in errors[0]
    assert "Traceback" not in run.stderr and "ChildFailedError" not in run.stderr
    logs = sorted((tmp_path / "run" / "logs").glob("rank-*.log"))
    assert logs and "Traceback" in logs[0].read_text()
