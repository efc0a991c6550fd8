"""Benchmark: plain vs deduplicated sequence lookup, side by side in one run, at several unique-id ratios.

    hyrank bench dedup                                  # B=128 rows x L=1000 events, D=64, CPU (+ CUDA if present)
    python -m hyrank.bench.dedup                        # the same without the CLI (a GPU box with torch alone)

For each ratio it prints the bytes of sequence ids moved host -> device (plain: N int64 ids + lengths; dedup:
U int64 ids + N int16/int32 inverse + lengths), and the median forward+backward time of the embedding stage of
a training step, including the row update a fused optimizer does inside backward (SGD here):

  lookup     rows = table[ids]                                  vs  table[unique] expanded by the inverse
  +proj      the same followed by a per-token Linear(D, D)      vs  the Linear on the U unique rows, then expand
  tbe        fbgemm's CPU/CUDA TBE with fused SGD (DMP's kernel) vs  the TBE over unique ids + expand (fbgemm only)

Both paths update the table identically (checked each run). Needs only torch: the tbe column appears when
fbgemm_gpu loads. The host-side dedup (torch.unique) is reported separately: it runs in the data loader.
Legend: B rows, L events per row, N = B*L events, U distinct ids, D embedding width.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from hyrank.embeddings.dedup import compact_index_dtype, expand_rows, unique_per_table

RATIOS = (0.10, 0.25, 0.50, 1.00)
LR = 0.01


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=128, help="rows B")
    p.add_argument("--seq-len", type=int, default=1000, help="events per row L")
    p.add_argument("--dim", type=int, default=64, help="embedding width D")
    p.add_argument("--num-embeddings", type=int, default=500_000, help="table rows")
    p.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS), help="distinct ids / events")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per cell (median reported)")
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")


@dataclass
class Inputs:
    ids_N: torch.Tensor  # int64 event ids (host)
    lengths_B: torch.Tensor  # int64 events per row (host)
    unique_U: torch.Tensor  # int64 distinct ids (host)
    inverse_N: torch.Tensor  # int16/int32 event -> unique row (host)
    host_dedup_ms: float

    @property
    def plain_bytes(self) -> int:
        return self.ids_N.nbytes + self.lengths_B.nbytes

    @property
    def dedup_bytes(self) -> int:
        # unique ids, one int32 count per table, compact inverse, int32 lengths (what embeddings.dedup moves)
        return self.unique_U.nbytes + 4 + self.inverse_N.nbytes + self.lengths_B.numel() * 4


def make_inputs(args: argparse.Namespace, ratio: float, seed: int = 0) -> Inputs:
    """N ids of which round(ratio*N) are distinct, each distinct id used at least once, in random order."""
    g = torch.Generator().manual_seed(seed)
    n = args.batch_size * args.seq_len
    distinct = max(1, min(args.num_embeddings, round(ratio * n)))
    pool = torch.randperm(args.num_embeddings, generator=g)[:distinct]
    ids = pool[torch.arange(n) % distinct][torch.randperm(n, generator=g)]
    start = time.perf_counter()
    u = unique_per_table(ids, [n])
    inverse = u.inverse.to(compact_index_dtype(u.num_unique))
    host_ms = (time.perf_counter() - start) * 1e3
    return Inputs(ids, torch.full((args.batch_size,), args.seq_len, dtype=torch.int64), u.values, inverse, host_ms)


def _plain_step(table: torch.Tensor, ids: torch.Tensor, proj: torch.nn.Module | None, upstream: torch.Tensor) -> None:
    rows = table.index_select(0, ids).requires_grad_()
    out = proj(rows) if proj is not None else rows
    (out * upstream).sum().backward()
    table.index_add_(0, ids, rows.grad, alpha=-LR)  # what a fused optimizer does inside backward


def _dedup_step(table: torch.Tensor, unique: torch.Tensor, inverse: torch.Tensor, proj: torch.nn.Module | None,
                upstream: torch.Tensor) -> None:
    rows = table.index_select(0, unique).requires_grad_()
    out = expand_rows(proj(rows) if proj is not None else rows, inverse)
    (out * upstream).sum().backward()  # expand's backward sums the repeated ids' gradients into U rows
    table.index_add_(0, unique, rows.grad, alpha=-LR)


def _tbe(args: argparse.Namespace, device: torch.device):
    """fbgemm's TBE with fused exact SGD and no pooling (DMP's `fused` kernel), or None without fbgemm."""
    try:
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import ComputeDevice, EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
    except Exception:  # noqa: BLE001 - torch-only machine: skip the column
        return None
    cuda = device.type == "cuda"
    spec = (args.num_embeddings, args.dim, EmbeddingLocation.DEVICE if cuda else EmbeddingLocation.HOST,
            ComputeDevice.CUDA if cuda else ComputeDevice.CPU)
    return SplitTableBatchedEmbeddingBagsCodegen([spec], learning_rate=LR, pooling_mode=PoolingMode.NONE,
                                                 device=device)


def _tbe_step(tbe, ids: torch.Tensor, inverse: torch.Tensor | None, upstream: torch.Tensor) -> None:
    offsets = torch.tensor([0, ids.numel()], device=ids.device, dtype=torch.int64)
    rows = tbe(ids, offsets)
    out = rows if inverse is None else expand_rows(rows, inverse)
    (out * upstream).sum().backward()


def _median_ms(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _check_same_update(args, inp: Inputs, device: torch.device, upstream: torch.Tensor) -> None:
    """Both paths must leave the table identical (up to float summation order)."""
    base = torch.randn(args.num_embeddings, args.dim, generator=torch.Generator().manual_seed(1)).to(device)
    a, b = base.clone(), base.clone()
    _plain_step(a, inp.ids_N.to(device), None, upstream)
    _dedup_step(b, inp.unique_U.to(device), inp.inverse_N.to(device), None, upstream)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def bench_device(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    table = torch.randn(args.num_embeddings, args.dim, device=device) * 0.01
    proj = torch.nn.Linear(args.dim, args.dim).to(device)
    tbe = _tbe(args, device)
    for ratio in args.ratios:
        inp = make_inputs(args, ratio)
        ids, unique, inverse = inp.ids_N.to(device), inp.unique_U.to(device), inp.inverse_N.to(device)
        upstream = torch.randn(ids.numel(), args.dim, device=device)
        _check_same_update(args, inp, device, upstream)
        cell = {"device": device.type, "ratio": ratio, "N": ids.numel(), "U": unique.numel(),
                "bytes_plain": inp.plain_bytes, "bytes_dedup": inp.dedup_bytes, "host_dedup_ms": inp.host_dedup_ms}
        for name, p in (("lookup", None), ("proj", proj)):
            cell[f"{name}_plain"] = _median_ms(lambda: _plain_step(table, ids, p, upstream), args.repeats, device)
            cell[f"{name}_dedup"] = _median_ms(lambda: _dedup_step(table, unique, inverse, p, upstream),
                                               args.repeats, device)
        if tbe is not None:
            cell["tbe_plain"] = _median_ms(lambda: _tbe_step(tbe, ids, None, upstream), args.repeats, device)
            cell["tbe_dedup"] = _median_ms(lambda: _tbe_step(tbe, unique, inverse, upstream), args.repeats, device)
        rows.append(cell)
    return rows


def format_rows(rows: list[dict]) -> str:
    head = ["device", "unique", "N", "U", "MB plain", "MB dedup", "bytes x"]
    cols = [c for c in ("lookup", "proj", "tbe") if any(f"{c}_plain" in r for r in rows)]
    for c in cols:
        head += [f"{c} ms plain", f"{c} ms dedup", f"{c} x"]
    head.append("host dedup ms")
    lines = [head]
    for r in rows:
        line = [r["device"], f"{r['ratio']:.0%}", str(r["N"]), str(r["U"]), f"{r['bytes_plain'] / 1e6:.2f}",
                 f"{r['bytes_dedup'] / 1e6:.2f}", f"{r['bytes_dedup'] / r['bytes_plain']:.2f}"]
        for c in cols:
            if f"{c}_plain" in r:
                line += [f"{r[f'{c}_plain']:.1f}", f"{r[f'{c}_dedup']:.1f}", f"{r[f'{c}_dedup'] / r[f'{c}_plain']:.2f}"]
            else:
                line += ["-", "-", "-"]
        line.append(f"{r['host_dedup_ms']:.1f}")
        lines.append(line)
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(l, widths)) for l in lines)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"dedup bench: B={args.batch_size} L={args.seq_len} D={args.dim} table rows={args.num_embeddings} "
          f"threads={torch.get_num_threads()} repeats={args.repeats} (x = dedup / plain; lower is better)")
    rows = [r for d in devices for r in bench_device(args, torch.device(d))]
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
