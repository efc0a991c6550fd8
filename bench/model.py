"""Benchmark: achieved training FLOP/s of each tower against the machine's dense matmul FLOP/s, in one run.

    hyrank bench model                                   # every registered tower, the default config's shapes, CPU
    hyrank bench model --models hyformer,hhft,hiformer --compare --compile       # before / after, interleaved
    hyrank bench model --shape paper --models hyformer --batch-size 256 --device cuda --autocast bf16 --compile

A tower's FLOPs per sample come from the accounting (models/accounting.py: forward + backward, matmuls and
attention, counted on `meta`); its step time is measured on real tensors (forward, backward, AdamW step) after
warm-up. Achieved FLOP/s = FLOPs per sample x batch / step time; the ratio to a square matmul in the compute dtype
(fp32; and bf16 too under `--autocast bf16`), timed in the same turns as the steps, says how much of the machine a
tower uses (1.0 = as busy as a plain GEMM). Torch only: it runs on any GPU machine with `models/` and nothing else.

Variants of one tower, each a model built from the same seed, timed step by step in turn (interleaved: a load
spike hits every variant alike), so each row is comparable with the others of the same run:
  reference  the towers' plain reference paths (models/layers/fastpath.py) and AdamW's per-parameter loop: the
             step as it was before the fast paths (`--compare` only)
  eager      the fast paths (batched projections) and fused AdamW: what training runs (pipeline/train/model.py)
  eager-bf16 eager's model with its forward under autocast (`--autocast bf16`), as `train.autocast = "bf16"`
             applies it (the loss and AdamW in fp32)
  compiled   eager's model under torch.compile (inductor), as `train.compile = true` applies it (`--compile`); the
             first step's extra time is reported as the compile time (and compiled-bf16 under `--autocast`)
`--shape paper` uses the paper-sized options of models/accounting.py's PAPER_ROWS where a tower has one.
`hyrank bench seqlen` (bench/seqlen.py) times the same step over sequence length, width and depth.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

DTYPES = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="all", help="comma-separated tower names, or all")
    p.add_argument("--shape", choices=["default", "paper"], default="default",
                   help="default: the inputs of --config; paper: HyFormer sec. 4.1 (3000-event sequence, 13 tokens) "
                        "with the paper-sized options")
    p.add_argument("--config", type=Path, default=None, help="run config for --shape default (default.toml)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--autocast", choices=sorted(DTYPES), default="none",
                   help="also time the tower with its forward under torch.autocast in this dtype (as train.autocast), "
                        "against a matmul in that dtype as well as the fp32 one")
    p.add_argument("--compare", action="store_true",
                   help="also time the reference paths with the per-parameter AdamW (the step before the fast paths)")
    p.add_argument("--compile", action="store_true", help="also time the tower under torch.compile (inductor)")
    p.add_argument("--json", type=Path, help="also write the record here")


@dataclass
class Variant:
    """One way of running a tower's training step; `times` holds its measured steps."""

    label: str
    reference: bool = False  # the plain reference paths and the per-parameter AdamW loop
    compile: bool = False
    autocast: torch.dtype = torch.float32  # the forward's autocast dtype (fp32: none)
    times: list[float] = field(default_factory=list)
    first_s: float = 0.0  # the first step (compiles, for `compile`)


class Step:
    """A tower, its optimizer and fixed random inputs: `run()` is one training step."""

    def __init__(self, name: str, options: dict, shape, batch_size: int, device: torch.device, variant: Variant):
        from hyrank.models import build_model
        from hyrank.models.accounting import meta_inputs
        from hyrank.pipeline.train.compile import autocast_tower, compile_tower

        torch.manual_seed(0)
        self.model = build_model(name, dict(options), shape).to(device)
        # fused: pipeline/train/model.py's dense optimizer; foreach=False: AdamW's CPU default before it
        kind = {"foreach": False} if variant.reference else {"fused": True}
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, **kind)
        if variant.autocast != torch.float32:
            autocast_tower(self.model, device.type, variant.autocast)  # as train.autocast does
        if variant.compile:
            compile_tower(self.model, report=False)  # as train.compile does
        self.variant, self.device = variant, device
        self.x = meta_inputs(shape, batch_size, device=device)
        g = torch.Generator(device=device).manual_seed(1)
        for t in [*self.x.blocks.values(), self.x.dense, *(s.values_BLD for s in self.x.sequences.values())]:
            t.data.normal_(generator=g)
        self.labels = torch.randint(0, 2, (batch_size,), device=device, generator=g).float()

    def run(self) -> float:
        from hyrank.models.layers.fastpath import reference_paths

        paths = reference_paths() if self.variant.reference else contextlib.nullcontext()
        _sync(self.device)
        start = time.perf_counter()
        with paths:
            logits = self.model(self.x).logits.float()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, self.labels)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        _sync(self.device)
        return time.perf_counter() - start


