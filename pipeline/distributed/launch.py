"""Run a function on N local gloo ranks forked from this process: tests and benchmarks.

    results = run_local(fn, arg1, world_size=2)     # fn(rank, world_size, arg1) on each rank, results in rank order

Fork costs ~0.1 s against ~4 s to spawn, and it is safe while the parent has started no OpenMP pool and no
process group (set OMP_NUM_THREADS=1 before torch loads; do no torch compute in the parent first). Ranks that use
CUDA need `start_method="spawn"` (a forked child cannot initialise CUDA once the parent has touched it), and
`backend="nccl"` needs a GPU per rank. Each rank's
return value comes back pickled; an exception in any rank raises with that rank's traceback, and a rank that
hangs (e.g. in a collective another rank never reached) is killed after `timeout_s`.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import os
import pickle
import queue as queue_lib
import tempfile
import time
import traceback
from typing import Any, Callable


def _worker(fn, rank, world_size, init_file, pg_timeout_s, backend, args, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    try:
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=dt.timedelta(seconds=pg_timeout_s))
        result = fn(rank, world_size, *args)
        dist.destroy_process_group()
        # plain pickle to bytes: the queue's own pickler would share tensors through fds that die with the rank
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        queue.put((rank, False, traceback.format_exc()))


def run_local(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout_s: float = 300,
              pg_timeout_s: int = 60, backend: str = "gloo", start_method: str = "fork") -> list[Any]:
    """fn(rank, world_size, *args) on every rank; returns the results in rank order."""
    ctx = mp.get_context(start_method)
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg_init")
        procs = [ctx.Process(target=_worker,
                             args=(fn, r, world_size, init_file, pg_timeout_s, backend, args, queue))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        try:
            deadline = time.monotonic() + timeout_s
            while len(results) < world_size:
                try:
                    rank, ok, value = queue.get(timeout=1.0)
                except queue_lib.Empty:
                    dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)]
                    if dead:  # died outside _worker's try (e.g. a spawned child that could not import fn)
                        raise RuntimeError(f"rank(s) {dead} exited with code(s) "
                                           f"{[procs[r].exitcode for r in dead]} without a result") from None
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no result from all {world_size} ranks within {timeout_s} s") from None
                    continue
                if not ok:
                    raise RuntimeError(f"rank {rank} failed:\n{value}")
                results[rank] = pickle.loads(value)
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
    return [results[r] for r in range(world_size)]
