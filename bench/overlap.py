"""Benchmark: how much of the dense allreduce the one-step-stale hook hides, measured on a tower alone.

    hyrank bench overlap                                    # default.toml's tower, 2 local gloo ranks on CPU
    hyrank bench overlap --device cuda --shape paper --option d_model=512 --batch-size 256    # on a GPU box

Needs only torch (no torchrec, no fbgemm), so it runs on any GPU machine: the tower from models/, random embedded
inputs of the run config's shapes (or the HyFormer paper's, `--shape paper`), DDP over the tower, and the hook of
pipeline/distributed/comm_hooks.py driven by DenseSync (dense_sync.py) with the config's prediction / compensation: the dense half of what
`hyrank train` runs under DMP. Three DDP modes, each on a fresh tower, interleaved over `--rounds`:
  local   a comm hook that reduces nothing: the step's compute alone
  sync    plain DDP; its bucket allreduces overlap the rest of backward, and what they still add is "exposed"
  async   the stale hook: the allreduce of step k runs while step k+1 computes
plus the blocking allreduce of the whole gradient alone. The hidden share is (sync - async) / (sync - local): of the
allreduce time that sync leaves exposed, the part async removes (1: all of it; it can pass 1 when the hook's
per-parameter bookkeeping costs less than DDP's own).
Backends: NCCL when every rank has its own GPU; gloo otherwise. Ranks sharing one GPU (`--device cuda` on a one-GPU
machine) reduce through gloo, which stages CUDA tensors through host memory: the reduction runs on CPU threads and
loopback TCP beside the GPU's compute (the hook's setting, with a slower link than NVLink/IB), while the ranks'
kernels take turns on the one GPU, so "local" is about world-size times one rank's compute.

Measured on one H100 (2026-11-23), 2 ranks sharing it over gloo, HyFormer with the paper's input shapes
(`--shape paper --model hyformer`, long sequence 1000 events unless noted), fp32 (train.autocast off), its
prediction 1 + compensation 0.5 ("async") and the plain stale rule ("plain"); ms per step:
    tower (d_model)     params  batch/rank   local    sync   async   plain   allreduce alone   hidden: async  plain
    paper (976), L=3000  417M      256        220.2   898.7   288.3   232.6       892.0              0.90   0.98
    512                  124M      256         93.4   271.3   117.3    98.2       244.3              0.87   0.97
    512                  124M     1024        274.8   323.6   298.2   279.1       263.3              0.52   0.91
    256                   37M      512        127.6   143.9   139.4   130.3        70.3              0.28   0.83
    default.toml's        0.9M    2048         40.5    45.8    51.1    48.3         1.9              < 0   < 0
Plain DDP already hides most of a small gradient's allreduce behind backward; where the allreduce is longer than
the step (417M parameters over loopback) async cuts the step 3.1x. Prediction + compensation cost 5-24% of a step
here (elementwise passes over every dense parameter, on a GPU two ranks share; 21% at 417M after the hook's
in-place rewrite, interleaved runs: async/plain 1.211 and 1.205 against 1.244 and 1.242 before); on the
0.9M-parameter tower the hook's per-parameter bookkeeping costs more than the 2 ms allreduce it hides.
"""

# No `from __future__ import annotations`: DDP checks the local hook's annotations as real objects.
import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="run config: model, input shapes, batch size, optimizer, async options "
                        "(default: jobs/configs/default.toml)")
    p.add_argument("--model", default=None, help="override model.name")
    p.add_argument("--shape", choices=["config", "paper"], default="config",
                   help="input shapes: the config's feature spec, or the HyFormer paper's (13 tokens of 256, "
                        "sequences of --long-len / 50 / 50 events of 64) with the paper-scale options of "
                        "`hyrank models --table` for the model (418M-parameter HyFormer)")
    p.add_argument("--long-len", type=int, default=3000, help="long-sequence length with --shape paper")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model option (value parsed as JSON, e.g. d_model=512 or head_hidden=[256])")
    p.add_argument("--batch-size", type=int, default=None, help="rows per rank (default: the config's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--world-size", type=int, default=2, help="local ranks")
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto",
                   help="auto: nccl if every rank has its own GPU, else gloo")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode and round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (DDP re-bucketing, allocator)")
    p.add_argument("--rounds", type=int, default=2, help="the three modes run this many times, interleaved")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as for `hyrank train`")
    p.add_argument("--json", type=Path, default=None, help="also write the measurements here")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from hyrank.pipeline.distributed.local import run_local

    config = args.config or Path(__file__).resolve().parents[1] / "jobs" / "configs" / "default.toml"
    spec = _spec(args, str(config))  # fails here, in one process, on a bad option or config
    backend = args.backend
    if args.device == "cuda":
        gpus = _gpu_count()
        if gpus == 0:
            raise ValueError("--device cuda: no GPU visible")
        if backend == "auto":
            backend = "nccl" if gpus >= args.world_size else "gloo"
        if backend == "nccl" and gpus < args.world_size:
            raise ValueError(f"nccl needs a GPU per rank: {args.world_size} ranks, {gpus} GPU(s)")
    elif backend == "nccl":
        raise ValueError("nccl needs --device cuda")
    else:
        backend = "gloo"
    start = "spawn" if args.device == "cuda" else "fork"  # a forked child cannot initialise CUDA
    timing = {"device": args.device, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds}
    result = run_local(_worker, spec, timing, world_size=args.world_size, backend=backend, start_method=start,
                       timeout_s=3600)[0]
    _report(result, spec, args, backend)
    if args.json:
        args.json.write_text(json.dumps({**result, "backend": backend, "device": args.device,
                                         "world_size": args.world_size, **spec}, indent=2, default=str))
    return 0


