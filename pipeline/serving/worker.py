"""The model process of the scoring server: one exported program, scoring the batches the HTTP process sends it.

    model = ModelProcess.start(Path("exports/default/versions/step-1"))   # blocks until loaded (ModelLoadError)
    model = ModelProcess.start(path, nice=19)    # a reload beside a serving model: loads at the lowest priority
    outcomes = model.score([table_a, table_b])   # one Outcome per request table (RowSchema tables), in order
    model.close()                                # after its last batch; the process exits

    outcomes = LocalModel(Artifact.load(path)).score([table_a, table_b])   # the same, in this process (tests, bench)

Why a process, not a thread of the server: the exported program is a Python graph of ~500 torch calls, and each
gives the GIL away for its kernel and takes it back. Beside any other busy Python thread of the same process (the
event loop parsing HTTP and JSON; a loader deserializing a new version, ~1 s of pure Python in torch.export.load),
each take-back waits up to sys.getswitchinterval() (5 ms): a 256-row call of the demo's program took 8 ms alone and
60 ms beside one busy Python thread (2 cores). In a process of its own the program never waits for the GIL, the HTTP
process decodes requests on the other core meanwhile, and a new version loads in a new process, in a thread of
the lowest CPU priority (`nice`: the server's --reload-nice, 19 by default): it takes the CPU the serving processes
leave. Measured on 2 cores busy with other work (load 4-5; Arrow, 8 clients x 16 rows, p99 of the requests sent
while it loaded): 51-68 ms at nice 19, 108-147 ms at nice 10, 96-140 ms at nice 0 (34-91 ms before the publish);
the load then took 16-29 s, against 7-14 s. The process is warmed up (program calls on rows made from the schema)
before it says it is ready, so the first batches after a swap do not pay the program's slow first calls.

In the model process a batch is scored as the old model thread scored it (`score_requests`): one validation pass
over the whole batch (the training reader's checks), each problem given to its own request in its own row
numbers, the good requests scored in one program call, each given its slice; should that call fail, each good
request is scored alone, so one request the model cannot score fails nobody else's.

Protocol, multiprocessing.connection over a socketpair (the child is `python -m hyrank.pipeline.serving.worker FD
PATH NICE`): the child sends ("ready", manifest, seconds) or ("failed", why) once; then for each batch the
parent sends ("score", rows per request) and the batch as an Arrow IPC stream, the child answers ("scored",
outcomes); end of file on either side ends the other (a parent that dies takes its model processes with it).
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the model process imports them in its loading thread, at the loading's priority (main)
    import numpy as np
    import pyarrow as pa

log = logging.getLogger(__name__)
LOAD_TIMEOUT_S = 600.0  # a load at a low priority on a machine busy with other work can take minutes
SCORE_TIMEOUT_S = 120.0  # a batch of the largest size takes well under a second: longer means the process hangs


@dataclass
class Outcome:
    """What one request gets back: probabilities and the version that scored them, or why not."""

    probabilities: np.ndarray | None = None  # float32, one per row
    version: str | None = None
    problems: list[str] = field(default_factory=list)  # the request's own fault (HTTP 400)
    error: str | None = None  # the server's fault (HTTP 500), or no model to score with (503)
    unavailable: bool = False
    # a model of managed tables: per table, the request's ids looked up and those without a slot (the fallback row)
    managed_ids: dict[str, int] = field(default_factory=dict)
    unknown_ids: dict[str, int] = field(default_factory=dict)


class ModelLoadError(RuntimeError):
    """A model process could not load its version (damaged files, a program torch cannot read)."""


class ModelGone(RuntimeError):
    """The model process exited (or stopped answering) while it had a batch."""


class ModelRetired(ModelGone):
    """The model was closed (replaced by a reload) after the batch was handed to it: score it with the new one."""


def batch_table(tables: list[pa.Table]) -> pa.Table:
    """The requests' tables as one table of one chunk: validation and the converter read each column as one array
    (a column of many chunks would be put together by each of them)."""
    import pyarrow as pa

    return pa.concat_tables(tables).combine_chunks() if len(tables) > 1 else tables[0].combine_chunks()


def score_requests(artifact, table: pa.Table, sizes: list[int]) -> list[Outcome]:
    """The outcome of each request, whose rows are `sizes[k]` consecutive rows of `table` (batch_table): one
    validation pass over all the rows, one program call for the good requests, each bad request's problems in its
    own row numbers (see the module docstring)."""
    import numpy as np
    import pyarrow as pa

    from hyrank.pipeline.serving.rows import explain

    starts = np.cumsum([0] + list(sizes))
    verdict = artifact.rows.verdict(table)
    outcomes = [Outcome() for _ in sizes]
    if verdict.num_bad:
        for r, why in explain(verdict).items():
            k = int(np.searchsorted(starts, r, side="right")) - 1
            outcomes[k].problems.append(f"row {r - starts[k]}: {why}")
    good = [k for k, o in enumerate(outcomes) if not o.problems]
    if not good:
        return outcomes
    if len(good) < len(sizes):
        keep = np.zeros(table.num_rows, dtype=bool)
        for k in good:
            keep[starts[k]:starts[k + 1]] = True
        table = table.filter(pa.array(keep))
    try:
        out = artifact.valid_outputs(table, id_max=verdict.id_max)
    except Exception:  # noqa: BLE001 - find the request the model cannot score: each alone
        log.exception("a batch of %d requests failed; scoring each alone", len(good))
        start = 0
        for k in good:
            try:
                outcomes[k] = _outcome(artifact, artifact.valid_outputs(table.slice(start, sizes[k])), 0, sizes[k])
            except Exception as e:  # noqa: BLE001
                outcomes[k] = Outcome(error=f"{type(e).__name__}: {e}")
            start += sizes[k]
        return outcomes
    start = 0
    for k in good:
        outcomes[k] = _outcome(artifact, out, start, start + sizes[k])
        start += sizes[k]
    return outcomes


def _outcome(artifact, out, start: int, stop: int) -> Outcome:
    """The outcome of rows start:stop of a program call's outputs (Artifact.valid_outputs)."""
    import torch

    outcome = Outcome(torch.sigmoid(out.logits[start:stop]).numpy(), artifact.version)
    if out.unknown_ids is not None:
        tables = artifact.managed_tables
        outcome.managed_ids = dict(zip(tables, out.managed_ids[start:stop].sum(0).tolist()))
        outcome.unknown_ids = dict(zip(tables, out.unknown_ids[start:stop].sum(0).tolist()))
    return outcome


