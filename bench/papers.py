"""The papers' experiments, one command each: real train runs (`hyrank bench quality`'s runner), a table and a plot.

    hyrank bench paper --list
    hyrank bench paper hyformer-table1 --data /tmp/synth150 --seeds 3 --out docs/results    # table .md + plot .png
    hyrank bench paper scaling --data /tmp/synth150 --seeds 3 --out /tmp/papers --json /tmp/papers/all.json

Experiments (EXPERIMENTS below): `hyformer-table1` (HyFormer against LONGER+RankMixer and the unified Transformers,
arXiv 2601.12681 Table 1), `hyformer-table2` (its ablations: query sources, no global tokens, merged sequences),
`hhft` (arXiv 2511.20235: DLRM-MLP, shared-parameter Transformer, heterogeneous parameters), `hiformer` (arXiv
2311.05884: full, low-rank, pruned, both; with inference latency) and `scaling` (HyFormer's AUC against dense
parameters and FLOPs over width, depth and sequence side information).

Each row is a (tower, variant) trained on the first day of `--data` and tested on the second (2 ranks by default),
`--seeds` times; AUC and query-level AUC are mean ± standard error over seeds, the oracle AUC of the test day is
printed beside every table. Dense parameters and training MFLOPs per row come from models.accounting (every sequence
full); inference latency is the tower's forward alone on random inputs of the run's shapes, batch 512, median of
`--latency-repeats` (measured in this process after the runs, rows taking turns), at the run's width and at
`Experiment.latency_widen` times its d_model (untrained weights: latency does not depend on them; a saving that
grows with width is one a production-size tower would see). The config is
`jobs/configs/papers.toml` unless `--config` says otherwise: the default data without the target-match features,
so the towers have to learn the matching from the sequences themselves, which is what these papers are about.

Runs are recorded in `--json` (default `<out>/papers.json`, shared by all experiments: a row two experiments have,
such as HyFormer's base, is trained once), so a stopped experiment continues where it stopped.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    label: str
    model: str
    variant: str  # the run key (shared across experiments: the same variant name means the same settings)
    sets: tuple[str, ...] = ()
    series: str = ""  # scaling: which axis this row moves along


@dataclass(frozen=True)
class Experiment:
    title: str
    paper: str
    rows: tuple[Row, ...]
    expect: str  # the paper's ordering, to hold the measurement against
    plot: str = "bars"  # "bars" or "scaling"
    latency: bool = False
    latency_widen: int = 4  # latency also at this multiple of each row's d_model
    notes: list[str] = field(default_factory=list)


_HF = "hyformer"
EXPERIMENTS: dict[str, Experiment] = {
    "hyformer-table1": Experiment(
        "HyFormer against LONGER+RankMixer and unified Transformers", "HyFormer (arXiv 2601.12681) Table 1",
        (Row("HyFormer", _HF, "base"),
         Row("LONGER + RankMixer (BaseArch)", "longer_rankmixer", "base"),
         Row("unified: OneTrans w/ LONGER first layer", "onetrans", "unified_longer",
             ('model.options.first_layer="longer"',)),
         Row("unified: OneTrans w/ full Transformer", "onetrans", "unified_full",
             ('model.options.first_layer="full"',)),
         Row("full Transformer over all tokens", "transformer", "base")),
        "HyFormer > unified w/ full Transformer > unified w/ LONGER > BaseArch (LONGER + RankMixer)"),
    "hyformer-table2": Experiment(
        "HyFormer ablations: query sources, global tokens, merged sequences", "HyFormer (arXiv 2601.12681) Table 2",
        (Row("HyFormer", _HF, "base"),
         Row("queries w/o sequence pooling tokens", _HF, "query_nonseq", ('model.options.query_source="nonseq"',)),
         Row("queries from target features only", _HF, "query_target", ('model.options.query_source="target"',)),
         Row("w/o global tokens", _HF, "no_global_tokens", ("model.options.global_tokens=false",)),
         Row("merged sequences (shared queries)", _HF, "merge_sequences", ("model.options.merge_sequences=true",)),
         Row("LONGER + RankMixer w/ global tokens", "longer_rankmixer", "global_query",
             ("model.options.global_query=true",))),
        "every ablation below HyFormer; merged sequences and no global tokens cost the most"),
    "hhft": Experiment(
        "HHFT: heterogeneous against shared parameters", "HHFT (arXiv 2511.20235)",
        (Row("DLRM-MLP", "dlrm_mlp", "base"),
         Row("Transformer, parameters shared across blocks", "hhft", "shared", ("model.options.heterogeneous=false",)),
         Row("HHFT (heterogeneous parameters)", "hhft", "base")),
        "HHFT > shared-parameter Transformer > DLRM-MLP"),
    "hiformer": Experiment(
        "Hiformer: full, low-rank and pruned", "Hiformer (arXiv 2311.05884)",
        (Row("Hiformer, full rank, not pruned", "hiformer", "full", ("model.options.prune_last_layer=false",)),
         Row("Hiformer, low rank (r = 8)", "hiformer", "low_rank",
             ("model.options.rank=8", "model.options.prune_last_layer=false")),
         Row("Hiformer, low rank (r = 32)", "hiformer", "low_rank_32",
             ("model.options.rank=32", "model.options.prune_last_layer=false")),
         Row("Hiformer, last layer pruned", "hiformer", "base"),
         Row("Hiformer, low rank + pruned", "hiformer", "low_rank_pruned", ("model.options.rank=8",))),
        "low rank and pruning keep the AUC within noise of the full model and cut inference latency",
        latency=True),
    "scaling": Experiment(
        "HyFormer scaling: width, depth, sequence side information", "HyFormer (arXiv 2601.12681) scaling",
        (Row("d_model 48", _HF, "width_48", ("model.options.d_model=48",), "width"),
         Row("HyFormer (d_model 72, 2 layers)", _HF, "base", (), "width"),
         Row("d_model 144", _HF, "width_144", ("model.options.d_model=144",), "width"),
         Row("d_model 288", _HF, "width_288", ("model.options.d_model=288",), "width"),
         # the wider tower at the same dense lr trains slower (higher training loss by mid-day): Adam's lr scaled
         # as 1/width (muP's rule for hidden layers), 1e-3 x 72/288, tells an lr effect from a width one
         Row("d_model 288, dense lr 2.5e-4 (x 72/d_model)", _HF, "width_288_lr",
             ("model.options.d_model=288", "train.lr=2.5e-4"), "width, lr x 72/d_model"),
         Row("1 layer", _HF, "depth_1", ("model.options.num_layers=1",), "depth"),
         Row("3 layers", _HF, "depth_3", ("model.options.num_layers=3",), "depth"),
         Row("4 layers", _HF, "depth_4", ("model.options.num_layers=4",), "depth"),
         Row("no side information on sequences", _HF, "no_side",
             ("features.sequences.0.side=[]", "features.sequences.1.side=[]"), "side info")),
        "AUC rises with width and depth (log-linear in FLOPs in the paper) and with side information",
        plot="scaling"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", nargs="?", choices=sorted(EXPERIMENTS), help="which experiment")
    p.add_argument("--list", action="store_true", help="list the experiments and their rows")
    p.add_argument("--data", type=Path, default=REPO / "data" / "synth",
                   help="root of day=... folders: the first day trains, the second tests (hyrank gen-logs)")
    p.add_argument("--config", type=Path, default=REPO / "jobs" / "configs" / "papers.toml")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (0: one rank in the train process)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run (repeatable)")
    p.add_argument("--out", type=Path, default=Path("papers"), help="where <experiment>.md and .png go")
    p.add_argument("--json", type=Path, default=None, help="the runs' record (default: <out>/papers.json)")
    p.add_argument("--latency-repeats", type=int, default=20)
    p.add_argument("--timeout-s", type=float, default=None, help="a run longer than this is stopped and failed")


def _quality_args(args: argparse.Namespace, days: list[str]) -> argparse.Namespace:
    """What bench.quality's runner reads from its command line."""
    return argparse.Namespace(config=args.config, days=days[0], valid_days=None, eval_days=days[1],
                              overrides=[f'data.root="{args.data}"', *args.overrides], unsets=[], seeds=args.seeds,
                              nproc=args.nproc, runs_dir=None, json=args.json, timeout_s=args.timeout_s,
                              markdown=None)


