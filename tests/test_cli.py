"""The command line: help that teaches, gen-logs end to end, user errors as one clear line."""

import pytest

from hyrank.pipeline.cli import main


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


def _hyrank_train(synth_root, out_dir, *args, env_extra=None):
    import os
    import subprocess
    import sys

    from conftest import DEFAULT_CONFIG

    cmd = [sys.executable, "-m", "hyrank.pipeline.cli", "train", "--config", str(DEFAULT_CONFIG), "--quiet",
           "--set", f'data.root="{synth_root}"', "--set", f'out_dir="{out_dir}"', "--set", "train.max_steps_per_day=3",
           "--set", "train.tensorboard=false", "--set", "data.batch_size_per_rank=64", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_train_resumes_from_the_latest_checkpoint(synth_root, tmp_path):
    first = _hyrank_train(synth_root, tmp_path, "--days", "2026-11-01..2026-11-02")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "train 2026-11-01" in first.stdout and "train 2026-11-02" in first.stdout
    assert f"checkpoint: {tmp_path / 'checkpoints' / 'step-000000006'}" in first.stdout
    again = _hyrank_train(synth_root, tmp_path, "--days", "2026-11-01..2026-11-03", "--resume", "latest")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "train 2026-11-01" not in again.stdout and "train 2026-11-02" not in again.stdout
    assert "train 2026-11-03: 3 steps" in again.stdout
    assert "step-000000009" in again.stdout
    # a torchelastic restart of the same command resumes by itself: everything is done, nothing is retrained
    restarted = _hyrank_train(synth_root, tmp_path, "--days", "2026-11-01..2026-11-03",
                              env_extra={"TORCHELASTIC_RESTART_COUNT": "1"})
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert "train 2026-11-0" not in restarted.stdout and "step-000000009" in restarted.stdout
    missing = _hyrank_train(synth_root, tmp_path, "--days", "2026-11-03", "--resume", str(tmp_path / "nope"),
                            "--trust-checkpoint")
    assert missing.returncode != 0 and "not a complete checkpoint" in missing.stderr


def test_help_imports_no_torch_and_no_benchmark():
    """`hyrank --help` and `hyrank bench --help` build every verb's parser: none of them may load torch or a
    benchmark (a rank runs the same parser, and a user waits on it), only the verb that runs imports its code."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from hyrank.pipeline.cli import main\n"
            "for argv in (['--help'], ['bench', '--help']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "loaded = {m if m.startswith('hyrank.bench.') else m.split('.')[0] for m in sys.modules}\n"
            "heavy = {'torch', 'torchrec', 'fbgemm_gpu'}\n"
            "print(sorted(m for m in loaded if m in heavy or m.startswith('hyrank.bench.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "[]"


def test_bench_help_lists_the_benchmarks_own_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "reader", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: hyrank bench reader")
    assert "DayReader rows/s" in out  # its one-line description
    assert "--long-len LONG_LEN" in out and "(default: 1000)" in out  # its own options, with their defaults


def test_bench_rejects_an_unknown_option_by_name(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "reader", "--rows", "10", "--no-such-option"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: hyrank bench reader" in err and "unrecognized arguments: --no-such-option" in err
