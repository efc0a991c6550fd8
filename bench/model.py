"""Benchmark: achieved training FLOP/s of each tower against the machine's dense matmul FLOP/s, in one run.

    hyrank bench model                                   # every registered tower, the default config's shapes, CPU
    hyrank bench model --shape paper --models hyformer,longer_rankmixer --batch-size 32 --device cuda

A tower's FLOPs per sample come from the accounting (models/accounting.py: forward + backward, matmuls and
attention, counted on `meta`); its step time is measured on real tensors (forward, backward, AdamW step) after
warm-up. Achieved FLOP/s = FLOPs per sample x batch / step time; the ratio to a square fp32 matmul measured in the
same process says how much of the machine a tower uses (1.0 = as busy as a plain GEMM). Torch only: it runs on any
GPU machine with `models/` and nothing else. `hyrank bench seqlen` (bench/seqlen.py) times the same step over
sequence length, width and depth.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="all", help="comma-separated tower names, or all")
    p.add_argument("--shape", choices=["default", "paper"], default="default",
                   help="default: the inputs of --config; paper: HyFormer sec. 4.1 (3000-event sequence, 13 tokens)")
    p.add_argument("--config", type=Path, default=None, help="run config for --shape default (default.toml)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", type=Path, help="also write the record here")


def matmul_flops_per_s(device: torch.device, *, n: int | None = None, reps: int = 10) -> float:
    """FLOP/s of an n x n fp32 matmul on `device`: the dense peak the towers are measured against."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def step_seconds(name: str, options: dict, shape, batch_size: int, device: torch.device, steps: int) -> float:
    """Median wall time of one training step (forward, backward, AdamW) of a tower on random inputs."""
    from hyrank.models import build_model
    from hyrank.models.accounting import meta_inputs

    torch.manual_seed(0)
    model = build_model(name, dict(options), shape).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = meta_inputs(shape, batch_size, device=device)
    for t in [*x.blocks.values(), x.dense, *(s.values_BLD for s in x.sequences.values())]:
        t.data.normal_()
    labels = torch.randint(0, 2, (batch_size,), device=device).float()
    times = []
    for i in range(steps + 2):
        _sync(device)
        start = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).logits.squeeze(-1), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def shapes(args: argparse.Namespace):
    from hyrank.models.accounting import paper_shape

    if args.shape == "paper":
        return paper_shape()
    from hyrank.pipeline.config import load_config

    config = args.config or Path(__file__).resolve().parents[1] / "jobs" / "configs" / "default.toml"
    return load_config(config).features.input_shape()


def run(args: argparse.Namespace) -> int:
    from hyrank.models import MODELS
    from hyrank.models.accounting import model_cost

    device = torch.device(args.device)
    names = sorted(MODELS) if args.models == "all" else args.models.split(",")
    shape = shapes(args)
    peak = matmul_flops_per_s(device)
    print(f"dense fp32 matmul on {device}: {peak / 1e9:,.1f} GFLOP/s; {args.shape} shapes, batch {args.batch_size}")
    print(f"{'tower':<18} {'params':>10} {'GFLOPs/sample':>14} {'step ms':>9} {'GFLOP/s':>9} {'of matmul':>10}")
    rows = []
    for name in names:
        cost = model_cost(name, {}, shape)
        seconds = step_seconds(name, {}, shape, args.batch_size, device, args.steps)
        achieved = cost.train_flops_per_sample * args.batch_size / seconds
        rows.append({"model": name, "params": cost.params, "flops_per_sample": cost.train_flops_per_sample,
                     "step_s": seconds, "flops_per_s": achieved, "ratio": achieved / peak})
        print(f"{name:<18} {cost.params:>10,} {cost.train_flops_per_sample / 1e9:>14.3f} {seconds * 1e3:>9.1f} "
              f"{achieved / 1e9:>9.1f} {achieved / peak:>10.2f}")
    record = {"bench": "model", "device": str(device), "shape": args.shape, "batch_size": args.batch_size,
              "matmul_flops_per_s": peak, "rows": rows}
    print(json.dumps(record))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
