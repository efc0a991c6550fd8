"""Daily retraining (`hyrank stream`): progressive order, warm restarts, waiting for a day, gaps, signals, and every
row trained exactly once through random SIGKILLs of the whole job (proved from the run's ledger)."""

import datetime as dt
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from hyrank.pipeline.config import load_config
from hyrank.pipeline.data.days import discover_days
from hyrank.pipeline.data.synth import generate_logs
from hyrank.pipeline.data.validate import validate_rows
from hyrank.pipeline.distributed.env import env_of_current_group
from hyrank.pipeline.stream import StreamOptions, stream
from hyrank.pipeline.train.checkpoint import read_meta
from hyrank.pipeline.train.state import read_ledger

from conftest import DEFAULT_CONFIG, TINY, latest_checkpoint_tensors, small_synth, tiny_cfg
from dist import run_distributed

pytestmark = pytest.mark.dist

DAYS = [dt.date(2026, 11, d) for d in (1, 2, 3)]
SMALL = [*TINY, "train.allreduce_sync_steps=0"]


@pytest.fixture(scope="module")
def three_days(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream") / "data"
    generate_logs(small_synth(num_days=3, rows_per_day=3000), root)
    return root


def _cfg(root, out_dir, *extra):
    return tiny_cfg(root, out_dir, "train.allreduce_sync_steps=0", *extra)


def _stream(rank, world_size, cfg, options):
    result = stream(cfg, env_of_current_group(), options)
    return {"trained": [s.day for s in result.trained], "progressive": sorted(result.progressive),
            "stopped": result.stopped}


def test_each_day_is_evaluated_before_it_is_trained_and_a_finished_run_is_a_no_op(three_days, tmp_path):
    cfg = _cfg(three_days, tmp_path / "run")
    first, _ = run_distributed(_stream, cfg, StreamOptions(), timeout_s=300)
    assert first["trained"] == [str(d) for d in DAYS] and first["progressive"] == first["trained"]
    steps = {d: json.loads((tmp_path / "run" / "train" / f"day-{d}.json").read_text())["steps"] for d in DAYS}
    progressive = {d: json.loads((tmp_path / "run" / "metrics" / f"progressive-{d}.json").read_text()) for d in DAYS}
    assert progressive[DAYS[0]]["metrics"] is None and "no model yet" in progressive[DAYS[0]]["note"]
    # the model that scored day D had trained on every day before D, and nothing of D
    assert progressive[DAYS[1]]["model_step"] == steps[DAYS[0]]
    assert progressive[DAYS[2]]["model_step"] == steps[DAYS[0]] + steps[DAYS[1]]
    assert progressive[DAYS[2]]["metrics"]["num_rows"] == 3000
    csv = (tmp_path / "run" / "report" / "days.csv").read_text().splitlines()
    assert len(csv) == 1 + len(DAYS) and (tmp_path / "run" / "report" / "days.png").stat().st_size > 0
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "up to date" and status["last_day_done"] == str(DAYS[-1]) and status["days_behind"] == 0
    again, _ = run_distributed(_stream, cfg, StreamOptions(), timeout_s=300)
    assert again["trained"] == [] and again["progressive"] == []
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [h["days_done"] for h in history if h["event"] == "start"] == [0, 3]


def test_follow_picks_up_a_day_whose_success_marker_appears_while_it_waits(three_days, tmp_path):
    root = tmp_path / "data"
    for day in DAYS:
        src = three_days / f"day={day}"
        (root / src.name).mkdir(parents=True)
        for f in src.iterdir():
            if f.name != "_SUCCESS" or day != DAYS[-1]:  # the last day is not complete yet
                (root / src.name / f.name).write_bytes(f.read_bytes())
    marker = root / f"day={DAYS[-1]}" / "_SUCCESS"

    def complete_later():
        status = tmp_path / "run" / "status.json"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # once the stream says it waits for the day, the day completes
            if status.is_file() and "waiting" in status.read_text():
                marker.touch()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=complete_later)
    thread.start()
    options = StreamOptions(follow=True, until=DAYS[-1], poll_s=0.2, max_poll_s=0.5)
    out, _ = run_distributed(_stream, _cfg(root, tmp_path / "run"), options, timeout_s=300)
    thread.join()
    assert out["trained"] == [str(d) for d in DAYS]


