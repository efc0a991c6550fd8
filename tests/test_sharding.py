"""Sharded lookups on 2 gloo ranks equal the unsharded module, before and after one fused SGD step.

For each sharding type TorchRec runs on CPU (EBC: table/column/row/table-row-wise, the row-wise ones through
our sharder override; EC: table/row/column-wise) the same full weights are loaded into an unsharded module and
into the DMP-sharded one, each rank looks up its own local batch, and then both take one SGD step on
mean_r <out_r, w_r>: the sharded table with the fused (in-backward) SGD, the reference by hand. Each rank checks
its local shards against the matching slice of the reference table.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist import run_distributed

pytestmark = pytest.mark.dist

NUM_ROWS, DIM, LR, B = 40, 16, 0.5, 4
TABLES = ("t0", "t1")


def _kjt(rank: int):
    from torchrec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(100 + rank)
    lengths = torch.randint(0, 4, (len(TABLES) * B,), generator=g)
    lengths[0] = 0  # an empty row
    values = torch.randint(0, NUM_ROWS, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor(keys=[f"f_{t}" for t in TABLES], values=values, lengths=lengths)


def _full_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {t: torch.randn(NUM_ROWS, DIM, generator=g) for t in TABLES}


class _Wrap(nn.Module):
    def __init__(self, emb: nn.Module):
        super().__init__()
        self.emb = emb

    def forward(self, kjt):
        return self.emb(kjt)


def _build(kind: str, device: torch.device) -> nn.Module:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig

    if kind == "ebc":
        cfgs = [EmbeddingBagConfig(name=t, num_embeddings=NUM_ROWS, embedding_dim=DIM, feature_names=[f"f_{t}"])
                for t in TABLES]
        return _Wrap(EmbeddingBagCollection(tables=cfgs, device=device))
    cfgs = [EmbeddingConfig(name=t, num_embeddings=NUM_ROWS, embedding_dim=DIM, feature_names=[f"f_{t}"])
            for t in TABLES]
    return _Wrap(EmbeddingCollection(tables=cfgs, device=device))


def _outputs(kind: str, out) -> torch.Tensor:
    """One (rows, width) tensor per call, so both module kinds compare and train the same way."""
    if kind == "ebc":
        return out.values()  # (B, T*D) pooled
    return torch.cat([out[f"f_{t}"].values() for t in TABLES])  # (N, D) per event


def _param_name(kind: str, table: str) -> str:
    return f"emb.{'embedding_bags' if kind == 'ebc' else 'embeddings'}.{table}.weight"


def _shard(kind: str, sharding_type: str, world_size: int):
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv

    from hyrank.embeddings.sharding import (SparseOptimizer, TableConstraint, apply_sparse_optimizer, make_sharders,
                                     plan_sharding, plan_to_dict)

    cpu = torch.device("cpu")
    model = _build(kind, torch.device("meta"))
    apply_sparse_optimizer(model, SparseOptimizer("sgd", lr=LR), cpu)
    sharders = make_sharders(cpu)
    constraints = {t: TableConstraint([sharding_type], ["fused"], min_partition=DIM // 2) for t in TABLES}
    plan = plan_sharding(model, sharders=sharders, world_size=world_size, local_world_size=world_size,
                         device=cpu, batch_size_per_rank=B, constraints=constraints, group=dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   device=cpu, plan=plan, sharders=sharders, init_data_parallel=False)
    # DMP re-initialises EBC weights: load the full tables, TorchRec slices them into the local shards.
    dmp.load_state_dict({_param_name(kind, t): w for t, w in _full_weights().items()})
    return dmp, plan_to_dict(plan)


def _sharded_vs_reference(rank: int, world_size: int, kind: str, sharding_type: str) -> dict:
    dmp, plan_dict = _shard(kind, sharding_type, world_size)
    ref = _build(kind, torch.device("cpu"))
    ref.load_state_dict({_param_name(kind, t): w for t, w in _full_weights().items()})

    kjts = [_kjt(r) for r in range(world_size)]
    got = _outputs(kind, dmp(kjts[rank]))
    want = _outputs(kind, ref.emb(kjts[rank]))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

    # One step on loss_r = <out_r, w_r>. TorchRec divides embedding gradients by the world size in the backward
    # all-to-all (gradient_division, DDP's semantics), so the fused SGD applies the gradient of the rank mean.
    ref_outs = [_outputs(kind, ref.emb(kjts[r])) for r in range(world_size)]
    weights_of = [torch.randn(o.shape, generator=torch.Generator().manual_seed(7 + r)) for r, o in enumerate(ref_outs)]
    (got * weights_of[rank]).sum().backward()
    ref_loss = sum((o * w).sum() for o, w in zip(ref_outs, weights_of)) / world_size
    ref_loss.backward()
    checked = 0
    with torch.no_grad():
        for t in TABLES:
            p = dict(ref.named_parameters())[_param_name(kind, t)]
            expected = p - LR * p.grad
            checked += _check_local_shards(dmp.state_dict()[_param_name(kind, t)], expected, t)
    return {"plan": plan_dict, "checked_rows": checked}


def _check_local_shards(sharded, expected: torch.Tensor, table: str) -> int:
    """Compare each local shard with its slice of `expected`; returns the number of rows compared."""
    rows = 0
    for shard in sharded.local_shards():
        (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        torch.testing.assert_close(shard.tensor, expected[r0:r0 + nr, c0:c0 + nc], rtol=0, atol=1e-6,
                                   msg=lambda m: f"table {table} shard at ({r0},{c0}): {m}")
        rows += nr
    return rows


CASES = [("ebc", "table_wise"), ("ebc", "column_wise"), ("ebc", "row_wise"), ("ebc", "table_row_wise"),
         ("ec", "table_wise"), ("ec", "row_wise"), ("ec", "column_wise")]


@pytest.mark.parametrize("kind,sharding_type", CASES)
def test_sharded_lookup_and_sgd_step_match_unsharded(kind, sharding_type):
    results = run_distributed(_sharded_vs_reference, kind, sharding_type, timeout_s=120, pg_timeout_s=30)
    plan = results[0]["plan"]
    assert plan == results[1]["plan"]  # collective plan: every rank holds rank 0's
    for t in TABLES:
        assert plan["emb"][t]["sharding_type"] == sharding_type
        assert plan["emb"][t]["compute_kernel"] == "fused"
    # every table row (or row slice, for column-wise) was checked on some rank
    total = sum(r["checked_rows"] for r in results)
    shards_per_table = max(len(plan["emb"][t]["shards"]) for t in TABLES)
    assert total >= len(TABLES) * NUM_ROWS * (shards_per_table if sharding_type == "column_wise" else 1)
    if sharding_type != "table_wise":
        assert all(len(plan["emb"][t]["shards"]) == 2 for t in TABLES)  # really split across both ranks


def _shard_error(rank: int, world_size: int, kind: str, sharding_type: str) -> str:
    try:
        _shard(kind, sharding_type, world_size)
    except Exception as e:  # noqa: BLE001 - the message is what we check
        return f"{type(e).__name__}: {e}"
    return "no error"


@pytest.mark.parametrize("sharding_type", ["table_row_wise", "data_parallel"])
def test_ec_sharding_types_torchrec_cannot_do_are_refused_with_a_clear_error(sharding_type):
    # Planning is collective: both ranks must fail (rank 1 in the broadcast would otherwise wait for rank 0).
    messages = run_distributed(_shard_error, "ec", sharding_type, timeout_s=120, pg_timeout_s=30)
    for m in messages:  # checked before the collective plan, on every rank: no rank waits in a broadcast
        assert m.startswith("ValueError") and f"only ['{sharding_type}']" in m and "'t0'" in m, m
        assert "table_wise" in m and "row_wise" in m, m  # names what the EC sharder can do


def _ec_data_parallel_lookup(rank: int, world_size: int) -> str:
    """TorchRec's own data-parallel EC, planned without our refusal: what embeddings.sharding refuses and why."""
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv

    from hyrank.embeddings.sharding import make_sharders

    cpu = torch.device("cpu")
    model, sharders = _build("ec", torch.device("meta")), make_sharders(cpu)
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, local_world_size=world_size, compute_device="cpu"), batch_size=B,
        constraints={t: ParameterConstraints(sharding_types=["data_parallel"], compute_kernels=["dense"])
                     for t in TABLES})
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   device=cpu, plan=plan, sharders=sharders, init_data_parallel=False)
    try:
        _outputs("ec", dmp(_kjt(rank)))
    except RuntimeError as e:
        return f"fails: {e}"
    return "works"


