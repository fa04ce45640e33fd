import json

import pytest

from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel, list_presets
from conftest import tiny_config

SEED_COUNTS = {"algpt2": 13e6, "algpt2-medium": 19e6, "algpt2-large": 26e6, "algpt2-xl": 37e6}


def test_presets_are_shipped():
    assert set(list_presets()) >= {
        "algpt2", "algpt2-medium", "algpt2-large", "algpt2-xl", "algpt2-tiny",
        "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt2-tiny"}


@pytest.mark.parametrize("name,hidden,layers,heads", [
    ("algpt2", 768, 12, 12), ("algpt2-medium", 1024, 24, 16),
    ("algpt2-large", 1280, 36, 20), ("algpt2-xl", 1600, 48, 25)])
def test_algpt2_preset_shapes(name, hidden, layers, heads):
    c = ALGPT2Config.from_preset(name)
    assert (c.hidden_size, c.num_layers, c.num_heads) == (hidden, layers, heads)
    assert c.embedding_size == 128 and c.num_layer_groups == 1 and c.tie_word_embeddings


@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt2-tiny"])
def test_gpt2_presets_are_unfactorized_and_unshared(name):
    c = ALGPT2Config.from_preset(name)
    assert c.embedding_size is None and c.num_layer_groups == c.num_layers


@pytest.mark.parametrize("name,target", sorted(SEED_COUNTS.items()))
def test_algpt2_parameter_counts_match_the_seed(name, target):
    count = ALGPT2Config.from_preset(name).num_parameters()
    assert abs(count - target) / target <= 0.07, count


def test_gpt2_parameter_count_is_exact():
    assert ALGPT2Config.from_preset("gpt2").num_parameters() == 124_439_808


@pytest.mark.parametrize("name", ["algpt2-tiny", "gpt2-tiny", "algpt2", "algpt2-medium"])
def test_analytic_count_equals_built_model(name):
    config = ALGPT2Config.from_preset(name)
    assert ALGPT2LMHeadModel(config).count_params() == config.num_parameters()


def test_analytic_count_with_tied_projection_and_groups():
    config = tiny_config(tie_projection=True, num_layers=4, num_layer_groups=2)
    assert ALGPT2LMHeadModel(config).count_params() == config.num_parameters()


def test_gpt2_model_count_is_exact():
    assert ALGPT2LMHeadModel(ALGPT2Config.from_preset("gpt2")).count_params() == 124_439_808


def test_intermediate_size_defaults_to_four_times_hidden():
    assert ALGPT2Config(hidden_size=64, num_heads=4, intermediate_size=None).intermediate_size == 256


def test_json_round_trip(tmp_path):
    config = tiny_config(tie_projection=True, activation="relu", sop_loss_weight=0.5)
    path = tmp_path / "c.json"
    config.to_json_file(path)
    assert ALGPT2Config.from_json_file(path) == config
    assert json.loads(path.read_text())["tie_projection"] is True


@pytest.mark.parametrize("overrides,field", [
    (dict(hidden_size=30, num_heads=4), "hidden_size"),
    (dict(num_layers=3, num_layer_groups=2), "num_layers"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(max_positions=-1), "max_positions"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_heads=0), "num_heads"),
    (dict(embedding_size=0), "embedding_size"),
    (dict(intermediate_size=-4), "intermediate_size"),
    (dict(num_layer_groups=0), "num_layer_groups"),
    (dict(activation="swish"), "activation"),
    (dict(attention_dropout=1.5), "attention_dropout"),
    (dict(layer_norm_epsilon=0), "layer_norm_epsilon"),
    (dict(sop_loss_weight=-1.0), "sop_loss_weight"),
    (dict(num_layers=2.5), "num_layers"),
    (dict(embedding_size=None, tie_projection=True), "tie_projection"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings"),
])
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_unknown_fields_and_presets_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="hidden_dim"):
        ALGPT2Config.from_dict({"hidden_dim": 3})
    with pytest.raises(ValueError, match="Unknown preset 'gpt5'"):
        ALGPT2Config.from_preset("gpt5")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ALGPT2Config.from_json_file(bad)
    with pytest.raises(ValueError, match="not found"):
        ALGPT2Config.from_json_file(tmp_path / "missing.json")
