"""The command line: help that teaches, gen-logs end to end, user errors as one clear line."""

import pytest

from pipeline.cli import main


def test_help_lists_the_verbs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for verb in ("gen-logs", "train"):
        assert verb in out
    assert "--set" in out


@pytest.mark.parametrize("verb", ["gen-logs", "train"])
def test_each_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    assert "usage: hyrank " + verb in capsys.readouterr().out


def test_gen_logs_writes_days(tmp_path, capsys):
    rc = main(["gen-logs", "--out", str(tmp_path), "--days", "2", "--rows-per-day", "500", "--long-len", "20..30",
               "--short-len", "5", "--quiet"])
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["day=2026-11-01", "day=2026-11-02"]
    assert "oracle AUC" in capsys.readouterr().out


def test_bad_config_is_one_line_error(tmp_path, caplog):
    rc = main(["train", "--config", str(tmp_path / "missing.toml"), "--days", "2026-11-01"])
    assert rc == 2
    assert "config file not found" in caplog.text
