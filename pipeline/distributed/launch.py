"""The launcher protocol of the job verbs (train, stream, evaluate) in one object: relaunch under torchrun, "am I a
rank?", the pre-launch check, the one-line error relay.

    launcher = Launcher.from_args(args, out_dir=cfg.out_dir, resume_hint="and --resume latest")
    return launcher.run(check=check_schema, job=train_on_every_rank, backend="auto", timeout_s=600)

Three ways a verb runs, all through `run`:
  launcher   `hyrank train ... --nproc-per-node N`: check(N) here (the feature spec against the files' footers, so
             a wrong column stops the job in one line before any rank builds a sharding plan), then this very
             command again under torchrun with N local ranks and `--launched-by <out_dir>/logs` appended; a
             rank's error is printed once, SIGTERM is forwarded and answered with where the ranks stopped.
  rank       a process torchrun started (TORCHELASTIC_RUN_ID): check on every rank first unless a hyrank
             launcher did (`--launched-by`), join the process group, job(env). A user error (ValueError,
             FileNotFoundError) on a rank this launcher started goes to torchelastic's error file (its message
             once, for the launcher to print) and its traceback to `<out_dir>/logs/rank-R.log`.
  alone      neither: a world of one in this process.
The protocol travels in argv (`--launched-by`, visible in `ps`), never in an environment variable of ours.

A rank dies with its launcher: torchelastic starts ranks in sessions of their own, so a SIGKILL of the launcher's
process group (a killed job, a lost pod) would leave them training and writing checkpoints into the run
directory. A daemon thread notices the launcher is gone (the rank is re-parented) within a second and kills it.
Kept free of torch at import: the CLI's parsers import this module.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hyrank.pipeline.distributed.env import DistEnv

log = logging.getLogger("hyrank")


def under_torchrun() -> bool:
    """Whether this process is a rank that torchrun's agent started (torchx's jobs included)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def die_with_launcher(poll_s: float = 0.5) -> None:
    """Kill this process once its parent (torchrun's agent) is gone; a no-op outside torchrun."""
    if not under_torchrun():
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        log.error("the launcher (PID %d) is gone: this rank stops too", launcher)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-launcher", daemon=True).start()


def add_launch_arguments(p: argparse.ArgumentParser) -> None:
    """The options a job verb takes for the launcher: --nproc-per-node, and the hidden --launched-by."""
    p.add_argument("--nproc-per-node", type=int, default=0,
                   help="launch N local ranks with torchrun (default: run in this process / the current torchrun job)")
    p.add_argument("--launched-by", type=Path, help=argparse.SUPPRESS)  # set by the launcher on its ranks


