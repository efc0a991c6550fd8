"""run_local: the fork/spawn launcher of the 2-rank tests and benchmarks."""

import os
import time

import pytest

from hyrank.pipeline.distributed.local import run_local


def _rank_and_size(rank, world_size, tag):
    return rank, world_size, tag


def _rank_1_dies(rank, world_size):
    if rank == 1:
        os._exit(3)  # no exception, no result: what a segfault or an OOM kill looks like from the parent
    return rank


def _rank_1_raises(rank, world_size):
    if rank == 1:
        raise ValueError("bad shard")
    return rank


def test_results_come_back_in_rank_order():
    assert run_local(_rank_and_size, "x") == [(0, 2, "x"), (1, 2, "x")]


def test_a_rank_that_dies_fails_fast_not_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] exited with code\(s\) \[3\]"):
        run_local(_rank_1_dies, timeout_s=120)
    assert time.monotonic() - start < 30


def test_a_rank_that_raises_is_named_with_its_traceback_not_the_peer_it_left_waiting():
    # rank 0 waits in run_local's closing barrier for rank 1, which raised: the error names rank 1's exception
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 failed:.*ValueError: bad shard"):
        run_local(_rank_1_raises, timeout_s=120)


def test_many_fast_runs_never_race_on_teardown():
    # fn returns at once: without the barrier before destroy_process_group, one rank could close its sockets
    # while the other was still inside gloo's connectFullMesh ("Connection closed by peer" on a loaded machine)
    for i in range(10):
        assert run_local(_rank_and_size, i) == [(0, 2, i), (1, 2, i)]
