"""DCP checkpoints of Stateful parts: everything a run needs to continue exactly where it stopped.

    ckpt = Checkpointer(root, env, keep=3, tensors={"model": dmp, "optim": opt, "hook": dense_sync},
                        meta={"run": identity, "progress": progress, "schedule": schedule},
                        per_rank={"reader": cursor, "rng": rng}, info={"plan": plan})
    ckpt.save(step)                 # collective
    path = ckpt.latest()            # the newest complete checkpoint, or None
    ckpt.load(path)                 # collective: every part's load_state_dict, in the order given
    meta = read_meta(path)          # CheckpointMeta: .step, .config, .progress, .part(name): the only reader
                                    # of meta.json's layout (export, evaluate and resume read through it)

A part is any object with `state_dict()` / `load_state_dict(state)` (torch's Stateful), as in torchtitan's
CheckpointManager; the checkpointer knows nothing of what it saves. Three kinds:
  tensors    saved with torch.distributed.checkpoint (DCP), which reshards on load: a checkpoint taken on N ranks
             loads on M. A part may define `load_template(saved_keys) -> dict | None` to say what to load when the
             checkpoint holds a different subset of its state (None: skip it); else its state_dict() is the
             template, and anything the checkpoint lacks is left out, kept as it is, and named in a warning.
  meta       plain data, in meta.json; restored first, so a part can refuse an incompatible checkpoint before DCP
             meets mismatched shapes.
  per_rank   plain data of each rank, gathered into meta.json; restored only on the same world size. A part with
             `same_world_only = True` refuses another world size when its saved state is not None (a reader
             cursor splits a day by world size); others are then left as they are (RNG state).
A tensors part may define `after_load()`: called once every tensors part is loaded, for state that spans parts (a
managed table's ids move between ranks with their rows and optimizer state: pipeline/distributed/managed_state.py).
One checkpoint is a folder `<root>/step-000000123/`: DCP shards plus meta.json. All ranks write into `step-...tmp`;
rank 0 writes meta.json last and renames the folder, so a crash leaves the previous checkpoint or the new one,
never half of one. `latest` names the newest; `keep` bounds how many stay. On several hosts `root` must be storage
every host sees: a shared file system, or object storage `s3://bucket/prefix` (pipeline/storage.py), which has no
rename: there DCP writes through its fsspec storage straight into `step-N/`, rank 0 then lists and hashes what every
rank uploaded, and meta.json (the mark of a complete checkpoint) and `latest` are written last, one PUT each. A
crash before meta.json leaves a `step-N/` without it, which is not a checkpoint (it is ignored, and cleared when that
step is saved again).

Trust: DCP unpickles its `.metadata`, so a checkpoint is code, not data. meta.json (plain JSON) records the sha256
of every other file, verified before DCP opens any of them: a damaged checkpoint is named with the reason in one
line, and `load_latest` falls back to the newest one that verifies and loads. `latest` is followed only to a
`step-N` folder inside `root`, and a folder outside `root` is refused unless the caller says it trusts it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException

from hyrank.pipeline.distributed.env import DistEnv
from hyrank.pipeline.files import sha256, write_atomic
from hyrank.pipeline.storage import S3Path, fsspec_options, is_remote, location, mtime_ns, rmtree
from hyrank.pipeline.train.state import Progress, run_id_of

log = logging.getLogger(__name__)

META = "meta.json"
FORMAT_VERSION = 2  # 2: parts by name (1 held the trainer's fields at the top level of meta.json)
# the meta parts every training run saves (pipeline/train/trainer.py) and tools read back through CheckpointMeta
RUN, PROGRESS = "run", "progress"


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names it and says why in one line."""