@dataclass(frozen=True)
class Launcher:
    nproc_per_node: int  # > 0: start that many local ranks (unless this process is a rank already)
    launched_by: Path | None  # on a rank a hyrank launcher started: the folder for the ranks' tracebacks
    out_dir: Path | None  # the run's folder: logs/ and stopped.json (None: a verb that writes no run)
    resume_hint: str = ""  # how to continue after a stop, for the stop message ("and --resume latest")

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, out_dir: str | Path | None, resume_hint: str = "") -> Launcher:
        return cls(args.nproc_per_node, args.launched_by, Path(out_dir) if out_dir is not None else None, resume_hint)

    @property
    def is_launcher(self) -> bool:
        return self.nproc_per_node > 0 and not under_torchrun()

    @property
    def restarted(self) -> bool:
        """A torchelastic restart of the job (--max-restarts): the job continues from its own checkpoints."""
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0

    def run(self, *, job: Callable[[DistEnv], int | None], check: Callable[[int, bool], None] | None = None,
            backend: str = "auto", timeout_s: int = 600) -> int:
        """Run the verb as the launcher, a rank or alone (see the module docstring). `check(world_size,
        log_warnings)` runs before any collective and raises ValueError/FileNotFoundError for a bad input."""
        if self.is_launcher:
            if check is not None:
                check(self.nproc_per_node, False)
            return self._relaunch()
        import torch.distributed as dist

        from hyrank.pipeline.distributed.env import init_distributed

        try:
            if check is not None and under_torchrun() and self.launched_by is None:
                # torchrun or torchx by hand: every rank reads the same footers and raises the same error, so none
                # is left waiting in a collective
                check(int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("RANK") == "0")
            die_with_launcher()
            env = init_distributed(backend, timeout_s)
            return job(env) or 0
        except (ValueError, FileNotFoundError) as e:
            if self._relay(e):
                return 2  # the launcher prints the message once for all ranks
            raise
        finally:  # also after an error: a verb called in-process (tests, notebooks) leaves no group behind
            if dist.is_initialized():
                dist.destroy_process_group()

    # -- rank side -----------------------------------------------------------------------------------------------

    def _relay(self, e: BaseException) -> bool:
        """On a rank this launcher started: the error's message to torchelastic's error file (the launcher prints
        it once for all ranks) and its traceback to `<log folder>/rank-R.log`. False elsewhere: the caller prints
        the line itself."""
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if not (error_file and self.launched_by is not None):
            return False
        log_file = None
        if not getattr(e, "leaves_run_untouched", False):  # a start refused by the run's holder writes nothing there
            log_file = self.launched_by / f"rank-{os.environ.get('RANK', '0')}.log"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(log_file, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {' '.join(sys.argv)}\n")
                f.write("".join(traceback.format_exception(e)) + "\n")
        with open(error_file, "w") as f:  # torchelastic's error file: ChildFailedError.failures[rank].message
            json.dump({"message": str(e), "timestamp": int(time.time()), "hyrank": True,
                       "log": str(log_file) if log_file else None}, f)
        return True

    # -- launcher side -------------------------------------------------------------------------------------------

    def _relaunch(self) -> int:
        """This very command again under torchrun with `nproc_per_node` local ranks (single node).

        SIGTERM / SIGINT to this process: torchelastic forwards it to the ranks, which finish their step and
        checkpoint; this process then exits 0 if they recorded the stop (`<out_dir>/stopped.json`), 1 if not.
        """
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import main as torchrun

        argv = list(sys.argv[1:])
        i = next(i for i, a in enumerate(argv) if a.startswith("--nproc-per-node"))
        del argv[i:i + (1 if "=" in argv[i] else 2)]
        if self.out_dir is not None:
            argv += ["--launched-by", str(self.out_dir.resolve() / "logs")]
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        started = time.time()
        # the agent's own report of a failed rank is the traceback-laden table this launcher replaces with one line
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
        try:
            torchrun(["--standalone", f"--nproc_per_node={self.nproc_per_node}", "-m", "hyrank.pipeline.cli", *argv])
        except SignalException as e:
            return self._report_stop(e.sigval.name, started)
        except ChildFailedError as e:
            return _report_failure(e)
        return 0

    def _report_stop(self, signal_name: str, since: float) -> int:
        """After the ranks were stopped by a signal: 0 if they checkpointed and recorded it, else 1."""
        record = self.out_dir / "stopped.json" if self.out_dir is not None else None
        if record is not None and record.is_file() and record.stat().st_mtime >= since:
            stop = json.loads(record.read_text())
            print(f"stopped by {signal_name} at step {stop['step']}: checkpoint {stop['checkpoint']}; continue with "
                  f"the same command{' ' + self.resume_hint if self.resume_hint else ''}")
            return 0
        log.error("stopped by %s before the ranks could checkpoint", signal_name)
        return 1


def _report_failure(e) -> int:
    """The ranks' errors, once: 2 with each distinct message the ranks relayed (a user error: a bad column, a bad
    config value), else 1 naming the first rank that died and how."""
    told = [f for f in e.failures.values() if isinstance(f.error_file_data, dict) and f.error_file_data.get("hyrank")]
    if told:
        for message in dict.fromkeys(f.message for f in told):
            log.error("%s", message)
        if logs := [f.error_file_data["log"] for f in told if f.error_file_data.get("log")]:
            print(f"(the full traceback is in {logs[0]})", file=sys.stderr)
        return 2
    rank, failure = e.get_first_failure()
    log.error("rank %d failed with exit code %d: %s (its output is above)", rank, failure.exitcode, failure.message)
    return 1