class LocalModel:
    """An artifact scoring in this process, behind the interface of ModelProcess (tests, the benchmark)."""

    def __init__(self, artifact):
        self.artifact, self.rows, self.version = artifact, artifact.rows, artifact.version

    def score(self, tables: list[pa.Table]) -> list[Outcome]:
        return score_requests(self.artifact, batch_table(tables), [t.num_rows for t in tables])


class ModelProcess:
    """A model process (see the module docstring): start, score batches from one thread at a time, close."""

    def __init__(self, process: subprocess.Popen, conn: Connection, manifest: dict[str, Any], path: Path):
        from hyrank.pipeline.serving.rows import RowSchema

        self.process, self.conn, self.manifest, self.path = process, conn, manifest, path
        self.version: str = manifest["version"]
        self.rows = RowSchema.of(manifest, source=str(path))
        self._lock = threading.Lock()  # one batch at a time; close waits for the one in flight
        self._closed = False

    @classmethod
    def start(cls, path: Path, *, nice: int = 0, threads: int = 1, timeout_s: float = LOAD_TIMEOUT_S) -> ModelProcess:
        """A model process serving the version folder `path`, once it has loaded and warmed up; ModelLoadError
        (with the child's reason) if it cannot. `nice`: the CPU priority of the loading (0: as the server's; more:
        lower, for a reload beside a serving model); scoring afterwards runs at the server's. `threads`: torch's
        CPU threads for the program (OMP_NUM_THREADS)."""
        ours, theirs = socket.socketpair()
        argv = [sys.executable, "-m", "hyrank.pipeline.serving.worker", str(theirs.fileno()), str(path),
                str(nice)]
        try:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            process = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        try:
            message = conn.recv() if conn.poll(timeout_s) else ("failed", f"{path}: the model process did not load "
                                                                          f"it in {timeout_s:.0f} s")
        except (EOFError, OSError) as e:
            try:
                process.wait(5)  # for its exit code, in the message
            except subprocess.TimeoutExpired:
                pass
            message = ("failed", f"the model process exited ({_exit_status(process)}) before it had loaded {path}: "
                                 f"{e or type(e).__name__}")
        if message[0] != "ready":
            _stop(process, conn)
            raise ModelLoadError(message[1])
        model = cls(process, conn, message[1], path)
        log.info("model process %d loaded %s in %.1f s", process.pid, model.version, message[2])
        return model

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def score(self, tables: list[pa.Table]) -> list[Outcome]:
        """Each request table's outcome, scored in the model process; ModelGone if it is not there to answer."""
        import pyarrow as pa

        table = batch_table(tables)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        with self._lock:
            if self._closed:  # the model thread read this model just before a reload swapped it out
                raise ModelRetired(f"{self.version} was replaced")
            try:
                self.conn.send(("score", [t.num_rows for t in tables]))
                self.conn.send_bytes(sink.getvalue())
                if not self.conn.poll(SCORE_TIMEOUT_S):
                    self.process.kill()
                    raise ModelGone(f"the model process {self.process.pid} did not answer in {SCORE_TIMEOUT_S:.0f} "
                                    "s; killed")
                _, outcomes = self.conn.recv()
            except (EOFError, OSError) as e:
                raise ModelGone(f"the model process {self.process.pid} exited ({_exit_status(self.process)}): "
                                f"{e or type(e).__name__}") from e
        return outcomes

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the process once the batch in flight (if any) has its answer."""
        with self._lock:
            self._closed = True
            _stop(self.process, self.conn, timeout_s)


def _stop(process: subprocess.Popen, conn: Connection, timeout_s: float = 30.0) -> None:
    conn.close()  # the child reads end of file and exits
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _exit_status(process: subprocess.Popen) -> str:
    code = process.poll()
    return "still running" if code is None else f"exit code {code}"


# -- the child -----------------------------------------------------------------------------------------------------


def _load(path: str, nice: int, out: dict) -> None:
    """In the child's loading thread: import the stack (torch, torchrec: seconds of CPU), load the artifact and warm
    it up, at `nice` more than the process's (Linux gives each thread its own nice value: the main thread, which
    scores afterwards, keeps the process's own)."""
    try:
        if nice:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
        from hyrank.pipeline.serving.artifact import Artifact

        out["artifact"] = artifact = Artifact.load(path)
    except BaseException as e:  # noqa: BLE001 - the parent logs it and keeps serving what it serves
        out["error"] = f"could not load {path}: {type(e).__name__}: {e}"
        return
    try:
        warm_up(artifact)
    except Exception:  # noqa: BLE001 - rows made up from the schema may be ones a spec refuses: serve all the same
        log.warning("%s: the warm-up calls failed; its first requests will be slower", artifact.version,
                    exc_info=True)
    # Importing and loading leave ~400k objects to the garbage collector, whose next full pass (0.46 s here) would
    # stop the first batches after the swap: collect now, at the loading's priority, and keep them out of every
    # later pass (nothing of them is freed while the model serves anyway)
    gc.collect()
    gc.freeze()


