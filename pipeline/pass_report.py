"""The validation curve of a run that made several passes over bounded data: a CSV table and a PNG.

    report = write_pass_report(Path("runs/movielens"))   # runs/movielens/report/passes.csv and passes.png
    hyrank report runs/movielens                          # the same (and days.csv when the run has day files)

Rebuilt from the files rank 0 writes (pipeline/train/trainer.py):

    <run>/metrics/valid-pass-N.json     the validation span's metrics after pass N, and the checkpoint scored
    <run>/metrics/best.json             the pass kept (checkpoint.best_metric)
    <run>/train/pass-N-day-*.json       what training did in pass N, one file per day or span of small days

The plot shows validation AUC (and query-level AUC when the data has a group column) and validation logloss
beside the mean training loss of each pass, with the kept pass marked: where the two losses part is where the
model starts to memorise its training days.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from hyrank.pipeline.files import write_atomic

COLUMNS = ("pass", "steps", "train_loss", "valid_auc", "valid_query_auc", "valid_logloss", "checkpoint", "kept")
_VALID_FILE = re.compile(r"^valid-pass-(\d+)\.json$")
_TRAIN_FILE = re.compile(r"^pass-(\d+)-day-.+\.json$")


@dataclass
class PassReport:
    csv_path: Path
    png_path: Path
    rows: list[dict]


def write_pass_report(run_dir: Path) -> PassReport | None:
    """Rebuild `<run>/report/passes.csv` and `passes.png`; None when the run has no validated pass."""
    run_dir = Path(run_dir)
    valid = _numbered(run_dir / "metrics", _VALID_FILE)
    if not valid:
        return None
    steps: dict[int, int] = {}
    loss_sum: dict[int, float] = {}
    for n, data in _numbered(run_dir / "train", _TRAIN_FILE, many=True):
        losses = [v for v in data.get("losses", []) if isinstance(v, (int, float))]
        steps[n] = steps.get(n, 0) + len(losses)
        loss_sum[n] = loss_sum.get(n, 0.0) + sum(losses)
    best_file = run_dir / "metrics" / "best.json"
    kept = json.loads(best_file.read_text()).get("pass") if best_file.is_file() else None
    rows = []
    for n, v in valid:
        rows.append({"pass": n, "steps": steps.get(n), "train_loss": loss_sum[n] / steps[n] if steps.get(n) else None,
                     "valid_auc": v.get("auc"), "valid_query_auc": v.get("query_auc"),
                     "valid_logloss": v.get("logloss"), "checkpoint": v.get("checkpoint"),
                     "kept": kept is not None and n == kept + 1})
    out = run_dir / "report"
    report = PassReport(out / "passes.csv", out / "passes.png", rows)
    write_atomic(report.csv_path, _csv_text(rows))
    fig = _figure(rows, run_dir.resolve().name)
    write_atomic(report.png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return report


def _numbered(folder: Path, pattern: re.Pattern, *, many: bool = False) -> list[tuple[int, dict]]:
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        match = pattern.match(path.name)
        if match:
            try:
                found.append((int(match.group(1)), json.loads(path.read_text())))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
    return sorted(found, key=lambda item: item[0]) if not many else found


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow(["" if r[c] is None else f"{r[c]:.6f}" if isinstance(r[c], float) else r[c] for c in COLUMNS])
    return buf.getvalue()


def _figure(rows: list[dict], run_name: str):
    from matplotlib.figure import Figure

    passes = [r["pass"] for r in rows]

    def series(name: str) -> list[float]:
        return [math.nan if r[name] is None else r[name] for r in rows]

    fig = Figure(figsize=(9, 6.5), layout="constrained")
    auc_ax, loss_ax = fig.subplots(2, 1, sharex=True)
    auc_ax.plot(passes, series("valid_auc"), marker="o", color="tab:blue", label="validation AUC")
    if any(r["valid_query_auc"] is not None for r in rows):
        auc_ax.plot(passes, series("valid_query_auc"), marker="o", color="tab:purple", label="validation query-AUC")
    loss_ax.plot(passes, series("valid_logloss"), marker="o", color="tab:red", label="validation logloss")
    loss_ax.plot(passes, series("train_loss"), marker="o", linestyle="--", color="tab:orange",
                 label="training loss (mean of the pass)")
    for r in rows:
        if r["kept"]:
            for ax in (auc_ax, loss_ax):
                ax.axvline(r["pass"], color="tab:green", alpha=0.5, label=f"kept: pass {r['pass']}")
    for ax, label in ((auc_ax, "AUC"), (loss_ax, "logloss")):
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    loss_ax.set_xlabel("pass")
    loss_ax.set_xticks(passes)
    fig.suptitle(f"{run_name}: validation after each pass")
    return fig
