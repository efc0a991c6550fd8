"""Batch scoring of logs with a published artifact (not the trainer): `hyrank predict`.

    hyrank predict --artifact exports/default --data data/synth --days 2026-11-04 --out scores.parquet
    result = predict(Artifact.load("exports/default"), "data/synth", DayRange.parse("2026-11-04"), "scores.parquet")

Every day's files are read in file order, rows in file order, and scored through the serving path of
pipeline/serving/artifact.py (the training reader's validation, the training converter, the exported program), so
a row gets the probability the server would give it. The output has one row per input row, in input order:
the key columns (default: the spec's query id column, when the logs have one), `day`, `file` (relative to the data
root), `row` (its index in the file), `probability` (float32) and `problem`. A row validation refuses is kept and
marked, never dropped silently: `probability` null and `problem` naming the field and the reason
("field 'user_id': negative_id"); the result counts them and lists the first few. The file is written atomically
(pipeline/files.py): a reader sees the whole output or none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hyrank.pipeline.data.days import DayRange, discover_days
from hyrank.pipeline.files import write_atomic
from hyrank.pipeline.serving.artifact import Artifact
from hyrank.pipeline.storage import location, open_input

log = logging.getLogger(__name__)

POSITION = ("day", "file", "row")  # the columns that place an output row in the input
FIRST_PROBLEMS = 10


@dataclass
class PredictResult:
    out: Path
    rows: int = 0
    bad: int = 0  # rows marked (probability null, problem set)
    files: int = 0
    days: list[str] = field(default_factory=list)
    first_problems: list[str] = field(default_factory=list)  # "<file> row N: field 'x': reason", the first few


def predict(artifact: Artifact, data_root: str | Path, days: DayRange, out: str | Path, *,
            keys: list[str] | None = None, partition_key: str = "day", batch_rows: int = 65536) -> PredictResult:
    """Score every row of the complete days of `days` under `data_root` into the Parquet file `out`."""
    data_root, out = location(data_root), location(out)  # local paths or s3://
    found = discover_days(data_root, days, partition_key=partition_key)
    if not found:
        raise FileNotFoundError(f"no complete day in {days} under {data_root} (partition key {partition_key!r})")
    keys = ([artifact.spec.group] if artifact.spec.group else []) if keys is None else keys
    clash = [k for k in keys if k in POSITION or k in ("probability", "problem")]
    if clash:
        raise ValueError(f"--key {clash[0]!r}: the output has a column of that name already")
    result = PredictResult(out)

    def write(tmp: Path) -> None:
        writer = None
        for day in found:
            result.days.append(str(day.day))
            for path in day.files:
                for table in _scored_batches(artifact, path, data_root, str(day.day), keys, batch_rows, result):
                    writer = writer or pq.ParquetWriter(tmp, table.schema)
                    writer.write_table(table)
                result.files += 1
        if writer is None:
            raise FileNotFoundError(f"no Parquet file in the days {', '.join(result.days)} under {data_root}")
        writer.close()

    write_atomic(out, write)
    if result.bad:
        log.warning("%d of %d rows could not be scored (marked in column 'problem'); first: %s", result.bad,
                    result.rows, "; ".join(result.first_problems[:3]))
    return result


def _scored_batches(artifact: Artifact, path: Path, data_root: Path, day: str, keys: list[str], batch_rows: int,
                    result: PredictResult):
    """The output rows of one file, a batch of `batch_rows` at a time, in file order."""
    parquet = pq.ParquetFile(open_input(path))
    columns = list(dict.fromkeys(artifact.features + keys))  # a key may be a feature too: read it once
    missing = [c for c in columns if c not in parquet.schema_arrow.names]
    if missing:
        raise ValueError(f"{path}: no column {missing[0]!r} (the artifact's features and --key columns are read)")
    name = str(path.relative_to(data_root))
    first = 0
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
        table = pa.Table.from_batches([batch])
        n = table.num_rows
        problems = artifact.bad_rows(table.select(artifact.features))
        good = np.ones(n, dtype=bool)
        good[list(problems)] = False
        probs = np.zeros(n, dtype=np.float32)
        if good.any():
            probs[good] = artifact.score_table(table.select(artifact.features).filter(pa.array(good)))
        for r, why in list(problems.items())[:max(0, FIRST_PROBLEMS - len(result.first_problems))]:
            result.first_problems.append(f"{name} row {first + r}: {why}")
        columns = {k: table.column(k) for k in keys}
        columns.update(day=pa.array([day] * n, pa.string()), file=pa.array([name] * n, pa.string()),
                       row=pa.array(np.arange(first, first + n, dtype=np.int64)),
                       probability=pa.array(probs, type=pa.float32(), mask=~good),
                       problem=pa.array([problems.get(r) for r in range(n)], pa.string()))
        result.rows += n
        result.bad += len(problems)
        first += n
        yield pa.table(columns)
