"""`hyrank plan`: TorchRec's planner for a topology this machine does not have. A small GPU topology plans without
touching CUDA and accounts for every table; a plan that does not fit is one line naming the table and the way
out, and the way out works; the paper-scale config plans for 8x8 GPUs in seconds; and the plan's memory for 2 CPU
ranks is what 2 forked ranks hold after shard_model, tensor for tensor (the plan being the run's own).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_plan.py
"""

import logging
import time

import pytest
import torch

from hyrank.pipeline.cli import main
from hyrank.pipeline.config import load_config

from conftest import DEFAULT_CONFIG, ROOT
from dist import run_distributed

GiB = 1024**3
PAPER_SCALE = ROOT / "jobs" / "configs" / "paper_scale.toml"
# the shipped configs small enough to shard on this machine (paper_scale.toml holds 610 GiB of tables)
SMALL_CONFIGS = sorted(p for p in (ROOT / "jobs" / "configs").glob("*.toml") if p.name != "paper_scale.toml")


def _plan(config, *, overrides=(), **cluster):
    from hyrank.embeddings.planning import Cluster
    from hyrank.pipeline.train.cluster_plan import plan_run

    cfg = load_config(config, list(overrides))
    defaults = dict(hosts=1, gpus_per_host=2, hbm_bytes=80 * GiB, host_bytes=1024 * GiB)
    return plan_run(cfg, Cluster(**{**defaults, **cluster}), dense_tflops=300)


