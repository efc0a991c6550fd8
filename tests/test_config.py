"""Run config: every shipped config loads; every error names the file and the key; overrides; round trip."""

from pathlib import Path

import pytest

from hyrank.pipeline.config import ConfigError, RunConfig, apply_override, load_config, save_resolved

from conftest import DEFAULT_CONFIG, ROOT

SHIPPED = sorted((ROOT / "jobs" / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    cfg.model.config
    cfg.features.input_shape()
    cfg.features.embedding_layout()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def _default_with(tmp_path, old: str, new: str) -> Path:
    text = DEFAULT_CONFIG.read_text()
    assert old in text
    return _write(tmp_path, text.replace(old, new, 1))


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config("nope.toml")


def test_invalid_toml_names_file(tmp_path):
    path = _write(tmp_path, "name = \n")
    with pytest.raises(ConfigError, match="cfg.toml: not valid TOML"):
        load_config(path)


@pytest.mark.parametrize("old,new,message", [
    ('name = "default"', 'name = "default"\nlearning_rate = 3', r"unknown key 'learning_rate'"),
    ("lr = 0.002", "lr = 0.002\nmomentum = 0.9", r"unknown key 'train.momentum'"),
    ("lr = 0.002", 'lr = "fast"', r"train.lr must be float, got str 'fast'"),
    ("lr = 0.002", "lr = true", r"train.lr must be float, got bool"),
    ('lr_schedule = "cosine"', 'lr_schedule = "linear"', r"train.lr_schedule must be one of \['constant', 'cosine'\]"),
    ("batch_size_per_rank = 128", "batch_size_per_rank = 2.5", r"data.batch_size_per_rank must be int"),
    ("batch_size_per_rank = 128", "batch_size_per_rank = 0", r"batch_size_per_rank must be > 0"),
    ('optimizer = "rowwise_adagrad"', 'optimizer = "lion"', r"embeddings.optimizer must be one of"),
    ("options = { hidden = [256, 128, 64] }", "options = { hiden = [1] }", r"unknown key 'model.options.hiden'"),
    ("options = { hidden = [256, 128, 64] }", 'options = { hidden = ["a"] }', r"model.options.hidden\[0\] must be int"),
    ('name = "dlrm_mlp"', 'name = "gpt"', r"unknown model 'gpt'"),
    ('{ name = "user_id", table = "user" }', '{ name = "user_id", table = "users" }', r"unknown table 'users'"),
    ('{ name = "user_id", table = "user" }', '{ name = "user_id" }', r"missing required key 'features.sparse\[0\].table'"),
    ('oov = "error" }', 'oov = "drop" }', r"features.sparse\[1\].oov must be one of \['hash', 'error'\]"),
    ('context = ["device", "hour"]', 'context = ["device", "hour", "weather"]', r"block 'context' names 'weather'"),
    ("log_every_steps = 50", 'log_every_steps = 50\npipeline = "sparse_dist"\n[checkpoint]\nevery_steps = 100',
     r"checkpoint.every_steps needs train.pipeline = 'plain'"),
    ("log_every_steps = 50", "log_every_steps = 50\n[checkpoint]\nkeep = 0", r"keep must be > 0"),
    ('context = ["device", "hour"]', 'context = ["device"]', r"sparse features not in any block: \['hour'\]"),
])
def test_errors_name_file_and_key(tmp_path, old, new, message):
    path = _default_with(tmp_path, old, new)
    with pytest.raises(ValueError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("key", ["train.lr", "embeddings.lr"])
def test_learning_rates_must_be_finite(key, value):
    # NaN compares False with everything: a plain `lr <= 0` check lets it through to the optimizer
    with pytest.raises(ValueError, match=rf"{key}: lr must be > 0 and finite, got {value}"):
        load_config(DEFAULT_CONFIG, [f"{key}={value}"])


def test_missing_required_section(tmp_path):
    text = DEFAULT_CONFIG.read_text().replace("[model]", "[unused_model]").replace(
        "options = { hidden", "# options = { hidden")
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match="unknown key 'unused_model'|missing required key 'model'"):
        load_config(path)


def test_overrides_parse_values():
    raw = {"train": {"lr": 0.1}, "features": {"sparse": [{"name": "a", "oov": "hash"}]}}
    apply_override(raw, "train.lr=0.01")
    apply_override(raw, "model.name=hyformer")  # bare word -> string, missing tables are created
    apply_override(raw, "model.options.hidden=[64, 32]")
    apply_override(raw, 'features.sparse.0.oov="error"')
    apply_override(raw, "train.allreduce = async")
    assert raw["train"] == {"lr": 0.01, "allreduce": "async"}
    assert raw["model"] == {"name": "hyformer", "options": {"hidden": [64, 32]}}
    assert raw["features"]["sparse"][0]["oov"] == "error"


@pytest.mark.parametrize("bad,message", [
    ("train.lr", "must look like section.key=value"),
    ("train..lr=1", "empty key"),
    ("features.sparse.9.oov=hash", "not an index of a list of 1"),
    ("train.lr.x=1", "not a table"),
])
def test_bad_overrides(bad, message):
    raw = {"train": {"lr": 0.1}, "features": {"sparse": [{"name": "a"}]}}
    with pytest.raises(ConfigError, match=message):
        apply_override(raw, bad)


def test_override_is_validated_like_the_file():
    with pytest.raises(ConfigError, match="train.lr must be float"):
        load_config(DEFAULT_CONFIG, ["train.lr=[1]"])
    cfg = load_config(DEFAULT_CONFIG, ["train.lr=0.5", "model.options.hidden=[8]"])
    assert cfg.train.lr == 0.5 and cfg.model.config.hidden == [8]


def test_the_retired_train_precision_still_loads_as_train_autocast(caplog):
    """train.precision (the CUDA-only bf16 switch) was folded into train.autocast: configs and the configs stored in
    older checkpoints' meta.json that hold it still load, "bf16" as train.autocast = "bf16" with a warning."""
    assert load_config(DEFAULT_CONFIG, ['train.precision="fp32"']) == load_config(DEFAULT_CONFIG)
    with caplog.at_level("WARNING", logger="hyrank.pipeline.config_retired"):
        cfg = load_config(DEFAULT_CONFIG, ['train.precision="bf16"'])
    assert cfg.train.autocast == "bf16" and "train.precision = 'bf16' is retired: read as train.autocast" in caplog.text
    assert load_config(DEFAULT_CONFIG, ['train.precision="bf16"', 'train.autocast="bf16"']).train.autocast == "bf16"
    with pytest.raises(ConfigError, match=r"train.precision \(retired\) and train.autocast disagree"):
        load_config(DEFAULT_CONFIG, ['train.precision="bf16"', 'train.autocast="off"'])
    with pytest.raises(ConfigError, match=r"train.precision \(retired\) must be one of \['bf16', 'fp32'\], got 'fp8'"):
        load_config(DEFAULT_CONFIG, ['train.precision="fp8"'])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(DEFAULT_CONFIG, ["train.lr=0.25"])
    path = save_resolved(cfg, tmp_path)
    assert path.name == "config.resolved.toml"
    assert load_config(path) == cfg


def test_extends_merges_tables_and_replaces_values(tmp_path):
    child = tmp_path / "child.toml"
    child.write_text(f'extends = "{DEFAULT_CONFIG}"\nname = "child"\n[model]\nname = "dcnv2"\noptions = {{}}\n'
                     '[train]\nlr = 0.005\n')
    base, cfg = load_config(DEFAULT_CONFIG), load_config(child)
    assert cfg.name == "child" and cfg.model.name == "dcnv2" and cfg.model.options == {}
    assert cfg.train.lr == 0.005 and cfg.train.dense_optimizer == base.train.dense_optimizer  # merged, not replaced
    assert cfg.features == base.features
    loop = tmp_path / "loop.toml"
    loop.write_text('extends = "loop.toml"\n')
    with pytest.raises(ConfigError, match="loops"):
        load_config(loop)
    orphan = tmp_path / "orphan.toml"
    orphan.write_text('extends = "missing.toml"\n')
    with pytest.raises(FileNotFoundError, match=r"missing.toml \(extended by"):
        load_config(orphan)
