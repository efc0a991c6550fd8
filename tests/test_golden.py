"""Golden run: a seeded 2-rank gloo training of a tiny HyFormer whose loss curve is stored in the repo.

Any refactor of the data path, embeddings, model, optimizers or the distributed wrappers that changes the
numbers fails here. When a change is *meant* to change them, regenerate and commit the curve with a reason:
    HYRANK_REGEN_GOLDEN=1 bash scripts/test.sh tests/test_golden.py
"""

import json
import os
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data.days import discover_days
from pipeline.distributed.env import env_of_current_group
from pipeline.data.synth import generate_logs
from pipeline.train.trainer import Trainer

from conftest import DEFAULT_CONFIG, small_synth
from dist import run_distributed

pytestmark = pytest.mark.dist

GOLDEN = Path(__file__).parent / "golden" / "hyformer_tiny_2ranks.json"
OVERRIDES = [
    "model.name=hyformer",
    "model.options={}",
    "data.batch_size_per_rank=64",
    "train.max_steps_per_day=40",
    "train.tensorboard=false",
    "features.sequences.0.max_len=32",
    "features.sequences.1.max_len=8",
    "features.sequences.2.max_len=8",
]


def _golden_run(rank, world_size, cfg):
    trainer = Trainer(cfg, env_of_current_group())
    stats = trainer.train_day(discover_days(cfg.data.root)[0])
    return stats.losses


def test_golden_loss_curve(tmp_path):
    root = tmp_path / "data"
    generate_logs(small_synth(num_days=1, rows_per_day=6000), root)
    cfg = load_config(DEFAULT_CONFIG, [f'data.root="{root}"', f'out_dir="{tmp_path / "run"}"', *OVERRIDES])
    losses, losses_rank1 = run_distributed(_golden_run, cfg, timeout_s=300)
    assert losses == losses_rank1
    if os.environ.get("HYRANK_REGEN_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"overrides": OVERRIDES, "losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["overrides"] == OVERRIDES, "the golden file was made with other settings: regenerate it"
    assert losses == golden["losses"], "loss curve differs from tests/golden (see the module docstring)"