def test_canary_torchrec_data_parallel_ec_lookup_still_fails():
    # When a TorchRec upgrade makes this pass, lift the data_parallel refusal in embeddings.sharding.check_constraints.
    results = run_distributed(_ec_data_parallel_lookup, timeout_s=120, pg_timeout_s=30)
    assert all(r.startswith("fails: split_with_sizes") for r in results), results


def test_plan_to_dict_is_plain_data():
    import json

    from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding, ShardingPlan

    from hyrank.embeddings.sharding import plan_to_dict

    plan = ShardingPlan({"emb": EmbeddingModuleShardingPlan(
        {"t0": ParameterSharding(sharding_type="table_wise", compute_kernel="fused", ranks=[1])})})
    d = plan_to_dict(plan)
    assert d == {"emb": {"t0": {"sharding_type": "table_wise", "compute_kernel": "fused", "ranks": [1],
                                "shards": []}}}
    assert json.loads(json.dumps(d)) == d


# -- the dedup path under DMP: same losses as the plain path, through fused row-wise Adagrad ---------------------


def _train_steps(rank: int, world_size: int, cfg, table, full_state: dict, dedup: bool, num_steps: int = 3):
    from hyrank.models import build_model
    from hyrank.pipeline.data.convert import BatchConverter
    from hyrank.pipeline.distributed.dmp import shard_model
    from hyrank.pipeline.train.model import sharding_arguments
    from hyrank.pipeline.distributed.env import env_of_current_group
    from hyrank.pipeline.ranker import RankingModel

    spec = cfg.features
    tower = build_model(cfg.model.name, cfg.model.config, spec.input_shape())
    model = RankingModel(spec, tower, sparse_device=torch.device("meta"), dedup=dedup)
    sharded = shard_model(model, env_of_current_group(), **sharding_arguments(cfg, model))
    sharded.dmp.load_state_dict(full_state)  # DMP re-initialises EBC tables: both paths start from these
    convert = BatchConverter(spec, sequence_feed=model.sequence_feed)  # the model owns the dedup switch
    rows = cfg.data.batch_size_per_rank
    losses, ratios = [], []
    for step in range(num_steps):
        batch = convert(table.slice((step * world_size + rank) * rows, rows))
        loss, _ = sharded.dmp(batch)
        sharded.optimizer.zero_grad()
        loss.backward()
        sharded.optimizer.step()
        losses.append(float(loss))
        ratios.append(batch.dedup_ratio)
    return {"losses": losses, "ratios": ratios, "plan": sharded.plan_dict}


