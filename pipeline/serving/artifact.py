"""A published model: what a serving process loads, without hyrank's training code or the training world.

    artifact = Artifact.load("exports/default")          # the version `latest` names (or a version folder itself)
    probs = artifact.score_rows([{"user_id": 3, ...}])   # raw rows in the feature-spec format -> P(click)
    probs = artifact.score_table(table)                  # the same from an Arrow table (batch scoring)

An artifact folder (`<root>/versions/<version>/`, written by pipeline/serving/export.py) holds:
  model.pt2      a torch.export program: model inputs (the converter's tensors) -> logits, dynamic batch size
  manifest.json  model name and options, the feature spec and the Arrow types of its columns, days trained,
                 metrics, the stack's versions, the git commit, the parity check it passed, sha256 of every file

Requests go through the training path: raw rows (or an Arrow request) -> the Arrow types training read
(pipeline/serving/rows.py: a value of a type training refuses for its column is refused with the words check_schema
gives a log file) -> validate_rows (the same checks, and the same reasons, as the training reader's) ->
BatchConverter (id hashing and OOV policy, dense normalisation, sequence truncation and order) -> the exported
program. Nothing is re-implemented for serving, so there is no training/serving skew to drift in. Loading verifies
every file's sha256 before torch.export reads it.

Imports torch, torchrec (the program holds torchrec's ops) and pipeline.data, never pipeline.train
(tests/test_layering.py).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import torch

from hyrank.pipeline.data.convert import BatchConverter
from hyrank.pipeline.data.features import FeatureSpec
from hyrank.pipeline.files import sha256
from hyrank.pipeline.serving.rows import BadRows, RowSchema, explain
from hyrank.pipeline.storage import S3Path, local_copy, location

MANIFEST = "manifest.json"
PROGRAM = "model.pt2"
FORMAT_VERSION = 1
# torch.export.load deserializes through one global of torch's (_CURRENT_DESERIALIZER): two loads at once in one
# process (two servers' loader threads) fail one of them with "already set"
_LOADING = threading.Lock()


class NoSuchVersion(FileNotFoundError):
    """A publish root's `latest` names no published version (a broken publish, or a hand edit)."""

    def __init__(self, pointer: Path, name: str):
        super().__init__(f"{pointer} names {name!r}, which is not a published version under {pointer.parent}")
        self.pointer, self.name = pointer, name


@dataclass
class Artifact:
    path: Path | S3Path
    manifest: dict[str, Any]
    program: torch.nn.Module
    rows: RowSchema  # what a request row holds, and the checks it goes through

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def spec(self) -> FeatureSpec:
        return self.rows.spec

    @property
    def schema(self) -> pa.Schema:  # of the spec's columns, as training read them
        return self.rows.schema

    @property
    def features(self) -> list[str]:  # the columns a request row carries (RowSchema.features)
        return self.rows.features

    def __post_init__(self) -> None:
        self._converter = BatchConverter(self.spec)  # holds no state between calls: one for every batch

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        """The artifact at `path`: a version folder, or a publish root whose `latest` names one."""
        path = resolve(path)
        with local_copy(path) as local:  # on object storage: a download, verified here like a local folder
            manifest = json.loads((local / MANIFEST).read_text())
            if manifest.get("format") != FORMAT_VERSION:
                raise ValueError(f"{path / MANIFEST}: artifact format {manifest.get('format')}, this code reads "
                                 f"{FORMAT_VERSION}")
            for name, digest in manifest["files"].items():
                if sha256(local / name) != digest:
                    raise ValueError(f"{path / name} does not match the sha256 in its manifest: the artifact is "
                                     "damaged")
            rows = RowSchema.of(manifest, source=str(path / MANIFEST))
            with _LOADING:
                program = torch.export.load(str(local / PROGRAM)).module()
        return cls(path, manifest, program, rows)

    # -- scoring -------------------------------------------------------------------------------------------------

    def score_rows(self, rows: list[dict[str, Any]], *, max_rows: int = 0) -> np.ndarray:
        """P(click) of each raw row (a dict of feature -> value); BadRows names every bad field of every row."""
        return self.score_table(self.table_of(rows, max_rows=max_rows))

    def table_of(self, rows: list[dict[str, Any]], *, max_rows: int = 0) -> pa.Table:
        """Raw request rows as an Arrow table of the training types; BadRows if a row is not a row of the spec."""
        return self.rows.table_of(rows, max_rows=max_rows)

    def bad_rows(self, table: pa.Table) -> dict[int, str]:
        """{row: "field 'x': reason"} for every row of `table` the training reader's validation refuses (the same
        checks and reasons)."""
        return self.rows.bad_rows(table)

    def score_table(self, table: pa.Table) -> np.ndarray:
        """P(click) of every row of `table` (the spec's feature columns); BadRows names the rows validation
        refuses, with the reason, as the training reader would have counted them."""
        return torch.sigmoid(self.logits(table)).numpy()

    def logits(self, table: pa.Table) -> torch.Tensor:
        verdict = self.rows.verdict(table)
        if verdict.num_bad:
            raise BadRows([f"row {r}: {problem}" for r, problem in explain(verdict).items()])
        return self.valid_logits(table, id_max=verdict.id_max)

    def score_valid(self, table: pa.Table, *, id_max: Mapping[str, int] | None = None) -> np.ndarray:
        """score_table of rows validation has passed already (the scoring server validates a whole batch once,
        then scores its good requests): no second validation pass. `id_max`: the verdict's bounds, which spare
        the converter its own pass over the ids."""
        return torch.sigmoid(self.valid_logits(table, id_max=id_max)).numpy()

    @torch.no_grad()
    def valid_logits(self, table: pa.Table, *, id_max: Mapping[str, int] | None = None) -> torch.Tensor:
        table = self.rows.with_neutral_columns(table)
        if table.num_rows == 1:  # torch.export specialises sizes 0 and 1 away from a dynamic batch size: a lone row
            return self.valid_logits(pa.concat_tables([table, table]), id_max=id_max)[:1]  # is scored beside a copy
        return self.program(*model_inputs(self._converter(table, source="request", id_max=id_max))).float()


def model_inputs(batch) -> tuple[torch.Tensor, ...]:
    """The exported program's inputs, from a Batch: pooled ids and lengths, sequence ids and lengths, dense."""
    return (batch.pooled.values(), batch.pooled.lengths(), batch.sequence.values(), batch.sequence.lengths(),
            batch.dense)


def resolve(path: str | Path | S3Path) -> Path | S3Path:
    """A version folder, or the one a publish root's `latest` names (never a path out of the root)."""
    path = location(path)
    if (path / MANIFEST).is_file():
        return path
    pointer = path / "latest"
    if not pointer.is_file():
        raise FileNotFoundError(f"{path}: neither an artifact (no {MANIFEST}) nor a publish root (no latest)")
    name = pointer.read_text().strip()
    if not re.fullmatch(r"[\w.-]+", name) or not (path / "versions" / name / MANIFEST).is_file():
        raise NoSuchVersion(pointer, name)
    return path / "versions" / name