class MatmulProbe:
    """A square matmul in the compute dtype, timed in the same turns as the towers' steps: the peak they are
    measured against sees the same load (on a shared machine a peak measured once, apart, is off by up to 10x)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, n: int | None = None):
        self.n = n or (8192 if device.type == "cuda" else 1024)
        self.device = device
        self.a, self.b = (torch.randn(self.n, self.n, device=device, dtype=dtype) for _ in range(2))
        self.times: list[float] = []

    def run(self) -> float:
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(3):
            self.a @ self.b
        _sync(self.device)
        return (time.perf_counter() - start) / 3

    def flops_per_s(self) -> float:
        return 2 * self.n ** 3 / median(self.times)


def time_variants(name: str, options: dict, shape, batch_size: int, device: torch.device, steps: int,
                  variants: list[Variant], probes: tuple[MatmulProbe, ...] = ()) -> list[Variant]:
    """Each variant's median step, the variants (and the matmul probes) taking turns step by step (first step:
    `first_s`, 2 warm-up)."""
    runs = [Step(name, options, shape, batch_size, device, v) for v in variants]
    for i in range(steps + 2):
        for r in runs:
            seconds = r.run()
            if i == 0:
                r.variant.first_s = seconds
            elif i >= 2:
                r.variant.times.append(seconds)
        for probe in probes if i >= 2 else ():
            probe.times.append(probe.run())
    return variants


def step_seconds(name: str, options: dict, shape, batch_size: int, device: torch.device, steps: int) -> float:
    """Median wall time of one training step (forward, backward, fused AdamW) of a tower on random inputs."""
    (v,) = time_variants(name, options, shape, batch_size, device, steps, [Variant("eager")])
    return median(v.times)


def median(times: list[float]) -> float:
    return sorted(times)[len(times) // 2]


def shapes(args: argparse.Namespace):
    from hyrank.models.accounting import paper_shape

    if args.shape == "paper":
        return paper_shape()
    from hyrank.pipeline.config import load_config

    config = args.config or Path(__file__).resolve().parents[1] / "jobs" / "configs" / "default.toml"
    return load_config(config).features.input_shape()


def options_of(name: str, shape: str) -> dict:
    """{} (the tower's defaults), or at --shape paper the first paper-sized row of that tower."""
    from hyrank.models.accounting import PAPER_ROWS

    if shape == "paper":
        return next((dict(r.options) for r in PAPER_ROWS if r.model == name), {})
    return {}


def run(args: argparse.Namespace) -> int:
    from hyrank.models import MODELS
    from hyrank.models.accounting import model_cost

    device, dtype = torch.device(args.device), DTYPES[args.autocast]
    names = sorted(MODELS) if args.models == "all" else args.models.split(",")
    shape = shapes(args)
    load = os.getloadavg()[0]
    low = [] if dtype == torch.float32 else [args.autocast]
    print(f"{args.shape} shapes, batch {args.batch_size}, on {device}; load average {load:.2f} ({os.cpu_count()} "
          f"cores); 'of X mm': against a dense X matmul timed in the same turns")
    print(f"{'tower':<18} {'variant':<14} {'params':>11} {'GFLOPs/sample':>14} {'step ms':>9} {'rows/s':>8} "
          f"{'GFLOP/s':>9} "
          + "".join(f"{p + ' mm':>10} {'of ' + p + ' mm':>11} " for p in ["fp32", *low]) + f"{'speed-up':>9}")
    rows = []
    for name in names:
        options = options_of(name, args.shape)
        cost = model_cost(name, options, shape)
        variants = ([Variant("reference", reference=True)] if args.compare else []) + [Variant("eager")]
        variants += [Variant(f"eager-{p}", autocast=dtype) for p in low]
        if args.compile:
            variants += [Variant("compiled", compile=True)]
            variants += [Variant(f"compiled-{p}", compile=True, autocast=dtype) for p in low]
        probes = {"fp32": MatmulProbe(device, torch.float32), **{p: MatmulProbe(device, dtype) for p in low}}
        time_variants(name, options, shape, args.batch_size, device, args.steps, variants, tuple(probes.values()))
        peaks, base = {p: probe.flops_per_s() for p, probe in probes.items()}, median(variants[0].times)
        for v in variants:
            seconds = median(v.times)
            achieved = cost.train_flops_per_sample * args.batch_size / seconds
            row = {"model": name, "variant": v.label, "params": cost.params,
                   "flops_per_sample": cost.train_flops_per_sample, "step_s": seconds, "flops_per_s": achieved,
                   "rows_per_s": args.batch_size / seconds, "speedup": base / seconds}
            for p, peak in peaks.items():
                row[f"matmul_{p}_flops_per_s"], row[f"ratio_{p}"] = peak, achieved / peak
            note = ""
            if v.compile:
                row["compile_s"] = v.first_s - seconds
                note = f"  (compile {row['compile_s']:.0f} s)"
            rows.append(row)
            print(f"{name:<18} {v.label:<14} {cost.params:>11,} {cost.train_flops_per_sample / 1e9:>14.3f} "
                  f"{seconds * 1e3:>9.1f} {args.batch_size / seconds:>8.0f} {achieved / 1e9:>9.1f} "
                  + "".join(f"{peak / 1e9:>10.1f} {achieved / peak:>11.2f} " for peak in peaks.values())
                  + f"{base / seconds:>8.2f}x{note}")
    print(f"load average after {os.getloadavg()[0]:.2f}; speed-up: against the tower's first variant, same run")
    record = {"bench": "model", "device": str(device), "shape": args.shape, "batch_size": args.batch_size,
              "autocast": args.autocast, "load_before": load, "rows": rows}
    print(json.dumps(record))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
