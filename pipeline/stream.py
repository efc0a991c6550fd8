"""Daily retraining: follow the logs day after day, evaluating each day before training on it.

    hyrank stream --config jobs/configs/default.toml --nproc-per-node 2                 # every complete day, then stop
    hyrank stream --config ... --nproc-per-node 2 --follow                              # and wait for the next ones
    hyrank stream --config ... --from 2026-11-01 --until 2026-11-30 --skip-gaps

For each complete day D in order (complete = its `_SUCCESS` marker exists): the current model's progressive metrics
on D (the metric the model serving D would have had), then one training pass over D, then a checkpoint, the day's
row ledger, `report/days.csv` + `days.png` and `status.json`. It always warm-starts from the run's own latest
checkpoint, so the same command restarted after any crash continues exactly where the run's state stands
(Trainer.run's resume; every row is trained once: `ledger/` proves it), and a run with nothing left to do says so.

The day loop is Trainer.run's; this module decides which day comes next and registers the day's end work with it
(RunPlan.day_end: export and report, after the day's checkpoint). Which day is next is decided collectively: rank 0
looks at the data root and every rank learns the answer (and whether any rank was signalled) from one all_gather
per look (`env.comm`), so all ranks train the same day or wait, or stop, together. A missing or incomplete day D
while a later day is complete is a gap: `--follow` waits for D, `--skip-gaps` skips it (logged, and recorded in
`history.jsonl`); without either it is an error. `history.jsonl` also gets one line per start: what the run found
and where it continued.

A data file replaced under the run: the ledger records each trained file's fingerprint (size and a hash of its
Parquet footer: pipeline/data/fingerprint.py). A file of the day in progress that changed before a resume from a
mid-day checkpoint stops the run, naming it (Ledger.begin_day). A day already trained whose files changed since is
found at each start (a footer read per file of the days done) and reported in the start's line of `history.jsonl`
and in `status.json` (`changed_days`), not retrained: the model keeps what it learned from the old files, and
training on the new ones is the user's choice (a new run with --from).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hyrank.pipeline.config import RunConfig
from hyrank.pipeline.data.days import DayPartition, find_day, scan_days
from hyrank.pipeline.data.fingerprint import FileFingerprint, file_changes, file_fingerprint
from hyrank.pipeline.distributed.env import DistEnv
from hyrank.pipeline.files import write_json
from hyrank.pipeline.serving.publish import QUALITY_MARGIN
from hyrank.pipeline.storage import location
from hyrank.pipeline.train.resume import WarmStart, check_resumable
from hyrank.pipeline.train.plan import DayEnd
from hyrank.pipeline.train.trainer import RunPlan, RunResult, Trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamOptions:
    first: dt.date | None = None  # the first day of a fresh run (default: the earliest complete day)
    until: dt.date | None = None  # the last day to train (default: none)
    follow: bool = False  # wait for days that are not complete yet
    skip_gaps: bool = False  # skip a missing/incomplete day once a later one is complete
    poll_s: float = 5.0  # first wait between looks at the data root; doubles up to max_poll_s
    max_poll_s: float = 60.0
    warm_start: WarmStart | None = None  # the run's checkpoint is of another model: carry these weights
    export_to: Path | None = None  # publish each day's model there (pipeline/serving/export.py), gated
    quality_margin: float = QUALITY_MARGIN  # not published if its held-out AUC falls this far below the published one's
    # publish a delta of the version `latest` names (pipeline/serving/delta.py) while its chain of deltas is shorter
    # than this, else a full export (0: always full)
    export_delta: int = 0
    eval_days: tuple = ()  # days or spans (pipeline.data.days.Days) scored as sets once the stream stops


def stream(cfg: RunConfig, env: DistEnv, options: StreamOptions, *, progress: bool = False) -> RunResult:
    """Run the daily loop until there is nothing left to do (or a signal); collective."""
    check_resumable(cfg, "latest-if-any", warm_start=options.warm_start)  # before any collective: a readable diff
    trainer = Trainer(cfg, env, progress=progress)
    days = StreamDays(trainer, options)
    try:
        result = trainer.run(RunPlan(train_days=days, resume="latest-if-any", progressive=True,
                                     warm_start=options.warm_start, eval_days=list(options.eval_days),
                                     day_end=[days.day_end]))
    except Exception as e:
        days.write_status("failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        trainer.close()
    days.finish(result)
    return result


class StreamDays:
    """The days to train, in order, decided collectively as each one is needed (see the module docstring)."""

    def __init__(self, trainer: Trainer, options: StreamOptions):
        self.trainer, self.options = trainer, options
        self.cfg, self.env = trainer.cfg, trainer.env
        self.out_dir = Path(self.cfg.out_dir)
        self.waiting_for = ""
        self.last_export, self.exported = "", ""
        self.changed_days: dict[str, list[str]] = {}  # days done whose files changed since (rank 0, at the start)

    def __iter__(self) -> Iterator[DayPartition]:
        self._record_start()
        while (day := self._next()) is not None:
            yield day

    # -- what comes next (collective) ----------------------------------------------------------------------------

    def _next(self) -> DayPartition | None:
        wait_s, said = self.options.poll_s, ""
        while True:
            decision = self._look() if self.env.is_main else None
            decision, stop = self._share(decision)
            if stop:
                self.write_status("stopped")
                return None
            kind, value = decision
            if kind == "day":
                self.waiting_for = ""
                self.write_status("training")
                d = self.cfg.data
                return find_day(d.root, dt.date.fromisoformat(value), partition_key=d.partition_key,
                                require_success=d.require_success)
            if kind == "done":
                if self.env.is_main:
                    log.info("%s", value)
                return None
            if kind == "error":
                raise ValueError(value)
            self.waiting_for = value
            if value != said:  # what it waits for, once per change (and the back-off, in the status)
                if self.env.is_main:
                    log.info("%s; next look in %.0f s (backing off to %.0f s)", value, wait_s, self.options.max_poll_s)
                    self.write_status("waiting")
                said = value
            self._sleep(wait_s)
            wait_s = min(wait_s * 2, self.options.max_poll_s)

    def _sleep(self, seconds: float) -> None:
        """Wait, but not past a signal: SIGTERM while waiting for a day stops the run at once, not a poll later."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self.trainer.stop_requested:
            time.sleep(min(0.1, end - time.monotonic()))

    def _share(self, decision: tuple[str, str] | None) -> tuple[tuple[str, str], bool]:
        """Rank 0's decision to every rank, and whether any rank was signalled (one all_gather)."""
        everyone = self.env.comm.gather_objects((decision, self.trainer.stop_requested))
        return everyone[0][0], any(s for _, s in everyone)

    def _look(self) -> tuple[str, str]:
        """Rank 0: ("day", iso) to train next, ("wait", what for), ("done", why) or ("error", why)."""
        o, d = self.options, self.cfg.data
        scan = scan_days(d.root, partition_key=d.partition_key, require_success=d.require_success)
        complete = sorted(p.day for p in scan.found)
        expected = self._expected(complete)
        if expected is None:
            return ("wait", f"waiting for the first complete day under {d.root}") if o.follow else \
                ("error", f"no complete day under {d.root} to stream")
        if o.until is not None and expected > o.until:
            return "done", f"up to date: every day through {o.until} is trained; nothing to do"
        if expected in complete:
            return "day", expected.isoformat()
        why = next((s.reason for s in scan.skipped if s.path.name == f"{d.partition_key}={expected}"), "no folder")
        later = [c for c in complete if c > expected and (o.until is None or c <= o.until)]
        if later and o.skip_gaps:
            log.warning("skipping day %s (%s): %s is complete (--skip-gaps)", expected, why, later[0])
            self._history({"event": "skipped_day", "day": str(expected), "reason": why})
            return "day", later[0].isoformat()
        if later:
            gap = f"day {expected} is missing ({why}) while {later[0]} is complete"
            return ("wait", f"{gap}: waiting for it (--skip-gaps skips it)") if o.follow else \
                ("error", f"{gap}: wait for it with --follow, or skip it with --skip-gaps")
        if o.follow:
            return "wait", f"waiting for day {expected} ({why})"
        return "done", f"up to date: every complete day through {complete[-1]} is trained; nothing to do"

    def _expected(self, complete: list[dt.date]) -> dt.date | None:
        """The day to train next: the one in progress, else the day after the last one done, else the first."""
        p = self.trainer.progress
        if p.day is not None:
            return dt.date.fromisoformat(p.day)
        if p.days_done:
            return max(dt.date.fromisoformat(d) for d in p.days_done) + dt.timedelta(days=1)
        if self.options.first is not None:
            return self.options.first
        return complete[0] if complete else None

    # -- records (rank 0) ----------------------------------------------------------------------------------------

    def _record_start(self) -> None:
        p = self.trainer.progress
        entry = {"event": "start", "host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv),
                 "checkpoint": str(self.trainer.checkpointer.latest() or ""), "step": p.global_step,
                 "days_done": len(p.days_done), "last_day_done": _last(p.days_done), "day_in_progress": p.day}
        if self.env.is_main and (changed := self._changed_days()):
            self.changed_days = changed
            note = (f"not retrained: the model keeps what it learned from the files as they were. To train on the "
                    f"new ones, start a new run (another out_dir) with --from {min(changed)}")
            listed = "; ".join(f"{day}: {', '.join(c)}" for day, c in list(changed.items())[:3])
            log.warning("%d day(s) already trained have changed files since (history.jsonl and status.json list "
                        "them all): %s%s. %s", len(changed), listed, " ..." if len(changed) > 3 else "", note)
            entry |= {"changed_days": changed, "note": note}
        self._history(entry)

    def _changed_days(self) -> dict[str, list[str]]:
        """The days done whose files are not the versions the run trained (the ledger's fingerprints: rewritten,
        added or removed since), with what changed. A report, not a gate: a completed day is retrained only by the
        user's choice. Days trained before the ledger recorded fingerprints are not checked. Costs a footer read
        per file of the days done, once per start."""
        d = self.cfg.data
        recorded: dict[str, dict[str, FileFingerprint]] = {}  # partition folder -> file name -> as trained
        for file, fp in self.trainer.ledger.recorded_files().items():
            recorded.setdefault(Path(file).parent.name, {})[Path(file).name] = fp
        changed = {}
        try:
            for day in sorted(set(self.trainer.progress.days_done)):
                if (folder := f"{d.partition_key}={day}") in recorded:
                    now = {f.name: file_fingerprint(f) for f in sorted((location(d.root) / folder).glob("*.parquet"))}
                    if changes := file_changes(recorded[folder], now):
                        changed[day] = changes
        except OSError as e:  # e.g. a file without read permission: the check is a report, not a reason to stop
            log.warning("could not compare the files of the days done with the ledger's fingerprints: %s", e)
        return changed

    def day_end(self, end: DayEnd) -> None:
        """The trainer's day-end step (every rank; the work is rank 0's): publish the day's model, rewrite the
        report."""
        self._export()
        self._report()

    def _export(self) -> None:
        """Publish the newest day-end checkpoint (rank 0; the others wait at the next look): parity and quality
        gated, and a refusal is recorded (history.jsonl, status.json), not an error of the run. With export_delta,
        a delta of the version `latest` names while its chain is short enough (publish.delta_base)."""
        checkpoint = self.trainer.checkpointer.latest()
        if self.options.export_to is None or not self.env.is_main or checkpoint is None or \
                self.trainer.progress.day is not None or checkpoint.name == self.exported:
            return
        from hyrank.pipeline.serving.export import DeltaRefused, export_checkpoint
        from hyrank.pipeline.serving.publish import NotPublished, delta_base

        self.exported = checkpoint.name
        export = functools.partial(export_checkpoint, checkpoint, self.options.export_to, trust_checkpoint=True,
                                   quality_margin=self.options.quality_margin)  # trusted: this run's own checkpoint
        try:
            base = delta_base(self.options.export_to, self.options.export_delta)
            try:
                result = export(delta_from=base)
            except DeltaRefused as e:  # e.g. the published model is another one (a warm start): a full export
                log.warning("%s; exporting in full", e)
                result = export()
        except NotPublished as e:
            log.warning("%s", e)
            self.last_export = f"not published: {e}"
            self._history({"event": "not_published", "checkpoint": str(checkpoint), "reason": str(e)})
            return
        if result.already_published:  # a restart redoes the day's end its stop cut short
            self.last_export = f"already published {result.version}"
            return
        self.last_export = f"published {result.version}"
        self._history({"event": "published", "version": result.version, "parity": result.parity,
                       "quality_gate": result.quality_gate})

    def finish(self, result: RunResult) -> None:
        if not result.stopped:
            self._export()
        self._report()
        self.write_status("stopped" if result.stopped else ("waiting" if self.waiting_for else "up to date"))

    def write_status(self, state: str, *, error: str = "") -> None:
        """`status.json`: health at a glance for a scheduler or a person (rank 0)."""
        if not self.env.is_main:
            return
        d, p = self.cfg.data, self.trainer.progress
        try:
            found = scan_days(d.root, partition_key=d.partition_key, require_success=d.require_success).found
        except FileNotFoundError:
            found = []
        newest = max((f.day for f in found), default=None)
        last = _last(p.days_done)
        behind = len([f for f in found if last is None or f.day > dt.date.fromisoformat(last)])
        write_json(self.out_dir / "status.json", {
            "state": state, "updated_at": dt.datetime.now().isoformat(timespec="seconds"),
            "last_day_done": last, "day_in_progress": p.day, "newest_complete_day": str(newest) if newest else None,
            "days_behind": behind, "global_step": p.global_step,
            "last_checkpoint": str(self.trainer.checkpointer.latest() or ""), "waiting_for": self.waiting_for,
            "last_export": self.last_export, "changed_days": self.changed_days, "last_error": error})

    def _report(self) -> None:
        if self.env.is_main:
            from hyrank.pipeline.report import write_report

            write_report(self.out_dir)

    def _history(self, entry: dict) -> None:
        if self.env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "history.jsonl", "a") as f:  # append-only: each line is one event
                f.write(json.dumps({"at": dt.datetime.now().isoformat(timespec="seconds"), **entry}) + "\n")


def _last(days: list[str]) -> str | None:
    return max(days) if days else None
