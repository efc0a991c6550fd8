"""A published model: what a serving process loads, without hyrank's training code or the training world.

    artifact = Artifact.load("exports/default")          # the version `latest` names (or a version folder itself)
    probs = artifact.score_rows([{"user_id": 3, ...}])   # raw rows in the feature-spec format -> P(click)
    probs = artifact.score_table(table)                  # the same from an Arrow table (batch scoring)

An artifact folder (`<root>/versions/<version>/`, written by pipeline/serving/export.py) holds:
  model.pt2      a torch.export program: model inputs (the converter's tensors) -> logits, dynamic batch size
  manifest.json  model name and options, the feature spec and the Arrow types of its columns, days trained,
                 metrics, the stack's versions, the git commit, the parity check it passed, sha256 of every file;
                 with managed tables their names and fallback row (pipeline/serving/managed.py)
or, for a delta version (pipeline/serving/delta.py), delta.pt instead of model.pt2: the tensors that changed since
the base version its manifest names (with the sha256 of the base's manifest); loading loads the base and applies it.

Requests go through the training path: raw rows (or an Arrow request) -> the Arrow types training read
(pipeline/serving/rows.py: a value of a type training refuses for its column is refused with the words check_schema
gives a log file) -> validate_rows (the same checks, and the same reasons, as the training reader's) ->
BatchConverter (id hashing and OOV policy, dense normalisation, sequence truncation and order) -> the exported
program. Nothing is re-implemented for serving, so there is no training/serving skew to drift in. Loading verifies
every file's sha256 before torch.export reads it; a version on object storage (and each base of a delta there) is
downloaded first, and the download is what is verified and loaded.

Imports torch, torchrec (the program holds torchrec's ops) and pipeline.data, never pipeline.train
(tests/test_layering.py).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from hyrank.pipeline.data.convert import BatchConverter
from hyrank.pipeline.data.features import FeatureSpec
from hyrank.pipeline.files import sha256
from hyrank.pipeline.serving.delta import DELTA, DeltaBaseError, apply_delta, load_delta, state_of
from hyrank.pipeline.serving.rows import BadRows, RowSchema, explain
from hyrank.pipeline.storage import S3Path, local_copy, location

MANIFEST = "manifest.json"
PROGRAM = "model.pt2"
FORMAT_VERSION = 1  # a model of plain tables, whole
FORMAT_MANAGED_OR_DELTA = 2  # managed tables (two more inputs and outputs) or a delta: older code refuses it
FORMATS_READ = (FORMAT_VERSION, FORMAT_MANAGED_OR_DELTA)
MAX_CHAIN = 64  # deltas on deltas a load follows at most (stream --export-delta keeps chains far shorter)
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
    def load(cls, path: str | Path | S3Path, *, bases: Path | S3Path | None = None) -> Artifact:
        """The artifact at `path`: a version folder, or a publish root whose `latest` names one (on object storage:
        downloaded, then verified and loaded like a local folder). A delta's bases lie beside it, or in `bases`."""
        path = resolve(path)
        manifest, program = load_version(path, bases)
        rows = RowSchema.of(manifest, source=str(path / MANIFEST))
        return cls(path, manifest, program.module(), rows)

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

    def valid_logits(self, table: pa.Table, *, id_max: Mapping[str, int] | None = None) -> torch.Tensor:
        return self.valid_outputs(table, id_max=id_max).logits

    @property
    def managed_tables(self) -> list[str]:
        """The managed tables whose ids the program counts (pipeline/serving/managed.py), in its column order."""
        return self.manifest.get("managed", {}).get("tables", [])

    @torch.no_grad()
    def valid_outputs(self, table: pa.Table, *, id_max: Mapping[str, int] | None = None) -> Outputs:
        """valid_logits, with a model of managed tables also the (B, T) ids looked up and ids without a slot."""
        table = self.rows.with_neutral_columns(table)
        if table.num_rows == 1:  # torch.export specialises sizes 0 and 1 away from a dynamic batch size: a lone row
            two = self.valid_outputs(pa.concat_tables([table, table]), id_max=id_max)  # is scored beside a copy
            return Outputs(*(None if t is None else t[:1] for t in two))
        out = self.program(*model_inputs(self._converter(table, source="request", id_max=id_max)))
        return Outputs(out[0].float(), out[1], out[2]) if isinstance(out, tuple) else Outputs(out.float())


