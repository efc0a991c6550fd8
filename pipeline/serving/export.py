"""Export a checkpoint to serving: one self-contained, verified artifact, published atomically.

    hyrank export --checkpoint runs/default/checkpoints/step-000002344 --out exports/default
    result = export_checkpoint(checkpoint, out_dir)     # -> ExportResult(path, version, parity)

Steps, in one process with no process group: the checkpoint's files are checked against their sha256; its
resolved config rebuilds the model unsharded and DCP loads the weights into it (DCP reshards: a checkpoint written
by any number of ranks loads whole tables here); `torch.export` traces model inputs -> logits with a dynamic batch
size; the artifact (pipeline/serving/artifact.py) is written into a temporary version folder and *loaded back the
way a server loads it*; held-out rows are scored through that loaded artifact (raw rows -> validation -> the
training converter -> program) and by the eager model, and the largest logit difference must be within the
parity tolerance (1e-5 for fp32 tables). Then the quality gate: the version `latest` names is scored on the same
rows, and a model whose AUC falls more than the margin below it is refused (skipping the gate is an explicit choice,
recorded in the manifest and the root's history). Only then is the version folder renamed into place and `latest`
repointed; a failed gate leaves nothing published. Versions are named `<run id>-step-N` and never rewritten: the
same checkpoint exported again is left as published (pipeline/serving/publish.py). With `delta_from` the version
holds only what changed since a published one (pipeline/serving/delta.py), and the gates score it as a server loads
it: its base, then the delta. Managed tables: pipeline/serving/managed.py (the remap rebuilt whole, eval mode,
unknown ids counted and read as a zero row).

Trust: a checkpoint is code (DCP unpickles it). It is loaded when it lies where its own run keeps it (a step-N folder
of the checkpoint folder its config names), else only with trust_checkpoint (`--trust-checkpoint`), as `train
--resume` loads only checkpoints of its run.

Serving stacks: `model.pt2` is a `torch.export` ExportedProgram (torch.export.load in any Python process with
torch, torchrec and fbgemm installed: the FastAPI server of this package, or a Python TorchServe-like stack). An
AOTInductor-compiled package for a C++ runtime (`model.aoti.pt2`, loadable in Python with
torch._inductor.aoti_load_package) is the same program put through `torch._inductor.aoti_compile_and_package`:
`--aoti` builds it under the same parity gate (about a minute and a half for a small model on CPU, so not by
default; fp32 tables only: AOTI trips on fbgemm's bounds check of quantized tables with torchrec 1.8). Tables too
big for one host are out of scope: such a model would be exported as per-shard table files beside a dense
program, with the lookup served by a sharded embedding service (the checkpoint's sharding plan names the shards).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch._inductor
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec import KeyedJaggedTensor

from hyrank.embeddings.versions import installed_versions
from hyrank.models import build_model
from hyrank.pipeline.config import RunConfig, from_dict, to_dict
from hyrank.pipeline.data.convert import BatchConverter
from hyrank.pipeline.data.days import DayPartition, discover_days
from hyrank.pipeline.data.validate import validate_rows
from hyrank.pipeline.files import sha256, write_json
from hyrank.pipeline.metrics import auc
from hyrank.pipeline.ranker import RankingModel
from hyrank.pipeline.serving.artifact import (FORMAT_MANAGED_OR_DELTA, FORMAT_VERSION, MANIFEST, PROGRAM, Artifact,
                                              load_version, model_inputs)
from hyrank.pipeline.serving.delta import DELTA, DeltaBaseError, DeltaMismatch, describe, make_delta, state_of
from hyrank.pipeline.serving.managed import (FALLBACK, ManagedScoringModule, load_loaded, load_template,
                                             managed_tables)
from hyrank.pipeline.serving.publish import (QUALITY_MARGIN, NotPublished, VersionTaken, publish, published_manifest,
                                             record, staging_folder, version_name, who)
from hyrank.pipeline.serving.quantize import quantize_tables
from hyrank.pipeline.storage import location, open_input
from hyrank.pipeline.train.checkpoint import CheckpointMeta, dcp_args, verified_in_its_run

log = logging.getLogger(__name__)

Tables = Literal["fp32", "fp16", "int8"]
AOTI_PROGRAM = "model.aoti.pt2"
PARITY_TOLERANCE = 1e-5  # the program against the eager model with the same tables: the same arithmetic
# what quantized tables may cost against fp32 on the held-out rows (measured on the default model: fp16 moves
# logits by ~4e-4 and the AUC by < 1e-4, int8 by ~3e-3 and ~2e-4)
QUANTIZATION_BOUNDS = {"fp16": {"logit": 1e-2, "auc": 1e-3}, "int8": {"logit": 5e-2, "auc": 1e-3}}


class ParityError(NotPublished):
    """The exported program does not score like the trained model: nothing was published."""


class DeltaRefused(NotPublished):
    """--delta-from names a version that is not published, is damaged, or is another model: nothing published."""


class QualityGateError(NotPublished):
    """The model scores worse than the published one on the same held-out rows: nothing was published."""


@dataclass
class ExportResult:
    path: Path  # the published version folder
    version: str
    parity: dict  # rows, max_abs_logit_diff, tolerance, auc of both
    quality_gate: dict = field(default_factory=dict)  # its result (passed, skipped), the AUCs compared
    already_published: bool = False  # the same checkpoint was published before: nothing was written


class ScoringModule(nn.Module):
    """Model inputs as plain tensors -> logits: the unsharded sparse arch, tokenizer and tower of a RankingModel.
    Plain tensors in (not a KeyedJaggedTensor) so torch.export sees a fixed signature with one dynamic batch size."""

    def __init__(self, model: RankingModel, pooled_keys: list[str], sequence_keys: list[str]):
        super().__init__()
        self.model, self.pooled_keys, self.sequence_keys = model, pooled_keys, sequence_keys

    def forward(self, pooled_values: torch.Tensor, pooled_lengths: torch.Tensor, sequence_values: torch.Tensor,
                sequence_lengths: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        pooled = KeyedJaggedTensor(keys=self.pooled_keys, values=pooled_values, lengths=pooled_lengths)
        sequence = KeyedJaggedTensor(keys=self.sequence_keys, values=sequence_values, lengths=sequence_lengths)
        embedded = self.model.sparse(pooled, sequence, None)
        return self.model.tower(self.model.tokens(embedded, dense)).logits


def load_model(checkpoint: Path, meta: CheckpointMeta) -> tuple[RunConfig, RankingModel]:
    """The checkpoint's model, unsharded on the CPU, in eval mode, with its config (no process group: DCP reads the
    shards of any world size into whole tensors); `meta` is its verified meta.json."""
    cfg = from_dict(RunConfig, meta.config, source=str(checkpoint / "meta.json"))
    tower = build_model(cfg.model.name, cfg.model.config, cfg.features.input_shape())
    model = RankingModel(cfg.features, tower, sparse_device=torch.device("cpu"))  # plain lookups: serving has no
    state = {"model": load_template(model)}                                    # dedup (the same tables, same loss)
    dcp.load(state, **dcp_args(checkpoint), no_dist=True)  # one process, even inside a job (stream)
    load_loaded(model, state["model"], str(checkpoint))  # managed remaps rebuilt whole (pipeline/serving/managed.py)
    return cfg, model.eval()


def scoring_module(model: RankingModel, batch) -> nn.Module:
    """The module torch.export traces: model inputs (artifact.model_inputs of `batch`'s kind) -> logits, and with
    managed tables their ids' counts (ManagedScoringModule)."""
    if batch.managed_pooled is None and batch.managed_sequence is None:
        return ScoringModule(model, batch.pooled.keys(), batch.sequence.keys()).eval()
    keys = [kjt.keys() if kjt is not None else [] for kjt in (batch.managed_pooled, batch.managed_sequence)]
    return ManagedScoringModule(model, batch.pooled.keys(), batch.sequence.keys(), *keys).eval()


def logits_of(out) -> torch.Tensor:
    """The logits of a scoring module's output (ManagedScoringModule's is a tuple)."""
    return (out[0] if isinstance(out, tuple) else out).float()


def holdout_rows(cfg: RunConfig, days_done: list[str], num_rows: int) -> tuple[pa.Table, DayPartition]:
    """Valid rows the model has not trained on when the data has them: the first complete day after its last
    one, else its last day (then the gate checks the program, not generalisation)."""
    d = cfg.data
    days = discover_days(d.root, partition_key=d.partition_key, require_success=d.require_success)
    last = max(days_done) if days_done else None
    later = [day for day in days if last is None or str(day.day) > last]
    day = later[0] if later else next(day for day in days if str(day.day) == last)
    parts, have = [], 0
    for file in day.files:
        table = pq.read_table(open_input(file), columns=cfg.features.columns())
        good = validate_rows(table, cfg.features, max_list_len=d.max_list_len).good_B
        parts.append(table.filter(pa.array(good)))
        have += parts[-1].num_rows
        if have >= num_rows:
            break
    return pa.concat_tables(parts).slice(0, num_rows), day


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, tables: Tables = "fp32", holdout: int = 2048,
                      quality_margin: float = QUALITY_MARGIN, skip_quality_gate: bool = False,
                      trust_checkpoint: bool = False, aoti: bool = False,
                      delta_from: str | None = None) -> ExportResult:
    """Export, check parity and quality, publish (see the module docstring); raises a NotPublished error (ParityError,
    QualityGateError, VersionTaken) with nothing published. Each publish and refusal is a line of out/history.jsonl.

    `tables`: fp32, or fp16 / int8 (row-wise, a scale and bias per row, as fbgemm's and TorchRec's inference
    kernels do) within QUANTIZATION_BOUNDS of the fp32 model on the held-out rows.
    `quality_margin`: refuse (QualityGateError) a model whose AUC on the held-out rows is more than this below the
    AUC of the version `latest` names on the same rows. The held-out rows are the first complete day after the
    model's last one when there is one (a progressive comparison); else its last day, which favours the new model.
    `skip_quality_gate`: publish without that comparison; recorded, with who chose it, in the manifest and history.
    `trust_checkpoint`: also load a checkpoint that is not where its own run keeps it (DCP unpickles what it finds).
    `aoti`: also compile the program with AOTInductor (`model.aoti.pt2`, for a C++ runtime or
    torch._inductor.aoti_load_package; fp32 tables only), under the same parity gate.
    `delta_from`: a version published under `out`: write only what changed since it (pipeline/serving/delta.py:
    table rows, remap slots, the dense weights); the gates score the delta as a server loads it (its base, then the
    delta). DeltaRefused if that version is not there, is damaged or is another model.
    A version published before from the same checkpoint is left as it is (`already_published`), never rewritten.
    """
    if aoti and delta_from is not None:
        raise ValueError("--aoti needs a full export (an AOTInductor package holds its weights): drop --delta-from")
    if aoti and tables != "fp32":  # AOTI trips on fbgemm's bounds_check_indices for quantized tables (torchrec 1.8)
        raise ValueError(f"--aoti needs fp32 tables, not {tables}")
    checkpoint, out = location(checkpoint), location(out)
    meta = verified_in_its_run(checkpoint, trust=trust_checkpoint)
    version = version_name(meta.run_id, meta.progress.global_step, tables)
    event = {"version": version, "checkpoint": str(checkpoint), "checkpoint_sha256": meta.fingerprint, "by": who(),
             **({"delta_from": delta_from} if delta_from else {})}
    try:
        result = _already_published(out, version, meta) or _export(
            checkpoint, meta, out, version, tables=tables, holdout=holdout, aoti=aoti,
            quality_margin=None if skip_quality_gate else quality_margin, delta_from=delta_from)
    except NotPublished as e:
        record(out, {"event": "refused", **event, "reason": str(e)})
        raise
    if not result.already_published:
        record(out, {"event": "published", **event, "tables": tables, "auc": result.parity["auc_artifact"],
                     "quality_gate": result.quality_gate})
    return result


