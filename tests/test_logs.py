"""Progress in a log: plain lines now and then, never tqdm's carriage-return updates piling up on one line."""

import logging

from hyrank.pipeline.logs import PlainProgress, progress


def test_a_log_gets_a_plain_line_every_five_percent(caplog):
    with caplog.at_level(logging.INFO, logger="hyrank.progress"):
        bar = PlainProgress(1000, "train 2026-11-01", "row")
        for _ in range(100):
            bar.update(10)
            bar.set_postfix(loss="0.4000")
        bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "hyrank.progress"]
    assert len(lines) == 20, lines  # 5%, 10%, ..., 100%: not one per update
    assert lines[-1].startswith("train 2026-11-01: 100% (1,000/1,000 rows)") and lines[-1].endswith("loss=0.4000")
    assert not any("\r" in line for line in lines)


def test_a_slow_day_says_something_every_minute_even_below_five_percent(caplog, monkeypatch):
    clock = iter([0.0, 61.0, 62.0, 200.0])
    monkeypatch.setattr("hyrank.pipeline.logs.time.monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="hyrank.progress"):
        bar = PlainProgress(1_000_000, "train", "row")  # start: 0 s
        bar.update(1)  # 61 s: a minute without a line
        bar.update(1)  # 62 s: too soon
        bar.close()  # 200 s: what is left
    assert len([r for r in caplog.records if r.name == "hyrank.progress"]) == 2


def test_without_a_terminal_the_bar_is_plain(capsys):
    bar = progress(10, "x", "row")  # pytest's stderr is not a terminal
    assert isinstance(bar, PlainProgress)