def test_a_gap_is_an_error_unless_skipped(three_days, tmp_path):
    root = tmp_path / "data"
    for day in (DAYS[0], DAYS[2]):  # day 2 missing
        src = three_days / f"day={day}"
        (root / src.name).mkdir(parents=True)
        for f in src.iterdir():
            (root / src.name / f.name).write_bytes(f.read_bytes())
    with pytest.raises(RuntimeError, match=f"day {DAYS[1]} is missing .no folder. while {DAYS[2]} is complete"):
        run_distributed(_stream, _cfg(root, tmp_path / "run"), StreamOptions(), timeout_s=300)
    out, _ = run_distributed(_stream, _cfg(root, tmp_path / "run2"), StreamOptions(skip_gaps=True), timeout_s=300)
    assert out["trained"] == [str(DAYS[0]), str(DAYS[2])]
    history = (tmp_path / "run2" / "history.jsonl").read_text()
    assert '"event": "skipped_day", "day": "2026-11-02"' in history


def _cmd(root, out_dir, *extra):
    sets = [a for item in SMALL + list(extra) for a in ("--set", item)]
    return [sys.executable, "-m", "hyrank.pipeline.cli", "stream", "--config", str(DEFAULT_CONFIG), "--quiet",
            "--nproc-per-node", "2", "--set", f'data.root="{root}"', "--set", f'out_dir="{out_dir}"', *sets]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def test_sigterm_while_following_exits_at_once_and_cleanly(three_days, tmp_path):
    done = subprocess.run(_cmd(three_days, tmp_path / "run"), capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(_cmd(three_days, tmp_path / "run", ) + ["--follow", "--poll-s", "0.2"], stdout=f,
                                stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    status = tmp_path / "run" / "status.json"
    deadline = time.monotonic() + 120
    while '"waiting"' not in status.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert time.monotonic() - start < 30
    assert json.loads(status.read_text())["state"] == "stopped"
    assert "stopped by SIGTERM" in log.read_text()


# -- a data file replaced under a run ---------------------------------------------------------------------------------


def _copy_days(src: Path, root: Path, days) -> Path:
    for day in days:
        shutil.copytree(src / f"day={day}", root / f"day={day}")
    return root


def _same_layout_other_rows(tmp_path) -> Path:
    """A day file with the layout of the synthetic days' (3000 rows in 3 row groups) and other rows: another seed."""
    other = tmp_path / "other"
    generate_logs(small_synth(num_days=1, rows_per_day=3000, seed=8), other)
    (file,) = (other / f"day={DAYS[0]}").glob("*.parquet")
    return file


def _checkpoints(out_dir: Path) -> list[Path]:
    """The complete checkpoints, oldest first (a folder is renamed to step-N with its meta.json in it)."""
    return sorted(p for p in (out_dir / "checkpoints").glob("step-*[0-9]") if (p / "meta.json").is_file())


def _mid_day_checkpoint(out_dir: Path) -> Path | None:
    return next((p for p in _checkpoints(out_dir) if read_meta(p).progress.day is not None), None)


def test_a_file_of_the_day_in_progress_replaced_after_a_kill_is_an_error_naming_it(three_days, tmp_path):
    """Killed part-way through a day, the day's file replaced by one of the same row-group layout (which the reader's
    cursor accepts): the resume refuses, naming the file and what changed, instead of finishing the day from rows
    the ledger would count as the old file's."""
    root = _copy_days(three_days, tmp_path / "data", DAYS[:1])
    out, log = tmp_path / "run", tmp_path / "run.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(_cmd(root, out, *KILLED), stdout=f, stderr=subprocess.STDOUT, env=_env(),
                                start_new_session=True)
    deadline = time.monotonic() + 180
    while _mid_day_checkpoint(out) is None:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1.5)  # the ranks notice the launcher is gone
    latest = _checkpoints(out)[-1]  # what the resume starts from
    assert read_meta(latest).progress.day == str(DAYS[0]), "the kill came after the day's end"
    (file,) = (root / f"day={DAYS[0]}").glob("*.parquet")
    old_size, other = file.stat().st_size, _same_layout_other_rows(tmp_path)
    shutil.copyfile(other, file)
    done = subprocess.run(_cmd(root, out, *KILLED), capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    said = done.stdout + done.stderr
    assert f"day {DAYS[0]}: its files changed since the run started the day" in said
    assert f"{file}: size {old_size} -> {other.stat().st_size} bytes" in said
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and str(file) in status["last_error"]
    assert _checkpoints(out)[-1] == latest  # nothing trained on the new rows


def test_a_trained_day_rewritten_later_is_reported_not_retrained(three_days, tmp_path):
    """A completed day whose file was rewritten since: the next start says so in history.jsonl and status.json (the
    ledger holds each trained file's fingerprint) and trains nothing; retraining it is the user's choice."""
    root = _copy_days(three_days, tmp_path / "data", DAYS[:2])
    cfg = _cfg(root, tmp_path / "run")
    first, _ = run_distributed(_stream, cfg, StreamOptions(), timeout_s=300)
    assert first["trained"] == [str(d) for d in DAYS[:2]]
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    (file,) = (root / f"day={DAYS[0]}").glob("*.parquet")
    old_size, other = file.stat().st_size, _same_layout_other_rows(tmp_path)
    shutil.copyfile(other, file)
    again, _ = run_distributed(_stream, cfg, StreamOptions(), timeout_s=300)
    assert again["trained"] == [] and (tmp_path / "run" / "checkpoints" / "latest").read_text() == latest
    changed = {str(DAYS[0]): [f"{file.name}: size {old_size} -> {other.stat().st_size} bytes"]}
    start = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()][-1]
    assert start["event"] == "start" and start["changed_days"] == changed
    assert "not retrained" in start["note"] and f"--from {DAYS[0]}" in start["note"]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["changed_days"] == changed


