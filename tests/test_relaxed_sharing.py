"""The relaxed-sharing options: per_layer_norms, lora_rank and group_order."""

import keras
import numpy as np
import pytest
from conftest import tiny_config

from algpt2_tf import ALGPT2LMHeadModel
from algpt2_tf.layers import DecoderBlock

OPTIONS = {
    "norms": dict(per_layer_norms=True),
    "lora": dict(lora_rank=3),
    "both_groups_cycle_rev": dict(per_layer_norms=True, lora_rank=2, num_layers=6,
                                  num_layer_groups=3, group_order="cycle_rev"),
    "gpt2_shape_norms_lora": dict(embedding_size=None, num_layer_groups=3, per_layer_norms=True,
                                  lora_rank=2, sop_head=False),
}


def randomized(config, seed=0):
    """A model whose every weight (the zero-initialised deltas too) is random."""
    keras.utils.set_random_seed(seed)
    model = ALGPT2LMHeadModel(config)
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 0.1, w.shape).astype("float32") + (w if w.ndim == 1 else 0)
                       for w in model.get_weights()])
    return model


@pytest.mark.parametrize("name", list(OPTIONS))
def test_parameter_count_is_exact(name):
    config = tiny_config(**OPTIONS[name])
    assert ALGPT2LMHeadModel(config).count_params() == config.num_parameters()


def test_parameter_count_formula_by_hand():
    h, i, layers, rank = 32, 64, 3, 4
    base = tiny_config().num_parameters()
    norms = tiny_config(per_layer_norms=True).num_parameters()
    lora = tiny_config(lora_rank=rank).num_parameters()
    assert norms - base == (layers - 1) * 4 * h  # 3 layers own the norms the one block gave up
    assert lora - base == layers * rank * (4 * h + 2 * h + (h + i) + (i + h))


@pytest.mark.parametrize("order, expected", [
    ("sequence", [0, 0, 1, 1, 2, 2]),
    ("cycle", [0, 1, 2, 0, 1, 2]),
    ("cycle_rev", [0, 1, 2, 2, 1, 0]),
])
def test_group_order(order, expected):
    config = tiny_config(num_layers=6, num_layer_groups=3, group_order=order)
    model = ALGPT2LMHeadModel(config)
    assert [config.block_of_layer(i) for i in range(6)] == expected
    assert [model.blocks.index(model.block_for_layer(i)) for i in range(6)] == expected


def test_group_order_changes_the_function_not_the_weights(rng):
    ids = rng.integers(0, 97, (1, 9))
    outputs = {}
    for order in ("sequence", "cycle", "cycle_rev"):
        model = randomized(tiny_config(num_layers=6, num_layer_groups=3, group_order=order))
        outputs[order] = model(ids)["logits"].numpy()
    assert np.abs(outputs["sequence"] - outputs["cycle"]).max() > 1e-3
    assert np.abs(outputs["cycle"] - outputs["cycle_rev"]).max() > 1e-3


@pytest.mark.parametrize("field, value", [("group_order", "random"), ("lora_rank", -1),
                                          ("lora_rank", 1.5), ("per_layer_norms", "yes")])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


def test_zero_initialised_deltas_give_the_plain_shared_model(rng):
    plain = randomized(tiny_config())
    keras.utils.set_random_seed(7)
    relaxed = ALGPT2LMHeadModel(tiny_config(lora_rank=4))
    # Same weights for everything the plain model has; the deltas' B start at zero.
    plain_by_path = {w.path: w for w in plain.weights}
    for weight in relaxed.weights:
        if weight.path in plain_by_path:
            weight.assign(plain_by_path[weight.path])
        elif "lora_b" in weight.path:
            assert not np.any(weight.numpy())
    ids = rng.integers(0, 97, (2, 10))
    np.testing.assert_allclose(relaxed(ids)["logits"].numpy(), plain(ids)["logits"].numpy(),
                               atol=1e-6)
    # ... and a non-zero B changes the function.
    relaxed.adapters[1].lora_b["mlp_in"].assign(np.full((4, 64), 0.5, "float32"))
    assert np.abs(relaxed(ids)["logits"].numpy() - plain(ids)["logits"].numpy()).max() > 1e-3


def test_per_layer_norms_make_the_layers_differ(rng):
    model = randomized(tiny_config(per_layer_norms=True))
    assert model.blocks[0].attention_norm is None and len(model.adapters) == 3
    ids = rng.integers(0, 97, (1, 8))
    before = model(ids)["logits"].numpy()
    model.adapters[2].mlp_norm.gamma.assign(np.full((32,), 3.0, "float32"))
    assert np.abs(model(ids)["logits"].numpy() - before).max() > 1e-3


def test_a_block_without_norms_needs_an_adapter():
    block = DecoderBlock(32, 4, 64, layer_norms=False)
    with pytest.raises(ValueError, match="no LayerNorms"):
        block(np.zeros((1, 3, 32), "float32"), np.zeros((1, 1, 3, 3), "float32"))


@pytest.mark.parametrize("name", list(OPTIONS))
def test_cached_decode_equals_full_recompute(name, rng):
    model = randomized(tiny_config(max_positions=64, **OPTIONS[name]))
    prompt = rng.integers(0, 97, 5).tolist()
    ids = list(prompt)
    for _ in range(12):
        ids.append(int(np.argmax(model(np.array([ids]))["logits"].numpy()[0, -1])))
    for jit in (False, True):
        from algpt2_tf.generation.generator import Generator

        got = Generator(model, jit_compile=jit).generate([prompt], max_new_tokens=12).new_ids[0]
        assert got == ids[len(prompt):]


@pytest.mark.parametrize("name", list(OPTIONS))
def test_keras_round_trip(name, tmp_path, rng):
    model = randomized(tiny_config(**OPTIONS[name]))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.config == model.config
    ids = rng.integers(0, 97, (2, 7))
    np.testing.assert_allclose(loaded(ids)["logits"].numpy(), model(ids)["logits"].numpy(),
                               atol=1e-6)


def test_training_updates_the_adapters(rng):
    model = ALGPT2LMHeadModel(tiny_config(per_layer_norms=True, lora_rank=2))
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    ids = rng.integers(0, 97, (4, 12)).astype("int32")
    adapter_weights = [w for adapter in model.adapters for w in adapter.weights]
    before = [w.numpy().copy() for w in adapter_weights]
    assert len(before) == 3 * (4 + 8)  # per layer: 2 LayerNorms, A and B of 4 kernels
    # Two steps: A has no gradient while B is still zero (as in LoRA).
    model.fit({"input_ids": ids, "attention_mask": np.ones_like(ids)}, epochs=2, batch_size=4,
              verbose=0)
    unchanged = [w.path for w, old in zip(adapter_weights, before) if np.allclose(w.numpy(), old)]
    assert not unchanged


# The exports (SavedModel, TFLite float32/fp16/int8, .keras) of a model with every option:
# tests/test_export.py, whose model has them all.
