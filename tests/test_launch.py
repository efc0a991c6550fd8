"""run_local: the fork/spawn launcher of the 2-rank tests and benchmarks."""

import os
import time
from pathlib import Path

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


@pytest.mark.parametrize("hint,expected", [("and --resume latest", "the same command and --resume latest\n"),
                                           ("", "the same command\n")])
def test_the_stop_message_says_how_to_continue_for_each_verb(tmp_path, capsys, hint, expected):
    """train continues with --resume latest; stream, which always resumes and refuses --resume, with the same
    command alone (cli/run.py gives each verb's Launcher its hint)."""
    import json

    from hyrank.pipeline.distributed.launch import Launcher

    (tmp_path / "stopped.json").write_text(json.dumps({"step": 7, "checkpoint": "runs/x/checkpoints/step-7"}))
    assert Launcher(2, None, tmp_path, hint)._report_stop("SIGTERM", since=0) == 0
    out = capsys.readouterr().out
    assert out.startswith("stopped by SIGTERM at step 7: checkpoint runs/x/checkpoints/step-7; continue with")
    assert out.endswith(expected)


def test_stream_gives_no_resume_hint_and_train_does():
    source = (Path(__file__).parents[1] / "pipeline" / "cli" / "run.py").read_text()
    stream = source[source.index("def _stream("):source.index("def add_evaluate(")]
    train = source[source.index("def _train("):source.index("def _training_days(")]
    assert "resume_hint" not in stream and 'resume_hint="and --resume latest"' in train