def _full_state(cfg) -> dict[str, torch.Tensor]:
    """Every parameter of an unsharded RankingModel built on CPU from a fixed seed."""
    from hyrank.models import build_model
    from hyrank.pipeline.ranker import RankingModel

    torch.manual_seed(0)
    tower = build_model(cfg.model.name, cfg.model.config, cfg.features.input_shape())
    model = RankingModel(cfg.features, tower, sparse_device=torch.device("cpu"))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("sequence_sharding", ["table_wise", "row_wise"])
def test_dedup_trains_like_the_plain_path_under_dmp(small_cfg, sequence_sharding):
    import pathlib

    import pyarrow.parquet as pq

    from hyrank.pipeline.config import TableSharding

    for t in ("item", "category", "author"):  # the tables read by sequences
        small_cfg.embeddings.sharding[t] = TableSharding([sequence_sharding])
    first_file = sorted(pathlib.Path(small_cfg.data.root).rglob("*.parquet"))[0]
    table = pq.read_table(first_file, columns=small_cfg.features.columns())
    full = _full_state(small_cfg)
    plain = run_distributed(_train_steps, small_cfg, table, full, False, timeout_s=180)
    dedup = run_distributed(_train_steps, small_cfg, table, full, True, timeout_s=180)
    assert plain[0]["plan"]["sparse.ec"]["item"]["sharding_type"] == sequence_sharding
    for rank in range(2):
        assert all(r is not None and 0 < r < 1 for r in dedup[rank]["ratios"])
        # fused row-wise Adagrad sees the same summed row gradients, added in another order
        assert dedup[rank]["losses"] == pytest.approx(plain[rank]["losses"], rel=1e-5, abs=1e-6)