def _export(checkpoint: Path, meta: CheckpointMeta, out: Path, version: str, *, tables: Tables, holdout: int,
            aoti: bool, quality_margin: float | None, delta_from: str | None) -> ExportResult:
    """Build `version` in a staging folder, check it (parity, quality unless the margin is None), publish it."""
    cfg, model = load_model(checkpoint, meta)
    rows, day = holdout_rows(cfg, meta.progress.days_done, holdout)
    labels = rows.column(cfg.features.label).to_numpy().astype(np.float64)
    batch = BatchConverter(cfg.features)(rows, source=str(day.path))
    inputs = model_inputs(batch)
    scoring = scoring_module(model, batch)
    with torch.no_grad():
        fp32 = logits_of(scoring(*inputs))
        if tables != "fp32":
            quantize_tables(scoring, tables)
        eager = logits_of(scoring(*inputs))
    manifest = _manifest(cfg, meta, checkpoint, version, rows.schema, tables)
    if isinstance(scoring, ManagedScoringModule):
        manifest.update(format=FORMAT_MANAGED_OR_DELTA, managed={"tables": managed_tables(model), "fallback": FALLBACK})
    staging = _write_staging(out, version, scoring, inputs, manifest, aoti=aoti, delta_from=delta_from)
    try:
        # the gate scores through the artifact as a server loads it: raw rows, validation, converter, program
        served = Artifact.load(staging, bases=out / "versions").logits(rows)  # (a delta's bases: published ones)
        parity = {**_parity(eager, served, labels), **_quantization(fp32, served, labels, tables), "day": str(day.day)}
        _check_parity(parity, tables, f"{checkpoint} ({tables} tables)")
        gate = _quality_gate(out, rows, labels, parity, version, day, quality_margin)
        if aoti:
            parity["aoti_max_abs_logit_diff"] = _check_aoti(staging, inputs, eager, parity)
        manifest = json.loads((staging / MANIFEST).read_text())
        write_json(staging / MANIFEST, {**manifest, "parity": parity, "quality_gate": gate})
        final = publish(out, staging, version)
    except VersionTaken:  # another export published this name since we looked: the same checkpoint is no refusal
        shutil.rmtree(staging, ignore_errors=True)
        if (same := _already_published(out, version, meta)) is not None:
            return same
        raise
    except BaseException:  # nothing half-made stays behind (a staging folder is named for this export alone)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("published %s (max |logit diff| %.3g on %d rows)", final, parity["max_abs_logit_diff"], parity["rows"])
    return ExportResult(final, version, parity, gate)


