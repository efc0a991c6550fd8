"""Run configuration: TOML file -> typed, validated dataclasses.

    cfg = load_config("jobs/configs/default.toml", overrides=["train.lr=0.01", "model.options.hidden=[64,32]"])
    save_resolved(cfg, out_dir)   # writes out_dir/config.resolved.toml

Every section is a dataclass whose fields are the allowed keys. An unknown key, a missing required key or a
value of the wrong type raises `ConfigError` (a ValueError) naming the file and the dotted key. Semantic checks
live in each dataclass's `__post_init__` and raise plain ValueErrors, which `load_config` re-raises with the
file name attached. A new variant is a new TOML file, not a new flag.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from hyrank.pipeline.config_retired import translate_retired
from hyrank.pipeline.data.features import FeatureSpec
from hyrank.pipeline.data.options import ReaderOptions
from hyrank.pipeline.files import write_atomic


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


# ---------------------------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True, kw_only=True)  # root (required) follows the options' defaults
class DataConfig(ReaderOptions):
    """Where the day-partitioned logs are and how they are batched; the reader's knobs (shuffle, error_budget,
    num_workers, ...) are the fields of ReaderOptions (pipeline/data/options.py), so the reader takes this
    section as it is: `DayReader(..., options=cfg.data)`."""

    root: str  # folder holding <partition_key>=YYYY-MM-DD/ sub-folders
    partition_key: str = "day"
    require_success: bool = True  # read only days with a _SUCCESS marker
    batch_size_per_rank: int = 512
    quarantine_dir: str = ""  # bad rows go here; "" means <out_dir>/quarantine

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("batch_size_per_rank", self.batch_size_per_rank)
        if not self.partition_key.isidentifier():
            raise ValueError(f"partition_key must be an identifier such as 'day' or 'dt', got {self.partition_key!r}")


@dataclass(frozen=True)
class TableSharding:
    """Planner constraints for one table (see embeddings/sharding.py)."""

    # empty: any sharding its TorchRec sharder offers
    sharding_types: list[Literal["table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"]] = field(
        default_factory=list)
    # fused_uvm_caching: the table in host memory with a share of its rows cached in HBM; fused_uvm: all in host
    # memory (both CUDA only)
    compute_kernels: list[Literal["fused", "dense", "fused_uvm_caching", "fused_uvm"]] = field(
        default_factory=lambda: ["fused"])


@dataclass(frozen=True)
class EmbeddingConfig:
    """Sparse (embedding table) optimisation and sharding."""

    # Fused into backward by fbgemm. fbgemm refuses adam on CPU; use it on GPU only.
    optimizer: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = "rowwise_adagrad"
    lr: float = 0.05
    # new tables start uniform in +-init_scale; 0: TorchRec's +-sqrt(1 / num_embeddings), which shrinks with the
    # table (a 100k-row table starts at +-0.003, and needs a large lr to move)
    init_scale: float = 0.0
    eps: float = 1e-8
    weight_decay: float = 0.0
    sharding: dict[str, TableSharding] = field(default_factory=dict)  # table name -> constraints
    # Sequence tables look up each distinct id of a batch once (embeddings/dedup.py); false: the plain lookup
    # of every event (the reference). Same tables, same loss. The model's switch alone: readers take the batch
    # transform it needs from the model (RankingModel.sequence_feed), so the two cannot disagree.
    dedup: bool = False

    def __post_init__(self) -> None:
        _check_positive("lr", self.lr)
        if not 0 <= self.init_scale < math.inf:
            raise ValueError(f"init_scale must be >= 0 (0: TorchRec's default), got {self.init_scale}")


@dataclass(frozen=True)
class ModelConfig:
    """Which dense tower (a key of models.MODELS) and its options; `config`: them as that model's Config.

    Frozen: `config` is parsed from `name` and `options` once, so changing either afterwards would leave it stale
    (make a new ModelConfig instead)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from hyrank.models import model_class

        # Parsed once, here, so a bad option fails at load naming its key. A plain attribute, not a field: the
        # resolved TOML and equality stay about `options` alone.
        try:
            config = from_dict(model_class(self.name).Config, self.options, source="", where="model.options")
        except ConfigError as e:
            raise ValueError(str(e)) from e  # from_dict(RunConfig) adds the file name
        object.__setattr__(self, "config", config)


