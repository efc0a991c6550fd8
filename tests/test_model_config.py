"""Model Configs check their own fields: a bad option fails at load naming `model.options.<field>`, defaults pass."""

import dataclasses

import pytest

from hyrank.models import MODELS, build_model
from hyrank.models.inputs import InputShape, SequenceShape
from hyrank.pipeline.config import load_config

from conftest import DEFAULT_CONFIG

# model -> (a count field, a value out of its range); every registered model needs a row
BAD_OPTION = {
    "dlrm_mlp": ("hidden", "[64, -1]"),
    "dcnv2": ("num_cross_layers", "-1"),
    "rankmixer": ("num_layers", "-1"),
    "longer_rankmixer": ("num_layers", "-1"),
    "transformer": ("num_layers", "-1"),
    "onetrans": ("num_layers", "-1"),
    "hyformer": ("num_layers", "-1"),
    "hhft": ("num_layers", "-1"),
    "hiformer": ("num_layers", "-1"),
}

SHAPE = InputShape(blocks={"user": 12, "item": 20}, dense_dim=3,
                   sequences={"long": SequenceShape(dim=16, max_len=10)})


def _load(name: str, *options: str):
    return load_config(DEFAULT_CONFIG, [f"model.name={name}", "model.options={}", *options])


def test_every_registered_model_has_a_bad_option_case():
    assert set(BAD_OPTION) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bad_option_fails_at_load_naming_its_key(name):
    key, bad = BAD_OPTION[name]
    with pytest.raises(ValueError) as err:
        _load(name, f"model.options.{key}={bad}")
    assert f"model.options.{key}: {key} " in str(err.value)
    assert str(DEFAULT_CONFIG) in str(err.value)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_defaults_pass_and_are_parsed_once(name):
    MODELS[name].Config()
    model = _load(name).model
    assert isinstance(model.config, MODELS[name].Config)
    with pytest.raises(dataclasses.FrozenInstanceError):  # changing name/options would leave `config` stale
        model.options = {}


@pytest.mark.parametrize("name,options,message", [
    ("dlrm_mlp", {"dropout": 1.0}, r"^dropout must be in \[0, 1\), got 1.0"),
    ("dlrm_mlp", {"dropout": float("nan")}, r"^dropout must be in \[0, 1\)"),
    ("dcnv2", {"rank": -2}, r"^rank must be >= 0, got -2"),
    ("dcnv2", {"structure": "serial"}, r"^structure must be one of \['stacked', 'parallel'\], got 'serial'"),
    ("rankmixer", {"d_model": -4}, r"^d_model must be >= 0"),
    ("rankmixer", {"head_hidden": [0]}, r"^head_hidden entries must be >= 1, got \[0\]"),
    ("longer_rankmixer", {"seq_dim": 30, "seq_num_heads": 4}, r"^seq_dim must be divisible by seq_num_heads \(4\)"),
    ("longer_rankmixer", {"seq_layers": 0}, r"^seq_layers must be >= 1"),
    ("transformer", {"d_model": 30, "num_heads": 4}, r"^d_model must be divisible by num_heads \(4\), got 30"),
    ("transformer", {"num_heads": 0}, r"^num_heads must be >= 1"),
    ("transformer", {"sequence_tokens": "all"}, r"^sequence_tokens must be one of"),
    ("onetrans", {"seq_dim": 30, "num_heads": 4}, r"^seq_dim must be divisible by num_heads"),
    ("onetrans", {"num_layers": 3, "seq_queries": [4]}, r"^seq_queries needs num_layers - 1 = 2 entries"),
    ("onetrans", {"first_layer": "sparse"}, r"^first_layer must be one of \['full', 'longer'\]"),
    ("hyformer", {"d_model": 36, "num_heads": 5}, r"^d_model must be divisible by num_heads \(5\)"),
    ("hyformer", {"num_queries": 0}, r"^num_queries must be >= 1"),
    ("hyformer", {"seq_encoder": "lstm"}, r"^seq_encoder must be one of"),
    ("hhft", {"num_hiformer_layers": -1}, r"^num_hiformer_layers must be >= 0"),
    ("hiformer", {"rank": -1}, r"^rank must be >= 0"),
    ("hiformer", {"ffn_mult": 0}, r"^ffn_mult must be >= 1"),
])
def test_config_rejects(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_model(name, options, SHAPE)


@pytest.mark.parametrize("name,options", [
    ("dcnv2", {"num_cross_layers": 0, "rank": 0, "hidden": []}),  # the deep part alone, full rank
    ("rankmixer", {"d_model": 0}),  # automatic width
    ("hyformer", {"d_model": 0, "num_heads": 3}),  # automatic width is a multiple of num_heads
    ("hyformer", {"seq_encoder": "swiglu", "seq_dim": 30, "seq_num_heads": 4}),  # SwiGLU has no heads
    ("hhft", {"num_hiformer_layers": 0, "hiformer_rank": 4}),
    ("onetrans", {"d_model": 30, "seq_dim": 16, "num_heads": 4}),  # attention runs at seq_dim, not d_model
    ("onetrans", {"num_layers": 3, "seq_queries": [-1, 3]}),
])
def test_config_accepts_edge_values_that_build(name, options):
    assert build_model(name, options, SHAPE) is not None


def test_build_model_takes_its_own_config_or_a_dict():
    config = MODELS["dcnv2"].Config(rank=2)
    assert build_model("dcnv2", config, SHAPE).cfg is config
    with pytest.raises(TypeError, match="must be a DCNv2Config or a dict"):
        build_model("dcnv2", MODELS["dlrm_mlp"].Config(), SHAPE)