def _gpu_count() -> int:
    """GPUs visible, asked in a child process: the parent must not initialise CUDA before the ranks spawn."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def _spec(args: argparse.Namespace, config: str) -> dict:
    """What every rank builds: model name and options, input shapes, batch size, training options."""
    from hyrank.models import MODELS, build_model
    from hyrank.models.accounting import PAPER_ROWS, dense_params, paper_shape
    from hyrank.pipeline.config import load_config

    cfg = load_config(config, list(args.overrides))
    name = args.model or cfg.model.name
    if name not in MODELS:
        raise ValueError(f"--model {name!r}: not a registered tower ({', '.join(MODELS)})")
    if args.shape == "paper":
        paper = paper_shape()
        sequences = dict(paper.sequences, long=dataclasses.replace(paper.sequences["long"], max_len=args.long_len))
        shape = dataclasses.replace(paper, sequences=sequences)
        options = next((dict(r.options) for r in PAPER_ROWS if r.model == name), {})
    else:
        shape = cfg.features.input_shape()
        options = dict(cfg.model.options) if name == cfg.model.name else {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    with torch.device("meta"):  # a bad option fails here, once, not in every rank; counted without memory
        params = dense_params(build_model(name, dict(options), shape))
    t = cfg.train
    return {"model": name, "options": options, "shape": shape, "dense_params": params,
            "batch_size": args.batch_size or cfg.data.batch_size_per_rank,
            "lr": t.lr, "weight_decay": t.weight_decay, "grad_clip_norm": t.grad_clip_norm,
            "bf16": t.autocast == "bf16", "compression": t.allreduce_compression,
            "compensation": t.allreduce_delay_compensation, "prediction": t.allreduce_weight_prediction}


class _Logits(torch.nn.Module):
    """The tower with a plain tensor out: DDP with `static_graph=True` (as TorchRec's wrapper sets it) finds no
    tensor in a TowerOutput dataclass and then never reduces at all (no hook call, measured)."""

    def __init__(self, tower: torch.nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, x) -> torch.Tensor:
        return self.tower(x).logits


def _local_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Reduces nothing: each rank keeps its own gradient (the compute-only floor)."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _worker(rank: int, world_size: int, spec: dict, timing: dict) -> dict:
    from hyrank.models import build_model
    from hyrank.models.accounting import meta_inputs
    from hyrank.pipeline.distributed.comm_hooks import StaleAllReduce, stale_allreduce_hook
    from hyrank.pipeline.distributed.dense_sync import DenseSync

    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if timing["device"] == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    gen = torch.Generator(device="cpu").manual_seed(1000 + rank)
    inputs = meta_inputs(spec["shape"], spec["batch_size"], device="cpu")
    for leaf in [*inputs.blocks.values(), inputs.dense, *(s.values_BLD for s in inputs.sequences.values())]:
        leaf.data.normal_(generator=gen)
    inputs = _to(inputs, device)
    labels = (torch.rand(spec["batch_size"], generator=gen) < 0.2).float().to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"])  # as train.autocast

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def one_mode(mode: str) -> list[float]:
        torch.manual_seed(0)
        with torch.device(device):
            tower = _Logits(build_model(spec["model"], dict(spec["options"]), spec["shape"]))
        ddp = torch.nn.parallel.DistributedDataParallel(tower, device_ids=[device] if device.type == "cuda" else None,
                                                        static_graph=True)
        hook = None
        if mode == "local":
            ddp.register_comm_hook(None, _local_hook)
        elif mode in ("async", "plain"):
            fixes = mode == "async"  # "plain": the stale rule without prediction / compensation
            hook = StaleAllReduce(compression=spec["compression"], compensation=spec["compensation"] * fixes,
                                  prediction=spec["prediction"] * fixes)
            ddp.register_comm_hook(hook, stale_allreduce_hook)
        opt = torch.optim.AdamW(tower.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"])
        # the trainer's own dense step: the same object, so the same call order as `hyrank train`
        dense = DenseSync(opt, tower.named_parameters(), hook=hook, mode="sync" if hook is None else "async",
                          grad_clip_norm=spec["grad_clip_norm"])
        times = []
        for step in range(timing["warmup"] + timing["steps"]):
            sync()
            dist.barrier()
            start = time.perf_counter()
            dense.before_forward(step)
            with autocast:
                logits = ddp(inputs).float()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
            opt.zero_grad()
            loss.backward()
            dense.after_backward()
            sync()
            if step >= timing["warmup"]:
                times.append(time.perf_counter() - start)
        _check_reduced(mode, tower)
        dense.flush()
        del ddp, tower, opt, hook, dense
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return times

    modes = ("local", "sync", "async") + (("plain",) if spec["compensation"] or spec["prediction"] else ())
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(timing["rounds"]):
        for mode in modes:
            times[mode] += one_mode(mode)
    flat = torch.zeros(spec["dense_params"], device=device)  # what the hook reduces, in one piece
    ar = []
    for _ in range(max(5, timing["steps"] // 2)):
        sync()
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(flat)
        sync()
        ar.append(time.perf_counter() - start)
    # per-rank medians; the slowest rank sets a step's time
    local = {m: statistics.median(ts) for m, ts in times.items()}
    gathered: list[dict] = [{} for _ in range(world_size)]
    dist.all_gather_object(gathered, local)
    out = {m: max(g[m] for g in gathered) for m in modes}
    out["allreduce"] = statistics.median(ar)
    out["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return out


def _check_reduced(mode: str, tower: torch.nn.Module) -> None:
    """The gradients DDP handed back must be the same on every rank when it reduces (sync, async) and differ when
    it does not (local): a bench that times steps in which nothing was reduced would report a bogus hidden share."""
    grads = [p.grad.double().square().sum() for p in tower.parameters() if p.grad is not None]
    checksum = torch.stack(grads).sum().item() if grads else 0.0  # squared norm: no cancellation to zero
    every: list[float] = [0.0] * dist.get_world_size()
    dist.all_gather_object(every, checksum)
    same = max(every) - min(every) <= 1e-9 * max(every)
    if same != (mode != "local"):  # (all modes but local reduce)
        raise RuntimeError(f"mode {mode}: per-rank gradient checksums {every} are "
                           f"{'equal' if same else 'different'}: DDP {'did not reduce' if not same else 'reduced'}")


def _to(x, device: torch.device):
    from hyrank.models.inputs import SequenceInput, TowerInput

    return TowerInput(blocks={k: v.detach().to(device).requires_grad_() for k, v in x.blocks.items()},
                      dense=x.dense.detach().to(device).requires_grad_(),
                      sequences={k: SequenceInput(s.values_BLD.detach().to(device).requires_grad_(),
                                                  s.mask_BL.to(device)) for k, s in x.sequences.items()})


def _report(r: dict, spec: dict, args: argparse.Namespace, backend: str) -> None:
    fixes = [f"{k} {spec[k]:g}" for k in ("prediction", "compensation") if spec[k]]
    shared = args.device == "cuda" and backend == "gloo"
    params = spec["dense_params"]
    print(f"tower {spec['model']}: {params:,} dense parameters ({params * 4 / 2**20:.1f} MiB of "
          f"fp32 gradient), batch {spec['batch_size']} per rank, {args.world_size} ranks, {backend} on "
          f"{r['device_name']}{' (ranks share the GPU)' if shared else ''}"
          f"{', bf16 autocast' if spec['bf16'] else ''}")
    print(f"step time, median of {args.steps} steps x {args.rounds} rounds (slowest rank):")
    print(f"  local (no allreduce)  {r['local'] * 1e3:9.2f} ms")
    exposed = r["sync"] - r["local"]
    print(f"  sync (plain DDP)      {r['sync'] * 1e3:9.2f} ms   exposed allreduce {exposed * 1e3:.2f} ms")
    print(f"  async (stale hook)    {r['async'] * 1e3:9.2f} ms   {', '.join(fixes) or 'plain stale rule'}   "
          f"ratio async/sync {r['async'] / r['sync']:.3f}")
    if "plain" in r:
        print(f"  async, plain stale    {r['plain'] * 1e3:9.2f} ms   (no prediction / compensation)   "
              f"ratio async/plain {r['async'] / r['plain']:.3f}")
    print(f"allreduce of the whole gradient alone: {r['allreduce'] * 1e3:.2f} ms")
    if exposed > 0.05 * r["local"]:
        print(f"share of the exposed allreduce hidden by async: {(r['sync'] - r['async']) / exposed:.2f}"
              + (f" (plain stale rule: {(r['sync'] - r['plain']) / exposed:.2f})" if "plain" in r else ""))
    else:
        print("share of the exposed allreduce hidden by async: not measurable here (sync exposes under 5% of a "
              "step's compute, below the step-time noise)")
