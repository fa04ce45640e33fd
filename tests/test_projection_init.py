"""`projection_init`: how the factorization's two projections start."""

import keras
import numpy as np
import pytest

from algpt2_tf import ALGPT2LMHeadModel
from algpt2_tf.layers import FactorizedEmbedding, TiedLMHead
from conftest import tiny_config

SHAPE = dict(hidden_size=64, embedding_size=32, intermediate_size=128)


def projection_stds(config, seed=0):
    keras.utils.set_random_seed(seed)
    model = ALGPT2LMHeadModel(config)
    model(np.zeros((1, 4), "int32"))
    return (float(np.std(model.embedding.projection.kernel.numpy())),
            float(np.std(model.lm_head.projection.kernel.numpy())))


def test_fan_in_keeps_the_scale_and_normal_is_the_default():
    assert tiny_config().projection_init == "normal"
    normal_in, normal_out = projection_stds(tiny_config(**SHAPE))
    fan_in_in, fan_in_out = projection_stds(tiny_config(projection_init="fan_in", **SHAPE))
    # Truncated at two stddevs, a normal's spread is about 0.88 of its stddev.
    np.testing.assert_allclose([normal_in, normal_out], 0.88 * 0.02, rtol=0.1)
    np.testing.assert_allclose([fan_in_in, fan_in_out], [0.88 / 32 ** 0.5, 0.88 / 64 ** 0.5],
                               rtol=0.1)


def test_fan_in_model_starts_with_gpt2_scaled_hidden_states(rng):
    """The point of `fan_in`: the embedding's output has the tables' scale."""
    ids = rng.integers(0, 97, (4, 16))
    scales = {}
    for init in ("normal", "fan_in"):
        keras.utils.set_random_seed(0)
        layer = FactorizedEmbedding(97, 32, 64, embedding_size=32, projection_init=init)
        out = layer(ids, np.broadcast_to(np.arange(16), ids.shape)).numpy()
        scales[init] = float(np.std(out))
    table_scale = 0.88 * 0.02 * 2 ** 0.5  # token + position rows
    assert scales["fan_in"] == pytest.approx(table_scale, rel=0.2)
    assert scales["normal"] < table_scale / 3


def test_layer_configs_mirror_the_constructor():
    layer = FactorizedEmbedding(97, 32, 64, embedding_size=32, projection_init="fan_in")
    assert FactorizedEmbedding.from_config(layer.get_config()).projection_init == "fan_in"
    head = TiedLMHead(64, 32, projection_init="fan_in")
    assert TiedLMHead.from_config(head.get_config()).projection_init == "fan_in"


def test_keras_round_trip_keeps_the_option(tmp_path, rng):
    keras.utils.set_random_seed(0)
    model = ALGPT2LMHeadModel(tiny_config(projection_init="fan_in"))
    ids = rng.integers(0, 97, (2, 8))
    before = model(ids)["logits"].numpy()
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.config.projection_init == "fan_in"
    np.testing.assert_allclose(loaded(ids)["logits"].numpy(), before, atol=1e-6)


def test_bad_value_names_the_field():
    with pytest.raises(ValueError, match="projection_init"):
        tiny_config(projection_init="xavier")
