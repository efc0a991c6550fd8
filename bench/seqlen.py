"""Benchmark: what sequence length, width and depth cost HyFormer, LONGER+RankMixer and the full Transformer.

    hyrank bench seqlen                                       # lengths 1k, 2k, 3k; CPU; batch 16
    hyrank bench seqlen --device cuda --batch-size 256 --lengths 1000,2000,3000,6000

For each tower the longest sequence of the default config's inputs (its first sequence, `long`) is set to each
length, then the width (d_model) and depth (num_layers) are doubled at the first length. Each row: params and
training FLOPs per sample from the accounting (models/accounting.py), the measured step time (forward, backward,
AdamW; bench/model.py) and both relative to the tower's own first row, so the growth of each is read side by side:
LONGER's and HyFormer's cost grows about linearly with length (a short query set attends over all events), a
full Transformer's quadratically. Torch only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from hyrank.bench.model import step_seconds

MODELS = ("hyformer", "longer_rankmixer", "transformer")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated tower names")
    p.add_argument("--lengths", default="1000,2000,3000", help="comma-separated lengths of the long sequence")
    p.add_argument("--config", type=Path, default=None, help="run config giving the other inputs (default.toml)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps after 2 warm-up steps")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", type=Path, help="also write the record here")


def _with_length(shape, length: int):
    first = next(iter(shape.sequences))
    sequences = dict(shape.sequences)
    sequences[first] = dataclasses.replace(sequences[first], max_len=length)
    return dataclasses.replace(shape, sequences=sequences)


def _variants(name: str, lengths: list[int], shape) -> list[tuple[str, int, dict]]:
    """(label, length, options): each length at the defaults, then 2x width and 2x depth at the first length."""
    from hyrank.models import MODELS as REGISTRY, build_model

    defaults = REGISTRY[name].Config()
    with torch.device("meta"):  # the width the tower built (d_model = 0 picks one that fits its token count)
        width = build_model(name, {}, shape).d_model
    rows = [(f"L={n}", n, {}) for n in lengths]
    rows.append((f"L={lengths[0]}, 2x width", lengths[0], {"d_model": 2 * width}))
    rows.append((f"L={lengths[0]}, 2x depth", lengths[0], {"num_layers": 2 * defaults.num_layers}))
    return rows


def run(args: argparse.Namespace) -> int:
    from hyrank.bench.model import shapes
    from hyrank.models.accounting import model_cost

    device = torch.device(args.device)
    base = shapes(argparse.Namespace(shape="default", config=args.config))
    lengths = [int(n) for n in args.lengths.split(",")]
    print(f"{args.device}, batch {args.batch_size}; cost relative to each tower's first row")
    print(f"{'tower':<18} {'variant':<22} {'params':>11} {'GFLOPs/sample':>14} {'step ms':>9} {'FLOPs x':>8} "
          f"{'time x':>7}")
    rows = []
    for name in args.models.split(","):
        first = None
        for label, length, options in _variants(name, lengths, base):
            shape = _with_length(base, length)
            cost = model_cost(name, options, shape)
            seconds = step_seconds(name, options, shape, args.batch_size, device, args.steps)
            first = first or (cost.train_flops_per_sample, seconds)
            row = {"model": name, "variant": label, "length": length, "options": options, "params": cost.params,
                   "flops_per_sample": cost.train_flops_per_sample, "step_s": seconds,
                   "flops_x": cost.train_flops_per_sample / first[0], "time_x": seconds / first[1]}
            rows.append(row)
            print(f"{name:<18} {label:<22} {cost.params:>11,} {cost.train_flops_per_sample / 1e9:>14.3f} "
                  f"{seconds * 1e3:>9.1f} {row['flops_x']:>8.2f} {row['time_x']:>7.2f}", flush=True)
    record = {"bench": "seqlen", "device": args.device, "batch_size": args.batch_size, "rows": rows}
    print(json.dumps(record))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    return 0