@dataclass(frozen=True)
class TrainConfig:
    """Dense optimiser, loop lengths, distributed settings."""

    dense_optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_steps_per_day: int = 0  # 0: the whole day
    eval_max_batches: int = 0  # 0: the whole evaluation day
    log_every_steps: int = 50
    warmup_steps: int = 0  # linear LR warm-up of the dense optimizer
    # constant: lr throughout (after warm-up). cosine: the dense LR falls from lr to lr * lr_min_ratio along a
    # half cosine over the training steps of the run (every day of --days); a resumed run finishes the curve the
    # interrupted one started, and a later run (the next day's retraining) starts a new one.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_min_ratio: float = 0.05
    grad_clip_norm: float = 0.0  # clip the dense gradient norm; 0: off
    # torch.compile (inductor) of the dense tower, applied in place from outside (models/ stay plain modules, so
    # checkpoints, resume and export are unchanged); its compile time is logged once. Off by default: on CPU its
    # minutes of compiling did not pay back in a day's training (docs/results.md, "Faster towers")
    compile: bool = False
    # bf16: the tower's training forward under torch.autocast(bf16) on the run's device (CPU too), from outside
    # (pipeline/train/compile.py); weights, gradients, optimizer state, loss and metrics stay fp32, evaluation and
    # export run fp32. (It replaces train.precision, the CUDA-only switch over the whole forward: config_retired.py.)
    autocast: Literal["off", "bf16"] = "off"
    # sync: plain DDP. async: HyFormer's one-step-stale allreduce (pipeline/distributed/comm_hooks.py)
    allreduce: Literal["sync", "async"] = "sync"
    allreduce_compression: Literal["none", "bf16"] = "none"
    # async only (pipeline/distributed/comm_hooks.py): lambda0 of DC-ASGD's delay compensation of the stale dense
    # gradient, and s of the weight prediction (forward/backward at W + s * last dense update); 0: off
    allreduce_delay_compensation: float = 0.0
    allreduce_weight_prediction: float = 0.0
    # async only: the first N training steps of a model (its global step, so a resumed run or the next day's
    # retraining does not start again) reduce synchronously, and the stale rule starts after them
    allreduce_sync_steps: int = 0
    tensorboard: bool = True  # scalars under <out_dir>/tensorboard
    # plain: one batch at a time. sparse_dist: TorchRec's TrainPipelineSparseDist, which overlaps the next
    # batch's host->device copy and embedding all-to-all with this batch's compute (CUDA streams; on CPU it
    # runs, with identical losses, but has nothing to overlap)
    pipeline: Literal["plain", "sparse_dist"] = "plain"
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl when CUDA is available, else gloo
    pg_timeout_s: int = 600
    # Bounded data (hyrank train): passes over --days, each in a new order when data.shuffle is on (days and the
    # rows within them); with --valid-days the validation span is evaluated after each pass, the best pass's
    # checkpoint (checkpoint.best_metric) is kept and evaluates --eval-days, and `patience` passes without a
    # better one stop the run (0: never stop early)
    passes: int = 1
    patience: int = 0
    # consecutive days with fewer rows than this are trained as one unit (hyrank train): batches stay full when
    # days are small (a day of 100 rows alone is one mostly-filler step). 0: 16 steps of every rank's batch
    min_unit_rows: int = 0

    def __post_init__(self) -> None:
        _check_positive("lr", self.lr)
        _check_positive("log_every_steps", self.log_every_steps)
        _check_positive("pg_timeout_s", self.pg_timeout_s)
        if not 0.0 <= self.lr_min_ratio <= 1.0:
            raise ValueError(f"lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")
        _check_positive("passes", self.passes)
        for name in ("max_steps_per_day", "eval_max_batches", "warmup_steps", "grad_clip_norm", "allreduce_sync_steps",
                     "patience", "min_unit_rows"):
            if not getattr(self, name) >= 0:  # `not >=` also rejects NaN
                raise ValueError(f"{name} must be >= 0 (0 means no limit), got {getattr(self, name)}")
        for name in ("allreduce_delay_compensation", "allreduce_weight_prediction"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 (0 means off), got {getattr(self, name)}")


@dataclass(frozen=True)
class CheckpointConfig:
    """DCP checkpoints of the whole run state (pipeline/train/checkpoint.py)."""

    dir: str = ""  # "": <out_dir>/checkpoints
    at_day_end: bool = True  # after each training day (its gradients flushed)
    every_steps: int = 0  # also every N steps inside a day (0: off); resumes mid-day from the reader cursor
    keep: int = 3  # newest complete checkpoints kept; older ones are deleted after a successful save
    # also keep the K day-end checkpoints that scored best on the next day (progressive validation, hyrank stream)
    keep_best: int = 0
    best_metric: Literal["auc", "query_auc", "logloss", "ne"] = "auc"  # higher is better for AUCs, lower for losses

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"every_steps must be >= 0 (0 means off), got {self.every_steps}")
        if self.keep_best < 0:
            raise ValueError(f"keep_best must be >= 0 (0 means off), got {self.keep_best}")
        _check_positive("keep", self.keep)


