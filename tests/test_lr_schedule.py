"""The dense LR schedule (pipeline/train/schedule.py): warm-up, then constant or a half cosine over a window."""

import math
from pathlib import Path

import pytest

from hyrank.pipeline.config import load_config
from hyrank.pipeline.train.schedule import lr_multiplier


def test_constant_is_one_after_a_linear_warm_up():
    assert [lr_multiplier(s, warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_multiplier(1000) == 1.0


def test_cosine_runs_from_one_to_the_floor_over_its_window_and_holds_there():
    window, floor = (100, 300), 0.05
    at = [lr_multiplier(s, min_ratio=floor, window=window) for s in (50, 100, 150, 200, 250, 300, 301, 10_000)]
    assert at[0] == 1.0 and at[1] == 1.0  # before and at the first step of the window
    assert at[3] == pytest.approx(floor + (1 - floor) / 2)  # half way
    assert at[2] == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert at[5] == at[6] == at[7] == pytest.approx(floor)
    assert all(a > b for a, b in zip(at[1:5], at[2:6]))  # strictly falling inside the window


def test_warm_up_and_cosine_multiply():
    assert lr_multiplier(0, warmup_steps=10, min_ratio=0.0, window=(0, 20)) == pytest.approx(0.1)
    assert lr_multiplier(10, warmup_steps=10, min_ratio=0.0, window=(0, 20)) == pytest.approx(0.5)


def test_config_refuses_a_floor_outside_zero_one(tmp_path):
    path = tmp_path / "run.toml"
    default = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "default.toml"
    path.write_text(f'extends = "{default.as_posix()}"\n[train]\nlr_schedule = "cosine"\nlr_min_ratio = 1.5\n')
    with pytest.raises(ValueError, match="lr_min_ratio"):
        load_config(path)
