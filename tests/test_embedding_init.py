"""embeddings.init_scale: new tables start uniform in +-init_scale whatever their size, on sharded tables too;
0 keeps TorchRec's +-sqrt(1 / num_embeddings)."""

import math

import pytest

from hyrank.pipeline.data.synth import generate_logs
from hyrank.pipeline.distributed.env import env_of_current_group

from conftest import small_synth, tiny_cfg
from dist import run_distributed

pytestmark = pytest.mark.dist


def _table_ranges(rank, world_size, cfg):
    from hyrank.pipeline.train.trainer import Trainer

    trainer = Trainer(cfg, env_of_current_group())
    out = {}
    for name, value in trainer.model.state_dict().items():
        if name.endswith(".weight") and ("ebc." in name or ".ec." in name):
            local = value.local_shards()[0].tensor if hasattr(value, "local_shards") else value
            out[name.split(".")[-2]] = (float(local.abs().max()), float(local.std()), local.numel())
    return out


def test_tables_start_in_the_configured_range(tmp_path):
    generate_logs(small_synth(num_days=1, rows_per_day=200), tmp_path / "data")
    sizes = {t.name: t.num_embeddings for t in tiny_cfg(tmp_path / "data", tmp_path / "r").features.tables}
    for scale in (0.0, 0.05):
        cfg = tiny_cfg(tmp_path / "data", tmp_path / f"run-{scale}", f"embeddings.init_scale={scale}")
        ranges, _ = run_distributed(_table_ranges, cfg, world_size=2, timeout_s=300)
        assert set(ranges) == set(sizes)
        for table, (top, std, n) in ranges.items():
            bound = scale or math.sqrt(1 / sizes[table])
            assert top <= bound * (1 + 1e-6), (scale, table, top)
            if n >= 10_000:  # uniform on +-bound: std bound / sqrt(3)
                assert std == pytest.approx(bound / math.sqrt(3), rel=0.05), (scale, table)