@dataclass(frozen=True)
class RunConfig:
    """The whole run: one TOML file. Frozen, like every section: a config is what was loaded and saved with the
    run; a change is a new config (`with_values`)."""

    name: str
    data: DataConfig
    features: FeatureSpec
    model: ModelConfig
    seed: int = 0
    out_dir: str = "runs/default"
    embeddings: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        tables = {t.name for t in self.features.tables}
        if self.checkpoint.every_steps and self.train.pipeline != "plain":
            raise ValueError("checkpoint.every_steps needs train.pipeline = 'plain': TrainPipelineSparseDist reads "
                             "batches ahead of the step, so a mid-day reader cursor would skip them")
        if self.checkpoint.best_metric == "query_auc" and self.features.group is None:
            raise ValueError("checkpoint.best_metric = 'query_auc' needs a group column (features.group)")
        for table, sharding in self.embeddings.sharding.items():
            if table not in tables:
                raise ValueError(f"embeddings.sharding names unknown table {table!r} (tables: {sorted(tables)})")
            if self.features.table_by_name[table].managed is not None and "row_wise" not in sharding.sharding_types:
                raise ValueError(f"embeddings.sharding[{table!r}] allows only {sharding.sharding_types}, but table "
                                 f"{table!r} is managed and TorchRec shards managed tables row_wise only")