class CheckpointMeta:
    """A checkpoint's meta.json, read through this one owner of its layout: a renamed or missing part is an error
    naming the checkpoint, never a KeyError in export or evaluate."""

    def __init__(self, path: Path | S3Path, data: dict[str, Any]):
        self.path, self.data = path, data

    @property
    def step(self) -> int:
        return int(self.data["step"])

    @property
    def world_size(self) -> int:
        return int(self.data["world_size"])

    @property
    def files(self) -> dict[str, str]:
        """sha256 of every file of the checkpoint but meta.json, by name."""
        return self.data.get("files", {})

    def part(self, name: str) -> Any:
        """The saved state of the meta part `name`."""
        parts = self.data.get("parts", {})
        if name not in parts:
            raise CheckpointError(f"{self.path}: no part {name!r} in its {META} (parts: {sorted(parts)})")
        return parts[name]

    def per_rank(self, name: str) -> list[Any]:
        """The saved state of the per-rank part `name`, of each rank in rank order."""
        return [ranks[name] for ranks in self.data["ranks"]]

    @property
    def config(self) -> dict[str, Any]:
        """The run's resolved config as saved (plain data: pipeline.config.from_dict makes it a RunConfig)."""
        return self.part(RUN)["config"]

    @property
    def progress(self) -> Progress:
        """Where the run stood: steps, days done, the day in progress."""
        progress = Progress()
        progress.load_state_dict(self.part(PROGRESS))
        return progress

    @property
    def run_id(self) -> str:
        """The id of the run that wrote it, the same in all of that run's checkpoints (state.RunIdentity)."""
        return run_id_of(self.part(RUN))

    @property
    def fingerprint(self) -> str:
        """sha256 of meta.json's content, which records the sha256 of every other file: the same fingerprint is
        the same checkpoint, wherever it lies."""
        return hashlib.sha256(json.dumps(self.data, sort_keys=True).encode()).hexdigest()

    @property
    def run_root(self) -> Path | S3Path:
        """The checkpoint folder its own config names: where the run that wrote it keeps its checkpoints."""
        checkpoint, out_dir = self.config.get("checkpoint", {}), self.config.get("out_dir", "")
        return location(checkpoint.get("dir") or location(out_dir) / "checkpoints")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Checkpointer:
    def __init__(self, root: str | Path, env: DistEnv, *, keep: int, tensors: dict[str, Stateful],
                 meta: dict[str, Stateful] | None = None, per_rank: dict[str, Stateful] | None = None,
                 info: dict[str, Any] | None = None):
        self.root, self.env, self.keep = location(root), env, keep
        self.tensors, self.meta, self.per_rank = tensors, meta or {}, per_rank or {}
        self.info = info or {}  # written into meta.json for people and tools, never loaded
        self.protected: set[str] = set()  # checkpoint names pruning keeps whatever their age (best by a metric)

    # -- save ----------------------------------------------------------------------------------------------------

    def save(self, step: int) -> Path:
        """Write every part as of training step `step` (collective)."""
        env, start = self.env, time.perf_counter()
        final = self.root / f"step-{step:09d}"
        remote = isinstance(final, S3Path)
        tmp = final if remote else final.with_name(final.name + ".tmp")  # no rename on object storage
        if env.is_main:
            if remote:  # the same step saved again: not a checkpoint from its meta.json's removal on
                (final / META).unlink(missing_ok=True)
            rmtree(tmp)
            tmp.mkdir(parents=True)
        env.comm.barrier()
        dcp.save({name: part.state_dict() for name, part in self.tensors.items()}, **dcp_args(tmp, write=True))
        ranks = env.comm.gather_objects({name: part.state_dict() for name, part in self.per_rank.items()})
        if env.is_main:
            meta = {"format": FORMAT_VERSION, "step": step, "world_size": env.world_size,
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "parts": {name: part.state_dict() for name, part in self.meta.items()},
                    "ranks": ranks, "files": _hash_files(tmp), **self.info}
            write_atomic(tmp / META, json.dumps(meta, indent=1, default=str) + "\n")
            if not remote:
                _replace_dir(tmp, final)
            write_atomic(self.root / "latest", final.name + "\n")
            self._prune()
            log.info("checkpoint %s in %.2f s", final, time.perf_counter() - start)
        env.comm.barrier()
        return final

    def _prune(self) -> None:
        for old in self.complete()[:-self.keep]:
            if old.name not in self.protected:
                if isinstance(old, S3Path):  # no longer a checkpoint before its files go
                    (old / META).unlink(missing_ok=True)
                rmtree(old)

    # -- find ----------------------------------------------------------------------------------------------------

    def complete(self) -> list[Path]:
        """Complete checkpoints (with meta.json), oldest first by when they were written: a fresh run in a folder
        that holds an older run's higher steps still finds (and keeps) its own newest."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / META).is_file()]
        return sorted(found, key=lambda p: (mtime_ns(p / META), p.name))

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if pointer.is_file():
            name = pointer.read_text().strip()
            if not re.fullmatch(r"step-\d+", name):  # never a path: `../x` or `/x` would leave the root
                log.warning("%s names %r, not a step-N folder of %s: ignored", pointer, name, self.root)
            elif (self.root / name / META).is_file():
                return self.root / name
        complete = self.complete()  # the pointer is missing or stale (a crash between rename and pointer)
        return complete[-1] if complete else None

    def inside(self, path: str | Path) -> bool:
        """Whether `path` is a checkpoint folder of this checkpointer's root (not a link or `..` out of it)."""
        return _inside(self.root, path)

    # -- load ----------------------------------------------------------------------------------------------------

    def load_latest(self) -> tuple[Path, CheckpointMeta] | None:
        """Restore the newest checkpoint that verifies and loads (collective), saying which ones it skipped and
        why; None if there is none at all. Every part is restored whole, so a failed attempt leaves nothing
        behind."""
        candidates = self.complete()
        first = self.latest()
        if first is not None:  # the pointer's choice first (it may differ from the newest by time on a re-save)
            candidates = [p for p in candidates if p != first] + [first]
        failures = []
        for path in reversed(candidates):
            try:
                meta = self.load(path)
            except CheckpointError as e:
                failures.append(str(e))
                if self.env.is_main:
                    log.warning("%s; trying the previous checkpoint", e)
                continue
            if failures and self.env.is_main:
                log.warning("resumed from %s, not the newest: %d newer checkpoint(s) could not be loaded", path,
                            len(failures))
            return path, meta
        if failures:
            raise CheckpointError(f"no checkpoint under {self.root} can be loaded:\n  " + "\n  ".join(failures))
        return None

    def load(self, path: str | Path, *, trust: bool = False) -> CheckpointMeta:
        """Restore every part from the checkpoint at `path` (collective); returns its meta.json.

        `path` must be a checkpoint of this root unless `trust` (loading runs the pickle code DCP finds there).
        Raises CheckpointError naming the checkpoint when it is incomplete, damaged or of another format.
        """
        path = location(path)
        meta = _agree(lambda: verified_meta(path, trusted=trust or self.inside(path), root=self.root), self.env)
        start = time.perf_counter()
        for name, part in self.meta.items():
            try:
                part.load_state_dict(meta.part(name))
            except ValueError as e:  # name the checkpoint: the part knows only its own state
                raise ValueError(f"{path}: {e}") from e
        try:
            self._load_tensors(path)
        except (Exception, CheckpointException) as e:  # DCP raises on every rank together (its CheckpointException,
            # a BaseException, gathers the ranks' failures)
            raise CheckpointError(f"{path} cannot be loaded: {_one_line(e)}") from e
        self._load_per_rank(meta, path)
        if self.env.is_main:
            log.info("resumed from %s (%.2f s)", path, time.perf_counter() - start)
        return meta

    def _load_tensors(self, path: Path) -> None:
        saved = set(_reader(path).read_metadata().state_dict_metadata)
        state, unsaved = {}, []
        for name, part in self.tensors.items():
            mine = {k[len(name) + 1:] for k in saved if k.startswith(name + ".")}
            if hasattr(part, "load_template"):
                template = part.load_template(mine)
            else:
                template, missing = _drop_unsaved(part.state_dict(), mine)
                unsaved += [f"{name}.{k}" for k in missing]
            if template is not None:
                state[name] = template
        dcp.load(state, **dcp_args(path))
        for name, part in self.tensors.items():
            if name in state:
                part.load_state_dict(state[name])
        self._after_load()
        if unsaved and self.env.is_main:
            log.warning("%d state entries are not in %s and start fresh (e.g. a table the plan on %d ranks "
                        "optimizes otherwise): %s", len(unsaved), path, self.env.world_size, ", ".join(unsaved[:6]))

    def _load_per_rank(self, meta: CheckpointMeta, path: Path) -> None:
        if meta.world_size == self.env.world_size:
            for name, part in self.per_rank.items():
                part.load_state_dict(meta.per_rank(name)[self.env.rank])
            return
        for name, part in self.per_rank.items():
            if getattr(part, "same_world_only", False) and any(s is not None for s in meta.per_rank(name)):
                raise ValueError(f"{path}: its {name} state was saved on {meta.world_size} ranks and cannot "
                                 f"continue on {self.env.world_size} (resume from a day-end checkpoint, or on the "
                                 "same world size)")


    def load_model_subset(self, path: str | Path, wanted) -> list[str]:
        """Load into the "model" part only the tensors `wanted(name, is_sharded)` accepts that the checkpoint holds
        with the same shape (a warm start of another model from a trusted checkpoint of this run); returns their
        names. A model part with `resized_template(saved, wanted)` / `load_resized(loaded)` also takes what it can
        of tensors of another size (a resized managed table's ids and rows). Collective."""
        path = location(path)
        _agree(lambda: verified_meta(path, trusted=True, root=self.root), self.env)
        saved = _reader(path).read_metadata().state_dict_metadata
        model = self.tensors["model"]
        template = {}
        for name, value in model.state_dict().items():
            held = saved.get(f"model.{name}")
            if held is None or not hasattr(held, "size") or tuple(held.size) != tuple(value.size()):
                continue
            if wanted(name, hasattr(value, "local_shards")):
                template[name] = value
        resized = {}
        if hasattr(model, "resized_template"):
            mine = {k[len("model."):]: v for k, v in saved.items() if k.startswith("model.")}
            resized = model.resized_template(mine, wanted)
        dcp.load({"model": {**template, **resized}}, **dcp_args(path))
        model.load_state_dict(template, strict=False)
        if resized:
            model.load_resized(resized)
        self._after_load()
        return sorted(template) + sorted(resized)

    def _after_load(self) -> None:
        for part in self.tensors.values():
            if hasattr(part, "after_load"):
                part.after_load()


