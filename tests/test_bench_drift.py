"""`hyrank bench drift` end to end on tiny drifting days, and its paired statistics against numpy."""

import json
import math

import numpy as np
import pytest

from hyrank.bench.drift import SETUPS, mean_se, summarize
from hyrank.pipeline.cli import main


@pytest.mark.dist
def test_bench_drift_managed_against_hashed_tables_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "drift", "--rows", "1200", "--days", "3", "--seeds", "1", "--out", str(out),
            "--set", "data.batch_size_per_rank=64", "--set", "model.options.hidden=[16]",
            "--set", "features.sequences.0.max_len=16", "--set", "train.min_unit_rows=1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert (out / "drift_auc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "drift.md").read_text()
    assert table.startswith("| day | managed |") and table.split("load average")[0].strip() in printed
    assert "managed / hashed equal" in printed and "oracle" in printed and "From the third day on" in printed
    assert not (out / "data" / "seed-0").exists()  # the generated days go once their runs are done
    record = json.loads((out / "drift.json").read_text())

    # days 2 and 3 are scored before they are trained on (day 1 has no model yet), by all three setups
    days = record["summary"]["days"]
    assert [d["day"] for d in days] == ["2026-11-02", "2026-11-03"]
    for d in days:
        for setup in SETUPS:
            assert 0 < d[setup] < 1, d
        assert 0.5 < d["oracle_auc"] < 1, d  # the generator's true click probability ranks well above chance
        diff, se = d["managed-hashed_equal"]
        assert diff == pytest.approx(d["managed"] - d["hashed_equal"]) and math.isnan(se)  # one seed: no s.e.
    run = record["runs"]["0"]
    for setup in SETUPS:
        assert [x["rows"] for x in run[setup]["days"]] == [1200, 1200, 1200]  # every row trained
        assert run[setup]["days"][0]["auc"] is None
    assert record["summary"]["dropped_rows"] == {s: 0 for s in SETUPS}  # plain tables hash 63-bit ids, none refused
    assert run["managed"]["days"][1]["managed"]["item"]["admitted"] > 0  # the managed tables were managed
    assert record["summary"]["median_speed_ratio"] > 0

    # the memory rule: an equal-memory hashed table holds at most one row less than the managed one; twice, twice
    memory = record["memory"]
    for table, m in memory["managed"].items():
        equal, double = memory["hashed_equal"][table], memory["hashed_double"][table]
        assert m["bytes"] - m["row_bytes"] < equal["bytes"] <= m["bytes"], (table, m, equal)
        assert 2 * m["bytes"] - m["row_bytes"] < double["bytes"] <= 2 * m["bytes"]
        assert equal["rows"] > m["rows"]  # the remap's bytes buy a hashed table more rows
    # ... and what the ranks' sharded models measured holding agrees: within one row of each resized table
    held = {s: sum(record["held"][s][k] for k in ("tables", "optimizer", "remap")) for s in SETUPS}
    slack = sum(m["row_bytes"] for m in memory["managed"].values())
    assert 0 <= held["managed"] - held["hashed_equal"] < slack, held
    assert record["held"]["managed"]["remap"] > 0 and record["held"]["hashed_equal"]["remap"] == 0


def test_summary_pairs_each_seed_and_day_and_its_standard_error_is_numpys():
    rng = np.random.default_rng(7)
    aucs = {s: {setup: rng.uniform(0.6, 0.8, 3).tolist() for setup in SETUPS} for s in range(3)}

    def day(i, auc, speed):
        return {"day": f"2026-11-0{i + 1}", "rows": 1000, "seconds": 1000 / speed, "bad_rows": 0,
                "auc": None if i == 0 else auc, "oracle_auc": None if i == 0 else 0.8}

    runs = {s: {setup: {"days": [day(i, aucs[s][setup][i], 100 * (s + 1) * (2 if setup == "managed" else 1))
                                 for i in range(3)]} for setup in SETUPS} for s in range(3)}
    summary = summarize(runs)
    assert [d["day"] for d in summary["days"]] == ["2026-11-02", "2026-11-03"]
    for row, i in zip(summary["days"], (1, 2)):
        diffs = np.array([aucs[s]["managed"][i] - aucs[s]["hashed_equal"][i] for s in range(3)])
        mean, se = row["managed-hashed_equal"]
        assert mean == pytest.approx(diffs.mean()) and se == pytest.approx(diffs.std(ddof=1) / np.sqrt(3))
        assert row["managed"] == pytest.approx(np.mean([aucs[s]["managed"][i] for s in range(3)]))
    assert summary["speed_ratios"] == pytest.approx([2.0, 2.0, 2.0]) and summary["median_speed_ratio"] == 2.0
    assert mean_se([0.5])[0] == 0.5 and math.isnan(mean_se([0.5])[1])
