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
    _fresh_compile_pool()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    try:
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=dt.timedelta(seconds=pg_timeout_s))
        result = fn(rank, world_size, *args)
        # no rank tears its sockets down while another is still connecting or in its last collective: without
        # this, a fast fn lets rank 0 destroy its group while rank 1 is inside gloo's connectFullMesh
        dist.barrier()
        dist.destroy_process_group()
        # plain pickle to bytes: the queue's own pickler would share tensors through fds that die with the rank
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        queue.put((rank, False, traceback.format_exc()))


def _fresh_compile_pool() -> None:
    """Forget inductor's compile thread pool inherited from the parent: a fork copies the pool but not its threads,
    so the first torch.compile in a rank would wait forever on a future nothing runs (torch's own at-fork hook
    resets only its process pool). Matters once the parent has compiled anything (a test before)."""
    import sys

    if "torch._inductor.async_compile" in sys.modules:
        sys.modules["torch._inductor.async_compile"].AsyncCompile.pool.cache_clear()


_DEATH_GRACE_S = 2.0  # how long a rank's error waits for another rank's death to show in its exit code


def _raise_if_dead(procs, results: dict, also: str = "") -> None:
    """Raise if a rank exited non-zero without a result: it died outside _worker's try (a segfault, an OOM kill,
    os._exit, a spawned child that could not import fn)."""
    dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)]
    if dead:
        raise RuntimeError(f"rank(s) {dead} exited with code(s) {[procs[r].exitcode for r in dead]} without a result"
                           + (f"; then {also}" if also else "")) from None


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
                    _raise_if_dead(procs, results)
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no result from all {world_size} ranks within {timeout_s} s") from None
                    continue
                if not ok:
                    # a rank that died (no exception, no result) makes its peers' collectives fail too: name the
                    # dead rank, the cause, rather than the first survivor whose barrier noticed it
                    for p in procs:
                        p.join(timeout=_DEATH_GRACE_S / world_size)
                    _raise_if_dead(procs, results, also=f"rank {rank} failed:\n{value}")
                    raise RuntimeError(f"rank {rank} failed:\n{value}")
                results[rank] = pickle.loads(value)
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
    return [results[r] for r in range(world_size)]