# -- exactly once, through random kills ------------------------------------------------------------------------------

# ~94 steps a day, a checkpoint every 4: kills land in steps, checkpoint writes, evaluations and between days
KILLED = ["data.batch_size_per_rank=16", "checkpoint.every_steps=4"]


def _valid_rows(root: Path) -> set[tuple[str, str, int, int]]:
    spec = load_config(DEFAULT_CONFIG).features
    rows = set()
    for day in discover_days(root):
        for file in day.files:
            pf = pq.ParquetFile(file)
            for rg in range(pf.metadata.num_row_groups):
                verdict = validate_rows(pf.read_row_group(rg, columns=spec.columns()), spec, max_list_len=100_000)
                rows |= {(str(day.day), str(file), rg, int(r)) for r in verdict.good_B.nonzero()[0]}
    return rows


def _kill_at_random(root, out_dir, kills: int, seed: int, within_s: float, extra=()) -> list[str]:
    """Start the stream; once it is past start-up (its start is in history.jsonl), SIGKILL the whole job at a
    uniformly random moment of the next `within_s` seconds; `kills` times; then let it finish. Returns the last log
    line before each kill: steps, checkpoint writes, evaluations, day boundaries."""
    rng, moments = random.Random(seed), []
    log, history = out_dir.parent / f"{out_dir.name}.log", out_dir / "history.jsonl"
    for attempt in range(kills + 1):
        with open(log, "w") as f:
            proc = subprocess.Popen(_cmd(root, out_dir, *KILLED, *extra), stdout=f,
                                    stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        if attempt == kills:
            assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
            return moments
        deadline = time.monotonic() + 120
        while (not history.is_file() or history.read_text().count('"start"') <= attempt) and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        time.sleep(rng.uniform(0, within_s))
        if proc.poll() is not None:
            assert proc.returncode == 0, log.read_text()[-3000:]
            return moments  # it finished before this kill
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        lines = [line for line in log.read_text().splitlines() if " INFO " in line or " WARNING " in line]
        last = lines[-1].split(": ", 1)[-1] if lines else "start-up"
        moments.append("after: " + re.sub(r"/\S+", "<path>", last)[:50])  # what the job had just done
        time.sleep(1.5)  # ranks notice the launcher is gone within a second (launch.die_with_launcher)
    return moments


def _check_exactly_once(root: Path, out_dir: Path, reference: Path) -> int:
    tensors, meta = latest_checkpoint_tensors(out_dir)
    ref_tensors, _ = latest_checkpoint_tensors(reference)
    assert meta.progress.days_done == [str(d) for d in DAYS]
    assert ref_tensors.keys() == tensors.keys()
    for key, value in ref_tensors.items():
        assert torch.equal(value, tensors[key]), f"{key} differs from the uninterrupted run"
    ledger = read_ledger(out_dir, meta.per_rank("ledger"))
    trained = [(e["day"], e["file"], e["row_group"], row) for e in ledger for row in range(e["start"], e["stop"])]
    valid = _valid_rows(root)
    assert len(trained) == len(set(trained)), "a row was trained twice"
    assert set(trained) == valid, f"{len(valid - set(trained))} valid rows never trained"
    for day in DAYS:  # and the progressive metrics are the uninterrupted run's
        mine = json.loads((out_dir / "metrics" / f"progressive-{day}.json").read_text())["metrics"]
        ref = json.loads((reference / "metrics" / f"progressive-{day}.json").read_text())["metrics"]
        assert mine == ref
    return len(trained)


def _reference(root, tmp_path, extra=()) -> Path:
    out = tmp_path / "reference"
    done = subprocess.run(_cmd(root, out, *KILLED, *extra), capture_output=True, text=True, env=_env(),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_random_sigkills_train_every_row_exactly_once(three_days, tmp_path):
    moments = _kill_at_random(three_days, tmp_path / "run", kills=5, seed=0, within_s=3.0)
    assert len(moments) >= 5, moments
    rows = _check_exactly_once(three_days, tmp_path / "run", _reference(three_days, tmp_path))
    assert rows == 9000  # every row of the three days (the synthetic days hold no bad row)
    print(f"{len(moments)} kills at: {moments}; {rows} rows checked")


# the item table (sequences: the MC-EC) by recency, user (pooled: the MC-EBC) by frequency; intervals that a
# checkpoint every 4 steps cuts, so each checkpoint's admission of pending ids is part of what must match
MANAGED = ['features.tables.6.managed={eviction="lru", eviction_interval_steps=5}',
           'features.tables.0.managed={eviction="lfu", eviction_interval_steps=7}']


def test_random_sigkills_train_every_row_exactly_once_managed(three_days, tmp_path):
    """Managed tables through kills: the remap state (ids, scores, steps) and the rows it resets end bit-identical
    to the uninterrupted run's (the light twin of the test above: 2 kills)."""
    moments = _kill_at_random(three_days, tmp_path / "run", kills=2, seed=3, within_s=3.0, extra=MANAGED)
    assert len(moments) >= 2, moments
    rows = _check_exactly_once(three_days, tmp_path / "run", _reference(three_days, tmp_path, MANAGED))
    assert rows == 9000
    tensors, _ = latest_checkpoint_tensors(tmp_path / "run")
    assert any(k.endswith("item.slot_ids.") for k in tensors)  # the remap was in what was compared


@pytest.mark.heavy
def test_twenty_random_sigkills_train_every_row_exactly_once(tmp_path):
    """The heavy twin: twice the rows (~30 s of training after start-up), so 20 kills land before it can finish."""
    root = tmp_path / "data"
    generate_logs(small_synth(num_days=3, rows_per_day=6000), root)
    moments = _kill_at_random(root, tmp_path / "run", kills=20, seed=1, within_s=1.5)
    assert len(moments) >= 20, moments
    rows = _check_exactly_once(root, tmp_path / "run", _reference(root, tmp_path))
    print(f"{len(moments)} kills at: {moments}; {rows} rows checked")