def run(args: argparse.Namespace) -> int:
    from hyrank.bench.quality import aggregate, execute, finish, plan_seeds
    from hyrank.pipeline.data.days import discover_days

    if args.list or args.experiment is None:
        for name, e in EXPERIMENTS.items():
            print(f"{name}: {e.title} ({e.paper})")
            for r in e.rows:
                print(f"    {r.label:<45} {r.model} / {r.variant} {' '.join(r.sets)}")
        return 0
    exp = EXPERIMENTS[args.experiment]
    args.out.mkdir(parents=True, exist_ok=True)
    args.json = args.json or args.out / "papers.json"
    days = [d.label for d in discover_days(args.data)[:2]]
    if len(days) < 2:
        raise ValueError(f"--data {args.data}: needs two days (train, test); found {days}")
    qargs = _quality_args(args, days)
    plans = [p for r in exp.rows for p in plan_seeds(qargs, r.model, r.variant, list(r.sets))]
    runs = execute(qargs, plans)
    by_key = {(row["model"], row["variant"]): row for row in aggregate(runs)}
    rows = [{**by_key[(r.model, r.variant)], "label": r.label, "series": r.series} for r in exp.rows]
    if exp.latency:
        for row, (ms, wide_ms) in zip(rows, latencies(runs, exp, args.latency_repeats)):
            row["latency_ms"], row["latency_wide_ms"] = ms, wide_ms
    oracle = next((r["oracle_auc"] for r in rows if r.get("oracle_auc") is not None), None)
    table = format_rows(rows, exp)
    print(f"{exp.title} ({exp.paper}); train {days[0]}, test {days[1]}"
          + (f", oracle AUC {oracle:.4f}" if oracle else ""))
    print(table)
    md, png = args.out / f"{args.experiment}.md", args.out / f"{args.experiment}.png"
    md.write_text(markdown(args, exp, rows, days, oracle, png.name))
    plot(exp, rows, oracle, png)
    finish(qargs, runs, aggregate(runs))
    print(f"table: {md}\nplot: {png}")
    return 0 if all(r["status"] == "ok" for r in runs) else 1