def test_a_small_gpu_topology_plans_every_table_without_touching_cuda(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("planning touched CUDA")

    import hyrank.pipeline.train.cluster_plan  # noqa: F401  (fbgemm asks torch.cuda.is_available at import)

    # a CUDA context starts in the lazy initialisation, which every device call goes through (on this CPU build
    # too); the device's memory is what a run would ask for, and a plan must not
    for name in ("_lazy_init", "current_device", "get_device_properties", "mem_get_info", "device_count"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    report = _plan(DEFAULT_CONFIG, hosts=2, gpus_per_host=2)
    s = report.sparse
    names = {t.name for t in load_config(DEFAULT_CONFIG).features.tables}
    assert {t.name for t in s.tables} == names and len(s.ranks) == 4
    assert not torch.cuda.is_initialized()
    # every byte of every table lands on some rank: a sharded table once, a data-parallel one on each rank
    expected = sum(t.table_bytes * (4 if t.sharding_type == "data_parallel" else 1) for t in s.tables)
    assert sum(r.hbm.tables for r in s.ranks) == expected
    assert all(r.host.tables == 0 for r in s.ranks)  # small tables: all in HBM, no UVM
    for t in s.tables:
        assert t.compute_kernel == ("dense" if t.sharding_type == "data_parallel" else "fused")
    # rowwise Adagrad: one float per row of every table
    assert sum(t.optimizer_bytes for t in s.tables) == 4 * sum(t.rows for t in s.tables)
    assert report.step_ms > 0 and s.critical_rank.planner_ms > 0
    assert report.dense.params > 0 and report.dense.compute_ms > 0


def test_plan_prints_tables_ranks_and_the_step(capsys):
    assert main(["plan", "--config", str(DEFAULT_CONFIG), "--hosts", "1", "--gpus-per-host", "2"]) == 0
    out = capsys.readouterr().out
    for line in ("default: 1 host(s) x 2 GPUs = 2 ranks", "item ", "sharding", "memory per rank, MiB",
                 "embedding lookup", "communication", "dense compute", "ids all-to-all", "dense allreduce"):
        assert line in out, line


@pytest.mark.parametrize("argv,names", [
    # the item table at 50M rows (3 GiB with its optimizer state) in 2 GPUs of 1 GiB, host memory too small for UVM
    (["--hbm-gb", "1", "--ddr-gb", "0.5", "--set", "features.tables.6.num_embeddings=50000000"],
     ["'item': 50,000,000 x 16", ">= 2 hosts", "more host memory", "'item' at dim 8"]),
    # the same, host memory enough but the table held to the fused kernel: UVM caching is the way out
    (["--hbm-gb", "1", "--ddr-gb", "8", "--set", "features.tables.6.num_embeddings=50000000",
      "--set", 'embeddings.sharding.item={compute_kernels=["fused"]}'],
     ["'item': 50,000,000 x 16", ">= 2 hosts", """embeddings.sharding.item={compute_kernels=["fused_uvm_caching"]}"""]),
    # one table held to table_wise that no single GPU holds
    (["--hbm-gb", "0.013", "--ddr-gb", "0.001", "--set", 'embeddings.sharding.item={sharding_types=["table_wise"]}'],
     ["table 'item' (100,000 x 16)", "may only sit whole on one", "allow row_wise or table_row_wise"]),
])
def test_a_plan_that_does_not_fit_is_one_line_naming_the_table_and_the_way_out(argv, names, caplog):
    with caplog.at_level(logging.ERROR):
        rc = main(["plan", "--config", str(DEFAULT_CONFIG), "--hosts", "1", "--gpus-per-host", "2", *argv])
    assert rc == 2
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]  # TorchRec's own are silenced
    message = record.getMessage()
    assert message.startswith("no sharding plan fits 1 host(s) x 2 GPUs") and "\n" not in message
    for name in names:
        assert name in message, message


def test_the_ways_out_the_message_names_fit():
    big = ["features.tables.6.num_embeddings=50000000"]
    small_gpus = dict(hbm_bytes=1 * GiB, host_bytes=8 * GiB)
    two_hosts = _plan(DEFAULT_CONFIG, overrides=big + ['embeddings.sharding.item={compute_kernels=["fused"]}'],
                      hosts=2, **small_gpus)
    assert {t.name: t.compute_kernel for t in two_hosts.sparse.tables}["item"] == "fused"
    cached = _plan(DEFAULT_CONFIG, overrides=big + ['embeddings.sharding.item={compute_kernels=["fused_uvm_caching"]}'],
                   **small_gpus)
    (item,) = [t for t in cached.sparse.tables if t.name == "item"]
    assert item.compute_kernel == "fused_uvm_caching" and item.cache_load_factor == pytest.approx(0.2)
    assert sum(r.host.tables for r in cached.sparse.ranks) == item.table_bytes  # all of it in host memory
    assert sum(r.hbm.cache for r in cached.sparse.ranks) == pytest.approx(0.2 * item.table_bytes, rel=1e-6)


def test_a_uvm_kernel_on_cpu_is_refused_naming_the_table():
    from hyrank.embeddings.sharding import check_constraints, make_sharders
    from hyrank.pipeline.train.cluster_plan import build_meta_model
    from hyrank.pipeline.train.model import table_constraints

    cpu = torch.device("cpu")
    cfg = load_config(DEFAULT_CONFIG, ['embeddings.sharding.item={compute_kernels=["fused_uvm_caching"]}'])
    model = build_meta_model(cfg, cpu)
    with pytest.raises(ValueError, match=r"embeddings.sharding\['item'\] allows only the kernels "
                                         r"\['fused_uvm_caching'\].*UVM kernels need CUDA"):
        check_constraints(model, make_sharders(cpu), table_constraints(cfg, model), cpu)


def test_ids_per_sample_follow_the_sequences():
    """The planner is told how many ids a sample looks up: a sequence column its max_len, a pooled feature 1, a
    deduplicated table the sum of its features'."""
    from hyrank.pipeline.train.cluster_plan import build_meta_model
    from hyrank.pipeline.train.model import table_constraints

    for dedup in (False, True):
        cfg = load_config(DEFAULT_CONFIG, [f"embeddings.dedup={str(dedup).lower()}"])
        c = table_constraints(cfg, build_meta_model(cfg, torch.device("cpu")))
        # item: item_id (1), long_item_ids (128), click_item_ids (50)
        assert c["item"].pooling_factors == ((179.0,) if dedup else (1.0, 128.0, 50.0))
        assert c["user"].pooling_factors == (1.0,)


def test_paper_scale_plans_for_8x8_gpus_in_seconds():
    start = time.perf_counter()
    report = _plan(PAPER_SCALE, hosts=8, gpus_per_host=8, hbm_bytes=80 * GiB, host_bytes=1024 * GiB)
    seconds = time.perf_counter() - start
    s = report.sparse
    assert sum(t.rows for t in s.tables) > 4_000_000_000
    assert len(s.ranks) == 64 and not torch.cuda.is_initialized()
    # what every rank's HBM holds stays under 80 GiB with the planner's reservations, the tower within 5% of the
    # paper's 418M parameters
    reserved = s.reserved_dense_bytes + s.reserved_input_bytes + s.reserved_margin_bytes
    assert max(r.hbm.planner for r in s.ranks) + reserved <= 80 * GiB
    assert abs(report.dense.params / 418e6 - 1) < 0.05
    # the activations of a batch of 2048 with 3000-event sequences are counted, and the plan says when they take
    # the busiest rank over its memory, which the planner alone does not
    from hyrank.pipeline.train.cluster_plan import format_plan

    busiest = max(r.hbm.tables + r.hbm.optimizer + r.hbm.io for r in s.ranks)
    over = busiest + report.dense.bytes_per_rank + report.dense.activation_bytes > 80 * GiB
    assert report.dense.activation_bytes > 10 * GiB
    assert ("over the cap: rank" in format_plan(report)) == over
    assert seconds < 120, f"{seconds:.0f} s"  # ~4 s on a quiet 2-core machine


# -- the plan against what 2 CPU ranks hold ------------------------------------------------------------------------


def _held(rank: int, world_size: int, config: str):
    from hyrank.models import build_model
    from hyrank.pipeline.distributed.dmp import held_bytes, shard_model
    from hyrank.pipeline.distributed.env import env_of_current_group
    from hyrank.pipeline.ranker import RankingModel
    from hyrank.pipeline.train.model import sharding_arguments

    cfg = load_config(config)
    tower = build_model(cfg.model.name, cfg.model.config, cfg.features.input_shape())
    model = RankingModel(cfg.features, tower, sparse_device=torch.device("meta"), dedup=cfg.embeddings.dedup,
                         init_scale=cfg.embeddings.init_scale, world_size=world_size)
    sharded = shard_model(model, env_of_current_group(), **sharding_arguments(cfg, model))
    return sharded.plan_dict, held_bytes(sharded)


@pytest.mark.dist
@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=lambda p: p.name)
def test_the_plan_for_2_cpu_ranks_is_the_runs_and_holds_what_it_predicts(config):
    """Tolerance: table weights exact; optimizer state within 1% (a data-parallel table's in-backward optimizer
    makes its state at the first step, which the planner counts and the state before a step does not hold)."""
    from hyrank.embeddings.sharding import plan_to_dict

    report = _plan(config, device="cpu", host_bytes=24 * GiB)
    results = run_distributed(_held, str(config), timeout_s=180, pg_timeout_s=60)
    for rank, (plan, held) in enumerate(results):
        assert plan == plan_to_dict(report.sparse.plan)
        predicted = report.sparse.ranks[rank].host
        assert held.tables == predicted.tables
        assert held.optimizer == pytest.approx(predicted.optimizer, rel=0.01)
        assert held.dense == pytest.approx(report.dense.params * 4, rel=0.01)  # fp32 weights (+ a few buffers)
        assert held.remap == report.remap_bytes  # managed tables' id remaps (drift.toml), 0 elsewhere