def read_meta(path: str | Path | S3Path) -> CheckpointMeta:
    """A checkpoint's meta.json, checked to be complete and of this code's format."""
    path = location(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: no {META} (an interrupted save leaves "
                              "a .tmp folder; pick another with `latest`)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_path} cannot be read: {_one_line(e)}") from e
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: checkpoint format {meta.get('format')}, this code reads "
                              f"{FORMAT_VERSION}")
    return CheckpointMeta(path, meta)


def verified_meta(path: Path | S3Path, *, trusted: bool, root: Path | S3Path, run: str = "this run",
                  use: str = "resume from it") -> CheckpointMeta:
    """meta.json (plain JSON, safe to read), after the folder was found trusted and every file it lists was found
    with its recorded sha256 (and no unlisted file is there)."""
    meta = read_meta(path)
    if not trusted:
        raise CheckpointError(f"{path} is not a checkpoint of {run} ({root}): checkpoints are trusted input "
                              f"(DCP unpickles them); {use} only if you trust who wrote it, with --trust-checkpoint")
    recorded = meta.files
    present = {p.name for p in path.iterdir() if p.is_file() and p.name != META}
    if set(recorded) != present:
        missing, extra = sorted(set(recorded) - present), sorted(present - set(recorded))
        raise CheckpointError(f"{path} is damaged: files missing {missing[:3]}, unexpected {extra[:3]}")
    for name, digest in sorted(recorded.items()):
        if sha256(path / name) != digest:
            raise CheckpointError(f"{path} is damaged: {name} does not match the sha256 recorded at save time")
    return meta