def _already_published(out: Path, version: str, meta: CheckpointMeta) -> ExportResult | None:
    """The published `version` if it was exported from this very checkpoint (then it is left as it is), None if
    there is none; VersionTaken if it holds another checkpoint's model."""
    manifest = published_manifest(out, version)
    if manifest is None:
        return None
    if manifest.get("checkpoint_sha256") != meta.fingerprint:
        raise VersionTaken(f"{out / 'versions' / version} is already published from another checkpoint "
                           f"({manifest.get('checkpoint')}): a published version is never rewritten")
    log.info("%s is already published from %s: left as it is", version, meta.path)
    return ExportResult(out / "versions" / version, version, manifest.get("parity", {}),
                        manifest.get("quality_gate", {}), already_published=True)


def _write_staging(out: Path, version: str, scoring: nn.Module, inputs: tuple, manifest: dict, *, aoti: bool,
                   delta_from: str | None = None) -> Path:
    """torch.export the scoring module (one dynamic batch size) into a fresh staging folder with its manifest, and
    with `aoti` its AOTInductor package; with `delta_from` (a published version) the program is written as a delta
    of that version (pipeline/serving/delta.py)."""
    rows_dim = torch.export.Dim("rows", min=1, max=1 << 20)
    shapes = ({0: torch.export.Dim("pooled_ids", min=0)}, {0: len(scoring.pooled_keys) * rows_dim},
              {0: torch.export.Dim("sequence_ids", min=0)}, {0: len(scoring.sequence_keys) * rows_dim},
              {0: rows_dim})
    if isinstance(scoring, ManagedScoringModule):
        shapes += ({0: torch.export.Dim("managed_ids", min=0)}, {0: len(scoring.managed_keys) * rows_dim})
    program = torch.export.export(scoring, inputs, dynamic_shapes=shapes, strict=False)
    staging = staging_folder(out, version)
    files = []
    try:
        if aoti:  # (AOTInductor compiles from the example inputs, so before they are dropped)
            torch._inductor.aoti_compile_and_package(program, package_path=str(staging / AOTI_PROGRAM))
            files.append(AOTI_PROGRAM)
        program._example_inputs = None  # torch.export.save would ship the held-out rows (real data) with the model
        if delta_from is None:
            torch.export.save(program, str(staging / PROGRAM))
            files.append(PROGRAM)
        else:
            manifest = {**manifest, "format": FORMAT_MANAGED_OR_DELTA,
                        "delta": _write_delta(out, delta_from, program, manifest, staging)}
            files.append(DELTA)
        write_json(staging / MANIFEST, {**manifest, "files": {name: sha256(staging / name) for name in files}})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _write_delta(out: Path, base: str, program: torch.export.ExportedProgram, manifest: dict, staging: Path) -> dict:
    """Write the delta of `program` from the published version `base` into `staging` (pipeline/serving/delta.py);
    its manifest entry. DeltaRefused if `base` is not published there, is damaged, or is another model."""
    path = out / "versions" / base
    published = published_manifest(out, base)
    if published is None:
        raise DeltaRefused(f"--delta-from {base}: no such version is published under {out}")
    try:
        for key in ("model", "features", "tables", "arrow_schema"):  # before loading it: another model is no base
            if published.get(key) != manifest[key]:
                raise DeltaMismatch(f"its {key} differs from this model's")
        base_manifest, base_program = load_version(path)  # verified as a server loads it (downloaded on S3)
        delta = make_delta(state_of(base_program), state_of(program))
    except (DeltaMismatch, DeltaBaseError, ValueError) as e:
        raise DeltaRefused(f"no delta of {manifest['version']} from {base} ({path}): {e}") from e
    torch.save(delta, staging / DELTA)
    return {"base": base, "base_manifest_sha256": sha256(path / MANIFEST),
            "chain": base_manifest.get("delta", {}).get("chain", 0) + 1, "carries": describe(delta)}