class Outputs(NamedTuple):
    logits: torch.Tensor  # (B,)
    managed_ids: torch.Tensor | None = None  # (B, T) ids of each managed table looked up per row
    unknown_ids: torch.Tensor | None = None  # (B, T) of those, the ids without a slot (they read the fallback row)


def read_manifest(path: Path | S3Path, local: Path) -> dict[str, Any]:
    """A version folder's manifest, its format checked and every file it names verified against its sha256; the
    files read are `local`'s (storage.local_copy: `path` itself, or its download, which the errors name)."""
    manifest = json.loads((local / MANIFEST).read_text())
    if manifest.get("format") not in FORMATS_READ:
        raise ValueError(f"{path / MANIFEST}: artifact format {manifest.get('format')}, this code reads "
                         f"{', '.join(map(str, FORMATS_READ))}")
    for name, digest in manifest["files"].items():
        if sha256(local / name) != digest:
            raise ValueError(f"{path / name} does not match the sha256 in its manifest: the artifact is damaged")
    return manifest


def load_version(path: Path | S3Path, bases: Path | S3Path | None = None,
                 ) -> tuple[dict[str, Any], torch.export.ExportedProgram]:
    """A version's manifest (verified: read_manifest) and program (load_program). On object storage the version is
    downloaded first and the download verified and loaded, so the bytes checked are the bytes loaded."""
    with local_copy(path) as local:
        manifest = read_manifest(path, local)
        return manifest, load_program(path, manifest, local, bases=bases)


def load_program(path: Path | S3Path, manifest: dict[str, Any], local: Path, *, bases: Path | S3Path | None = None,
                 depth: int = 0) -> torch.export.ExportedProgram:
    """A version's exported program, its files read from `local` (as read_manifest); a delta's
    (pipeline/serving/delta.py) is its base's, loaded the same way (downloaded and verified on object storage; a base
    may be a delta itself) and checked, with the delta applied. Bases lie in `bases`, by default beside `path` (an
    export's staging folder for a root on object storage is a local one: its bases are the root's versions/).
    DeltaBaseError if the base is not there, not the version the delta was made on, or damaged."""
    delta = manifest.get("delta")
    if delta is None:
        with _LOADING:
            return torch.export.load(str(local / PROGRAM))
    base = (path.parent if bases is None else bases) / str(delta["base"])
    if depth > MAX_CHAIN:
        raise DeltaBaseError(f"{path}: more than {MAX_CHAIN} deltas lie on each other: not loaded (export one in full)")
    if not re.fullmatch(r"[\w.-]+", str(delta["base"])) or not (base / MANIFEST).is_file():
        raise DeltaBaseError(f"{path} is a delta of {delta['base']!r}, which is not a version published beside it "
                             f"({base}): it cannot be loaded")
    try:
        with local_copy(base) as base_local:  # the base manifest's sha256 is checked on the bytes then loaded
            if sha256(base_local / MANIFEST) != delta["base_manifest_sha256"]:
                raise DeltaBaseError(f"{path} is a delta of {base}, whose manifest is not the one the delta was made "
                                     "on (its sha256 differs): the base was damaged or replaced")
            program = load_program(base, read_manifest(base, base_local), base_local, depth=depth + 1)
    except DeltaBaseError:
        raise
    except (ValueError, OSError, RuntimeError) as e:
        raise DeltaBaseError(f"{path} is a delta of {base}, which does not load: {e}") from e
    apply_delta(state_of(program), load_delta(local / DELTA))
    return program


def model_inputs(batch) -> tuple[torch.Tensor, ...]:
    """The exported program's inputs, from a Batch: pooled ids and lengths, sequence ids and lengths, dense; with
    managed tables also their raw ids and lengths (the managed pooled keys, then the managed sequence keys)."""
    plain = (batch.pooled.values(), batch.pooled.lengths(), batch.sequence.values(), batch.sequence.lengths(),
             batch.dense)
    managed = [kjt for kjt in (batch.managed_pooled, batch.managed_sequence) if kjt is not None]
    if not managed:
        return plain
    return plain + (torch.cat([k.values() for k in managed]), torch.cat([k.lengths() for k in managed]))


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