def latencies(runs: list[dict], exp: Experiment, repeats: int) -> list[tuple[float | None, float | None]]:
    """Median ms of one forward of each row's tower (eval, no grad, batch 512) at its width and at
    `exp.latency_widen` times its d_model, every tower taking turns."""
    import torch

    from hyrank.models import build_model
    from hyrank.models.accounting import meta_inputs
    from hyrank.pipeline.config import load_config

    built: list[tuple[torch.nn.Module, object] | None] = []
    for r in exp.rows:
        run = next((x for x in runs if x["model"] == r.model and x["variant"] == r.variant and x["status"] == "ok"),
                   None)
        if run is None:
            built += [None, None]
            continue
        cfg = load_config(Path(run["out_dir"]) / "config.resolved.toml")
        shape = cfg.features.input_shape()
        x = meta_inputs(shape, 512, device="cpu")
        for t in [*x.blocks.values(), x.dense, *(s.values_BLD for s in x.sequences.values())]:
            t.data.normal_()
        torch.manual_seed(0)
        tower = build_model(cfg.model.name, cfg.model.options, shape).eval()
        wide = {**cfg.model.options, "d_model": exp.latency_widen * tower.d_model}
        built += [(tower, x), (build_model(cfg.model.name, wide, shape).eval(), x)]
    times: list[list[float]] = [[] for _ in built]
    with torch.no_grad():
        for rep in range(repeats + 2):
            for i, b in enumerate(built):
                if b is None:
                    continue
                start = time.perf_counter()
                b[0](b[1])
                if rep >= 2:  # two warm-up forwards
                    times[i].append((time.perf_counter() - start) * 1e3)
    medians = [statistics.median(t) if t else None for t in times]
    return list(zip(medians[::2], medians[1::2]))