def _check_positive(name: str, value: float) -> None:
    if not 0 < value < math.inf:  # NaN fails every comparison, so `value <= 0` would let it through
        raise ValueError(f"{name} must be > 0 and finite, got {value}")


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                unsets: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a TOML run config, apply `a.b=c` overrides, and return the validated RunConfig.

    A config may start with `extends = "other.toml"` (relative to itself): it is read over that one, tables
    merged key by key and everything else (values, arrays) replaced, so a variant states only what differs.
    `model.options` is replaced whole: options belong to one model. An inherited key is removed with
    `unset = ["features.group", "features.oracle"]` at the top of the extending file (TOML has no null), or
    `--unset features.group` on the command line (the `unsets` here).
    """
    path = Path(path)
    raw = _read_toml(path, chain=())
    for item in overrides:
        apply_override(raw, item, source=str(path))
    for dotted in unsets:
        unset_key(raw, dotted, source="--unset")
    return from_dict(RunConfig, raw, source=str(path))


def _read_toml(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}" + (f" (extended by {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"{path}: `extends` loops: {' -> '.join(map(str, chain + (path.resolve(),)))}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    base = raw.pop("extends", None)
    unset = raw.pop("unset", [])
    if not isinstance(unset, list) or not all(isinstance(k, str) for k in unset):
        raise ConfigError(f"{path}: `unset` must be a list of dotted keys, e.g. unset = [\"features.group\"]")
    if base is None:
        if unset:
            raise ConfigError(f"{path}: `unset` removes keys inherited through `extends`, and this file extends none")
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: `extends` must be a file name, got {base!r}")
    merged = _read_toml(path.parent / base, chain + (path.resolve(),))
    for dotted in unset:
        unset_key(merged, dotted, source=str(path))
    return _merge(merged, raw)


def unset_key(raw: dict[str, Any], dotted: str, *, source: str) -> None:
    """Remove a dotted key (`features.group`) from a raw TOML dict: the field falls back to its default. A key
    that is not there is an error (a typo would otherwise remove nothing without a word)."""
    keys = dotted.strip().split(".")
    node: Any = raw
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise _err(source, f"unset {dotted!r}: there is no {'.'.join(keys[:depth + 1])!r} to remove")
        if depth == len(keys) - 1:
            del node[key]
        else:
            node = node[key]


_REPLACED_WHOLE = {"model.options"}


def _merge(base: dict[str, Any], over: dict[str, Any], where: str = "") -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        at = _join(where, key)
        merge = isinstance(value, dict) and isinstance(out.get(key), dict) and at not in _REPLACED_WHOLE
        out[key] = _merge(out[key], value, at) if merge else value
    return out


def with_values(cfg: RunConfig, values: dict[str, Any]) -> RunConfig:
    """A copy of `cfg` with these dotted keys set to Python values (`{"train.lr": 0.1}`), checked as a loaded file
    is: configs are frozen after load, so a change is a new config."""
    raw = to_dict(cfg)
    for dotted, value in values.items():
        _set_dotted(raw, dotted, value, source="with_values")
    return from_dict(RunConfig, raw, source="with_values")


def apply_override(raw: dict[str, Any], item: str, *, source: str = "--set") -> None:
    """Set a dotted key in the raw TOML dict: `train.lr=0.01`, `features.sparse.0.oov="error"`.

    The value is parsed as a TOML value (numbers, booleans, arrays, quoted strings); a bare word that is not
    valid TOML is taken as a string, so `--set model.name=hyformer` works without quotes.
    """
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, text = item.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    _set_dotted(raw, dotted, value, source=source)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any, *, source: str) -> None:
    keys = dotted.strip().split(".")
    node: Any = raw
    for depth, key in enumerate(keys[:-1]):
        node = _override_step(node, key, ".".join(keys[: depth + 1]), source)
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last, dotted, source)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise _err(source, f"override key {dotted!r} goes inside a value that is not a table")


def _override_step(node: Any, key: str, where: str, source: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, key, where, source)]
    if not isinstance(node, dict):
        raise _err(source, f"override key {where!r} goes inside a value that is not a table")
    return node.setdefault(key, {})


def _list_index(node: list, key: str, where: str, source: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise _err(source, f"override key {where!r}: {key!r} is not an index of a list of {len(node)}")
    return int(key)


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: Any, *, source: str, where: str = "") -> T:
    """Build dataclass `cls` from a TOML dict, checking keys and types recursively."""
    if not isinstance(data, dict):
        raise _err(source, f"{where or 'top level'} must be a table, got {type(data).__name__}")
    try:
        data = translate_retired(data, where)
    except ValueError as e:
        raise _err(source, str(e)) from e
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = _join(where, unknown[0])
        raise _err(source, f"unknown key {key!r} (allowed in {where or 'top level'}: {sorted(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], source=source, where=key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _err(source, f"missing required key {key!r}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise _err(source, _located(str(e), where, fields)) from e


def _convert(tp: Any, value: Any, *, source: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source=source, where=where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, source=source, where=where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0]) if len(errors) == 1 else _err(source, f"{where}: no type of {tp} accepts {value!r}")
    if origin is Literal:
        if value not in args:
            raise _err(source, f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _err(source, f"{where} must be a list, got {type(value).__name__} {value!r}")
        return [_convert(args[0], v, source=source, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _err(source, f"{where} must be a table, got {type(value).__name__} {value!r}")
        return {k: _convert(args[1], v, source=source, where=_join(where, k)) for k, v in value.items()}
    return _convert_scalar(tp, value, source=source, where=where)


def _convert_scalar(tp: Any, value: Any, *, source: str, where: str) -> Any:
    # bool is an int in Python; a config that says `lr = true` is a mistake, not 1.0.
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }
    if tp not in ok:
        raise TypeError(f"config type {tp} of {where} is not supported")  # internal: a dataclass uses a bad type
    if not ok[tp]:
        raise _err(source, f"{where} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return float(value) if tp is float else value


def _located(text: str, where: str, fields: dict[str, Any]) -> str:
    """A `__post_init__` error prefixed with the dotted key it is about: the field it starts with, else the section."""
    first = text.split(" ", 1)[0].rstrip(":")
    if where and first.startswith(f"{where}."):  # a nested section's error, already located (model.options.x)
        return text
    return f"{_join(where, first) if first in fields else where or 'top level'}: {text}"


def _err(source: str, text: str) -> ConfigError:
    return ConfigError(f"{source}: {text}" if source else text)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


# ---------------------------------------------------------------------------------------------------------------
# Saving


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a TOML-ready dict (None values dropped: TOML has no null)."""
    return _drop_none(dataclasses.asdict(cfg))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def save_resolved(cfg: RunConfig, out_dir: str | Path, filename: str = "config.resolved.toml") -> Path:
    """Write the fully resolved config next to an output, so every artefact says how it was made."""
    return write_atomic(Path(out_dir) / filename, tomli_w.dumps(to_dict(cfg)))