def warm_up(artifact, sizes: tuple[int, ...] = (16, 64, 256, 64, 16)) -> None:
    """Program calls on rows made from the schema (ids 0, sequences of their full length, dense zeros): the first
    calls of a program in a fresh process are several times slower than the next ones (36, 8, 7, 3 ms, then 2.7 ms
    for 64 rows of the demo's model: lazy kernel and allocator set-up), and would be paid by the first requests
    after a swap. Raises what the program raises (the caller logs it and serves all the same)."""
    import pyarrow as pa

    lengths = {column: s.max_len for s in artifact.spec.sequences for column in s.columns}

    def value(t: pa.DataType, length: int):
        if pa.types.is_fixed_size_list(t):
            return [value(t.value_type, 1)] * t.list_size
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return [value(t.value_type, 1)] * length
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return "0"
        return 0.0 if pa.types.is_floating(t) else 0

    row = {name: value(artifact.schema.field(name).type, lengths.get(name, 4)) for name in artifact.features}
    for n in sizes:
        artifact.score_valid(artifact.table_of([row] * n))


def main(argv: list[str]) -> int:
    fd, path, nice = int(argv[0]), argv[1], int(argv[2])
    conn = Connection(fd)
    from hyrank.pipeline.logs import setup_logging

    setup_logging(verbose=False)
    start = time.perf_counter()
    loaded: dict[str, Any] = {}
    loader = threading.Thread(target=_load, args=(path, nice, loaded), name="hyrank-load")
    loader.start()
    loader.join()
    if "error" in loaded:
        conn.send(("failed", loaded["error"]))
        return 1
    artifact = loaded["artifact"]
    import pyarrow as pa

    conn.send(("ready", artifact.manifest, time.perf_counter() - start))
    while True:
        try:
            kind, sizes = conn.recv()
            table = pa.ipc.open_stream(conn.recv_bytes()).read_all()
        except (EOFError, OSError):  # the parent closed the connection (a reload retired us) or died
            # at once, without the interpreter's teardown of torch and its ~400k objects (a second of CPU on a
            # core the new model process is starting to serve on): nothing of ours is left to flush but logs
            logging.shutdown()
            os._exit(0)
        try:
            outcomes = score_requests(artifact, table, sizes)
        except Exception as e:  # noqa: BLE001 - a bug of ours: every request of the batch gets a 500
            log.exception("scoring a batch of %d requests failed", len(sizes))
            outcomes = [Outcome(error=f"{type(e).__name__}: {e}") for _ in sizes]
        conn.send(("scored", outcomes))


if __name__ == "__main__":  # run from the module's own name, so that Outcome pickles as the parent imports it
    from hyrank.pipeline.serving.worker import main as _main

    sys.exit(_main(sys.argv[1:]))