def _pm(mean, se) -> str:
    from hyrank.bench.quality import _pm as pm

    return pm(mean, se)


def _cells(row: dict, exp: Experiment) -> list[str]:
    flops = row.get("train_flops_per_row")
    cells = [row["label"], str(len(row["seeds"])), _pm(row["auc"], row["auc_se"]),
             _pm(row["query_auc"], row["query_auc_se"]),
             "n/a" if row["dense_params"] is None else f"{row['dense_params']:,}",
             "n/a" if flops is None else f"{flops / 1e6:.2f}"]
    if exp.latency:
        cells += ["n/a" if row.get(k) is None else f"{row[k]:.2f}" for k in ("latency_ms", "latency_wide_ms")]
    return cells


def _head(exp: Experiment) -> list[str]:
    return (["row", "seeds", "AUC", "query-AUC", "dense params", "train MFLOPs/row"]
            + (["infer ms (batch 512)", f"infer ms, {exp.latency_widen}x d_model"] if exp.latency else []))


def format_rows(rows: list[dict], exp: Experiment) -> str:
    lines = [_head(exp)] + [_cells(r, exp) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


def markdown(args, exp: Experiment, rows: list[dict], days: list[str], oracle, png: str) -> str:
    head = _head(exp)
    cmd = (f"hyrank bench paper {args.experiment} --data {args.data} --seeds {args.seeds} --nproc {args.nproc}"
           + "".join(f" --set '{s}'" for s in args.overrides))
    out = [f"### {exp.title} ({exp.paper})", "", f"```bash\n{cmd}\n```", "",
           f"Config `{Path(args.config).name}`, train {days[0]}, test {days[1]}"
           + (f", oracle AUC **{oracle:.4f}**" if oracle else "") + f". The paper: {exp.expect}.", "",
           "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(_cells(r, exp)) + " |" for r in rows]
    out += ["", f"![{exp.title}]({png})", ""]
    return "\n".join(out)


def plot(exp: Experiment, rows: list[dict], oracle, path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ok = [r for r in rows if r["auc"] is not None]
    if exp.plot == "bars":
        fig = Figure(figsize=(8, 0.5 * len(ok) + 1.8))
        ax = fig.add_subplot()
        y = list(range(len(ok)))[::-1]
        ax.errorbar([r["auc"] for r in ok], y, xerr=[r["auc_se"] or 0 for r in ok], fmt="o", capsize=4)
        ax.set_yticks(y, [r["label"] for r in ok])
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.set_xlabel("test AUC (mean ± s.e. over seeds)")
        axes = [ax]
    else:  # AUC against training FLOPs and against dense parameters, one line per axis of scaling
        fig = Figure(figsize=(12, 4.5))
        axes = fig.subplots(1, 2, sharey=True)
        for ax, key, scale, xlabel in ((axes[0], "train_flops_per_row", 1e6, "training MFLOPs per row (fwd + bwd)"),
                                       (axes[1], "dense_params", 1e3, "dense parameters (thousands)")):
            for series in dict.fromkeys(r["series"] for r in ok):
                pts = sorted((r for r in ok if r["series"] == series or r["variant"] == "base"), key=lambda r: r[key])
                ax.errorbar([r[key] / scale for r in pts], [r["auc"] for r in pts],
                            yerr=[r["auc_se"] or 0 for r in pts], marker="o", capsize=3, label=series)
            for r in ok:
                ax.annotate(r["variant"], (r[key] / scale, r["auc"]), fontsize=7, textcoords="offset points",
                            xytext=(4, 4))
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
        axes[0].set_ylabel("test AUC (mean ± s.e.)")
        axes[0].legend()
    fig.suptitle(f"{exp.paper}" + (f" — oracle AUC {oracle:.4f}" if oracle else ""), fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)