def _check_aoti(staging: Path, inputs: tuple, eager: torch.Tensor, parity: dict) -> float:
    """The AOTInductor package scored on the held-out inputs; ParityError beyond tolerance."""
    path = staging / AOTI_PROGRAM
    with torch.no_grad():
        compiled = logits_of(torch._inductor.aoti_load_package(str(path))(*inputs))
    diff = float((compiled - eager).abs().max())
    if diff > PARITY_TOLERANCE:
        raise ParityError(f"the AOTInductor program's logits differ from the model's by up to {diff:.3g} on "
                          f"{parity['rows']} held-out rows (tolerance {PARITY_TOLERANCE:g}): nothing published")
    return diff


def _parity(eager: torch.Tensor, served: torch.Tensor, labels: np.ndarray) -> dict:
    """The program, loaded as a server loads it, against the eager model it was traced from (same tables)."""
    diff = float((eager - served).abs().max()) if eager.numel() else 0.0
    return {"rows": int(eager.numel()), "max_abs_logit_diff": diff, "tolerance": PARITY_TOLERANCE,
            "auc_model": auc(eager.numpy(), labels), "auc_artifact": auc(served.numpy(), labels)}


def _quantization(fp32: torch.Tensor, served: torch.Tensor, labels: np.ndarray, tables: Tables) -> dict:
    """What quantized tables cost against the fp32 model, on the same rows (nothing for fp32)."""
    if tables == "fp32":
        return {}
    bound = QUANTIZATION_BOUNDS[tables]
    return {"tables": tables, "auc_fp32": auc(fp32.numpy(), labels),
            "max_abs_logit_diff_vs_fp32": float((fp32 - served).abs().max()), "bound": bound}


