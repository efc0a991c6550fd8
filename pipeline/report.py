"""The daily run report: one row per day of a run, as a CSV table and a PNG a person can look at.

    report = write_report(Path("runs/stream"))   # rebuilds runs/stream/report/days.csv and days.png
    print(report.table())
    hyrank report runs/stream                    # the same from the command line

It is rebuilt from the files rank 0 of a run writes after each day, so it can be rerun at any time (after every
day of `hyrank stream`, or by hand on a finished run) and always shows the whole run:

    <run>/train/day-YYYY-MM-DD.json          what training on the day did (DayStats.to_dict)
    <run>/metrics/progressive-YYYY-MM-DD.json the model's metrics on the day *before* it trained on it; "metrics"
                                              is null on the first day of a fresh run (no model yet)

A value no file holds (a legacy train file without rows_per_s, a day evaluated but not yet trained, a NaN metric)
is an empty cell and a gap in the plot, never a zero.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

from hyrank.pipeline.files import write_atomic

COLUMNS = ("day", "rows", "steps", "rows_per_s", "progressive_auc", "query_auc", "logloss", "calibration",
           "oracle_auc", "bad_rows")
# cell format per column: counts are integers, throughput is rounded as DayStats rounds it, and metrics keep six
# decimals (AUC moves that matter in CTR ranking are in the third and fourth)
_FORMATS = {"rows": "d", "steps": "d", "bad_rows": "d", "rows_per_s": ".1f"}
_METRIC_FORMAT = ".6f"
_TRAIN_FILE = re.compile(r"^day-(\d{4}-\d{2}-\d{2})\.json$")
_METRICS_FILE = re.compile(r"^progressive-(\d{4}-\d{2}-\d{2})\.json$")


@dataclass
class DayRow:
    """One day of the run; None where no file says (not yet trained, not evaluated, legacy file, NaN)."""

    day: str
    rows: int | None = None
    steps: int | None = None
    rows_per_s: float | None = None
    progressive_auc: float | None = None
    query_auc: float | None = None
    logloss: float | None = None
    calibration: float | None = None
    oracle_auc: float | None = None
    bad_rows: int | None = None  # total over the reasons

    def cells(self) -> list[str]:
        """The row as CSV cells, in COLUMNS order; empty where unknown."""
        out = []
        for name in COLUMNS:
            value = getattr(self, name)
            if name == "day" or value is None:
                out.append("" if value is None else value)
            else:
                out.append(format(value, _FORMATS.get(name, _METRIC_FORMAT)))
        return out


assert tuple(f.name for f in fields(DayRow)) == COLUMNS  # the CSV header and the row fields cannot drift apart


@dataclass
class Report:
    run_dir: Path
    csv_path: Path
    png_path: Path
    rows: list[DayRow]

    def table(self) -> str:
        """The rows as an aligned text table, for a terminal."""
        lines = [list(COLUMNS)] + [r.cells() for r in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def write_report(run_dir: Path) -> Report:
    """Rebuild `<run>/report/days.csv` and `days.png` from the run's day files, each replaced atomically."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    rows = read_days(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}: no day files to report on (train/day-YYYY-MM-DD.json or "
                         "metrics/progressive-YYYY-MM-DD.json); is it the out_dir of a run that finished a day?")
    out = run_dir / "report"
    report = Report(run_dir, out / "days.csv", out / "days.png", rows)
    write_atomic(report.csv_path, _csv_text(rows))
    fig = _figure(rows, run_dir.resolve().name)
    write_atomic(report.png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return report


def read_days(run_dir: Path) -> list[DayRow]:
    """One row per day that has a train file or a progressive-metrics file, sorted by day."""
    rows: dict[str, DayRow] = {}
    for day, data in _day_files(run_dir / "train", _TRAIN_FILE):
        row = rows.setdefault(day, DayRow(day))
        row.rows, row.steps = _count(data.get("rows")), _count(data.get("steps"))
        row.rows_per_s = _number(data.get("rows_per_s"))  # absent in files older than the field
        bad = data.get("bad_rows")
        row.bad_rows = sum(int(n) for n in bad.values()) if isinstance(bad, dict) else None
    for day, data in _day_files(run_dir / "metrics", _METRICS_FILE):
        row = rows.setdefault(day, DayRow(day))
        m = data.get("metrics") or {}  # null before the run has a model: the day is listed, its metrics unknown
        row.progressive_auc, row.query_auc = _number(m.get("auc")), _number(m.get("query_auc"))
        row.logloss, row.calibration = _number(m.get("logloss")), _number(m.get("calibration"))
        row.oracle_auc = _number(m.get("oracle_auc"))
    return [rows[day] for day in sorted(rows)]


def _day_files(folder: Path, pattern: re.Pattern) -> list[tuple[str, dict]]:
    # the name, not a glob, decides: write_atomic's `.tmp` siblings and other files in the folder are not days
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        match = pattern.match(path.name)
        if not match:
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
        found.append((match.group(1), data))
    return found


def _number(value) -> float | None:
    # json reads the NaN that json.dumps writes for a query AUC with no two-class query: unknown, not a value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _count(value) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def _csv_text(rows: list[DayRow]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(r.cells() for r in rows)
    return buf.getvalue()


def _figure(rows: list[DayRow], run_name: str):
    """Progressive AUC (with the oracle's), logloss and train rows/s over the days, on one shared date axis."""
    # imported here: matplotlib costs about half a second, which `hyrank --help` and the trainer need not pay.
    # A bare Figure renders with Agg on savefig and never touches pyplot, so no display, no global backend
    # switch in a caller that has one (a notebook), and no figure left open in pyplot's registry.
    import matplotlib.dates as mdates
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    days = [dt.date.fromisoformat(r.day) for r in rows]

    def series(name: str) -> list[float]:
        return [math.nan if getattr(r, name) is None else getattr(r, name) for r in rows]  # NaN: a gap

    fig = Figure(figsize=(10, 8.5), layout="constrained")
    auc_ax, loss_ax, speed_ax = fig.subplots(3, 1, sharex=True)
    panels = [
        (auc_ax, "AUC", [("progressive_auc", "progressive AUC (before training on the day)", "-", "tab:blue"),
                         ("oracle_auc", "oracle AUC (true click probability)", "--", "tab:gray")]),
        (loss_ax, "logloss", [("logloss", "progressive logloss", "-", "tab:red")]),
        (speed_ax, "train rows/s", [("rows_per_s", "train rows/s", "-", "tab:green")]),
    ]
    for ax, ylabel, lines in panels:
        plotted = False
        for name, label, style, color in lines:
            values = series(name)
            if all(math.isnan(v) for v in values):
                continue  # e.g. no oracle on real logs: no empty legend entry
            # markers: a day between two gaps is a lone point that a bare line would not draw
            ax.plot(days, values, linestyle=style, marker="o", markersize=4, color=color, label=label)
            plotted = True
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if plotted:
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, "no values yet", transform=ax.transAxes, ha="center", va="center", color="gray")
    speed_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    speeds = [r.rows_per_s for r in rows if r.rows_per_s is not None]
    if speeds:  # throughput read against zero, so a dip is not exaggerated; headroom keeps the top point inside
        speed_ax.set_ylim(0, max(max(speeds) * 1.15, 1.0))
    # one tick per day up to ~14 days, then every k-th day; half a day of padding each side frames also a single
    # day, and keeps the ticks on the run's own days
    span = (days[-1] - days[0]).days + 1
    speed_ax.xaxis.set_major_locator(mdates.DayLocator(interval=max(1, math.ceil(span / 14))))
    speed_ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    speed_ax.set_xlim(mdates.date2num(days[0]) - 0.5, mdates.date2num(days[-1]) + 0.5)
    speed_ax.tick_params(axis="x", labelrotation=30)
    for label in speed_ax.get_xticklabels():
        label.set_horizontalalignment("right")
    speed_ax.set_xlabel("day")
    fig.suptitle(f"{run_name}: {len(rows)} day(s), {rows[0].day} .. {rows[-1].day}")
    return fig