def verified_in_its_run(path: Path | S3Path, *, trust: bool) -> CheckpointMeta:
    """verified_meta of a checkpoint loaded outside a run (export): trusted when it is a step-N folder of the
    checkpoint folder its own config names, i.e. where the run that wrote it keeps it (a relative out_dir is read
    from here, as the run read it from where it started), or when the caller trusts it."""
    root = read_meta(path).run_root
    return verified_meta(path, trusted=trust or _inside(root, path), root=root, run="its run", use="export it")


def _inside(root: Path | S3Path, path: str | Path | S3Path) -> bool:
    path, root = location(path).resolve(), location(root)
    if is_remote(path) != is_remote(root):
        return False
    return path.parent == root.resolve() and re.fullmatch(r"step-\d+", path.name) is not None


def dcp_args(path: Path | S3Path, *, write: bool = False) -> dict[str, Any]:
    """dcp.save/load's storage arguments: its fsspec storage on object storage, its file system one on disk."""
    if not is_remote(path):
        return {"checkpoint_id": str(path)}
    # no checkpoint_id beside it: DCP would re-create the storage from the id alone, without the endpoint
    return {"storage_writer": FsspecWriter(str(path), **fsspec_options())} if write else \
        {"storage_reader": _reader(path)}


def _reader(path: Path | S3Path) -> dcp.FileSystemReader:
    return FsspecReader(str(path), **fsspec_options()) if is_remote(path) else dcp.FileSystemReader(str(path))


def _hash_files(folder: Path | S3Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != META}


def _agree(check, env: DistEnv) -> Any:
    """`check()` on rank 0 (each file is read once, not once per rank), its result or its CheckpointError on every
    rank, so all ranks load the same checkpoint or fall back together."""
    out: Any = None
    if env is None or env.is_main:
        try:
            out = ("ok", check())
        except CheckpointError as e:
            out = ("error", str(e))
    if env is not None:
        out = env.comm.broadcast_object(out)
    if out[0] == "error":
        raise CheckpointError(out[1])
    return out[1]


def _one_line(e: BaseException) -> str:
    """The last non-empty line of an exception's message (DCP wraps the cause in a long traceback text)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def _drop_unsaved(state: Any, saved: set[str], prefix: str = "") -> tuple[Any, list[str]]:
    """`state` without the leaves the checkpoint lacks (DCP flattens nested dicts with dots), and those leaves."""
    if not isinstance(state, dict):
        return state, []
    kept, missing = {}, []
    for key, value in state.items():
        full = f"{prefix}{key}"
        if not any(s == full or s.startswith(full + ".") for s in saved):
            missing.append(full)
            continue
        kept[key], more = _drop_unsaved(value, saved, full + ".")
        missing += more
    return kept, missing


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename src to dst; an existing dst (the same step saved again) is moved aside first, then deleted."""
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
    src.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