def _check_parity(parity: dict, tables: Tables, what: str) -> None:
    where = f"on {parity['rows']} held-out rows of {parity['day']}"
    if parity["max_abs_logit_diff"] > parity["tolerance"]:
        raise ParityError(f"{what}: the exported program's logits differ from the model's by up to "
                          f"{parity['max_abs_logit_diff']:.3g} {where} (tolerance {parity['tolerance']:g}): "
                          "nothing published")
    if tables != "fp32":
        bound, delta = parity["bound"], abs(parity["auc_artifact"] - parity["auc_fp32"])
        if parity["max_abs_logit_diff_vs_fp32"] > bound["logit"] or delta > bound["auc"]:
            raise ParityError(f"{what}: quantized tables move the logits by up to "
                              f"{parity['max_abs_logit_diff_vs_fp32']:.3g} and the AUC by {delta:.4f} {where} "
                              f"(bounds {bound['logit']:g} and {bound['auc']:g}): nothing published")


def _quality_gate(out: Path, rows: pa.Table, labels: np.ndarray, parity: dict, version: str, day: DayPartition,
                  margin: float | None) -> dict:
    """How the quality gate went, for the manifest and the history (margin None: skipped, by whom); QualityGateError
    if the model's AUC falls more than `margin` below that of the version `latest` names, on the same rows."""
    if margin is None:
        return {"result": "skipped", "by": who()}
    if not (out / "latest").is_file():
        return {"result": "passed: nothing published to compare with", "margin": margin}
    published = Artifact.load(out)
    published_auc = auc(published.logits(rows).numpy(), labels)
    gate = {"result": "passed", "margin": margin, "published": published.version, "auc_published": published_auc,
            "auc": parity["auc_artifact"], "rows": parity["rows"], "day": str(day.day)}
    if parity["auc_artifact"] < published_auc - margin:
        raise QualityGateError(f"{version} not published: AUC {parity['auc_artifact']:.4f} on {parity['rows']} "
                               f"held-out rows of {day.day}, more than {margin:g} below the published "
                               f"{published.version}'s {published_auc:.4f} on the same rows")
    return gate


def _manifest(cfg: RunConfig, meta: CheckpointMeta, checkpoint: Path, version: str, schema: pa.Schema,
              tables: Tables) -> dict:
    progress = meta.progress
    return {
        "format": FORMAT_VERSION, "version": version,
        "created_at": dt.datetime.now().isoformat(timespec="seconds"),
        "model": to_dict(cfg.model), "features": to_dict(cfg.features),
        "arrow_schema": base64.b64encode(schema.serialize().to_pybytes()).decode(),
        "max_list_len": cfg.data.max_list_len, "tables": tables,
        "days_trained": progress.days_done, "global_step": progress.global_step, "run_id": meta.run_id,
        "checkpoint": str(checkpoint), "checkpoint_sha256": meta.fingerprint,
        "versions": installed_versions(), "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