def test_a_run_that_does_not_fit_fails_with_the_same_one_line():
    """shard_model's planning (plan_sharding) translates the planner's error as `hyrank plan` does."""
    from hyrank.embeddings.sharding import make_sharders, plan_sharding
    from hyrank.pipeline.train.cluster_plan import build_meta_model
    from hyrank.pipeline.train.model import table_constraints

    cpu = torch.device("cpu")
    cfg = load_config(DEFAULT_CONFIG, ["features.tables.6.num_embeddings=50000000"])
    model = build_meta_model(cfg, cpu)
    with pytest.raises(ValueError) as e:
        plan_sharding(model, sharders=make_sharders(cpu), world_size=2, local_world_size=2, device=cpu,
                      batch_size_per_rank=128, constraints=table_constraints(cfg, model), host_bytes=GiB)
    assert str(e.value).startswith("no sharding plan fits 1 host(s) x 2 ranks: the tables need 3.2 GiB of memory")
    assert "'item': 50,000,000 x 16" in str(e.value) and "\n" not in str(e.value)


def test_a_run_plans_for_the_memory_of_its_machine():
    import os

    from hyrank.pipeline.distributed.dmp import rank_memory
    from hyrank.pipeline.distributed.env import DistEnv

    memory = rank_memory(DistEnv(rank=0, world_size=2, local_rank=0, local_world_size=2, device=torch.device("cpu")))
    assert memory == {"host_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2}
