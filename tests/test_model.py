import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

import algpt2_tf
from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel
from algpt2_tf.layers import (CausalSelfAttention, DecoderBlock, FactorizedEmbedding, Linear, SOPHead,
                              TiedLMHead)
from conftest import gpt2_tiny_config, tiny_config


def logits(model, ids, mask=None):
    inputs = {"input_ids": np.asarray(ids, "int32")}
    if mask is not None:
        inputs["attention_mask"] = np.asarray(mask, "int32")
    return model(inputs)["logits"].numpy()


@pytest.fixture(params=["algpt2", "gpt2"])
def model(request):
    config = tiny_config() if request.param == "algpt2" else gpt2_tiny_config()
    return ALGPT2LMHeadModel(config)


def test_outputs(rng):
    model = ALGPT2LMHeadModel(tiny_config())
    out = model({"input_ids": rng.integers(0, 97, (2, 7))})
    assert out["logits"].shape == (2, 7, 97) and out["logits"].dtype == tf.float32
    assert out["sop_logits"].shape == (2, 2)
    # The ids alone are accepted too.
    np.testing.assert_allclose(model(rng.integers(0, 97, (2, 7)))["logits"].shape, (2, 7, 97))


def test_causality(model, rng):
    ids = rng.integers(0, 97, (2, 12))
    base = logits(model, ids)
    for t in (0, 5, 10):
        changed = ids.copy()
        changed[:, t + 1:] = rng.integers(0, 97, changed[:, t + 1:].shape)
        after = logits(model, changed)
        np.testing.assert_allclose(after[:, :t + 1], base[:, :t + 1], atol=1e-5)
        assert np.abs(after[:, t + 1:] - base[:, t + 1:]).max() > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_the_unpadded_logits(model, rng, side):
    lengths = [5, 9, 3]
    width = 11
    seqs = [rng.integers(0, 96, n) for n in lengths]
    ids = np.full((3, width), 96)
    mask = np.zeros((3, width), "int32")
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    padded = logits(model, ids, mask)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        alone = logits(model, s[None])[0]
        np.testing.assert_allclose(padded[i, sl], alone, atol=1e-4)
        assert np.isfinite(padded[i]).all()


def test_sop_head_reads_the_last_real_token(rng):
    model = ALGPT2LMHeadModel(tiny_config())
    s = rng.integers(0, 96, 6)
    alone = model({"input_ids": s[None]})["sop_logits"].numpy()
    left = model({"input_ids": np.concatenate([[96, 96], s])[None],
                  "attention_mask": np.array([[0, 0] + [1] * 6])})["sop_logits"].numpy()
    right = model({"input_ids": np.concatenate([s, [96, 96]])[None],
                   "attention_mask": np.array([[1] * 6 + [0, 0]])})["sop_logits"].numpy()
    np.testing.assert_allclose(left, alone, atol=1e-5)
    np.testing.assert_allclose(right, alone, atol=1e-5)


def test_weight_count_does_not_depend_on_depth():
    shallow = ALGPT2LMHeadModel(tiny_config(num_layers=12))
    deep = ALGPT2LMHeadModel(tiny_config(num_layers=24))
    assert len(shallow.trainable_weights) == len(deep.trainable_weights)
    assert shallow.count_params() == deep.count_params()
    assert len(shallow.blocks) == 1
    # ... while depth still changes the function.
    deep.set_weights(shallow.get_weights())
    ids = np.arange(10)[None]
    assert np.abs(logits(shallow, ids) - logits(deep, ids)).max() > 1e-4


def test_layer_groups():
    model = ALGPT2LMHeadModel(tiny_config(num_layers=6, num_layer_groups=3))
    assert len(model.blocks) == 3
    assert [model.blocks.index(model.block_for_layer(i)) for i in range(6)] == [0, 0, 1, 1, 2, 2]


def test_every_weight_including_the_shared_block_receives_gradient(rng):
    model = ALGPT2LMHeadModel(tiny_config(num_layers=4))
    ids = rng.integers(0, 97, (2, 8))
    with tf.GradientTape() as tape:
        out = model({"input_ids": ids}, training=True)
        loss = model.compute_loss(x={"input_ids": ids}, y_pred=out)
    grads = tape.gradient(loss, model.trainable_weights)
    for var, grad in zip(model.trainable_weights, grads):
        if "sop_head" in var.path:
            continue
        assert grad is not None and np.abs(tf.convert_to_tensor(grad).numpy()).max() > 0, var.path


def copy_keras_hub_gpt2(hub, model):
    """Copies a keras_hub GPT2Backbone's weights into our (unfactorized, unshared) model."""
    h = model.config.hidden_size
    model.embedding.token_embeddings.assign(hub.get_layer("token_embedding").embeddings)
    model.embedding.position_embeddings.assign(hub.get_layer("position_embedding").position_embeddings)
    for i in range(model.config.num_layers):
        src = hub.get_layer(f"transformer_layer_{i}")
        dst = model.block_for_layer(i)
        att = src._self_attention_layer
        q, k, v = att._query_dense, att._key_dense, att._value_dense
        dst.attention.qkv.kernel.assign(np.concatenate(
            [d.kernel.numpy().reshape(h, h) for d in (q, k, v)], axis=1))
        dst.attention.qkv.bias.assign(np.concatenate([d.bias.numpy().reshape(h) for d in (q, k, v)]))
        dst.attention.output_dense.kernel.assign(att._output_dense.kernel.numpy().reshape(h, h))
        dst.attention.output_dense.bias.assign(att._output_dense.bias)
        for ours, theirs in ((dst.attention_norm, src._self_attention_layer_norm),
                             (dst.mlp_norm, src._feedforward_layer_norm)):
            ours.gamma.assign(theirs.gamma)
            ours.beta.assign(theirs.beta)
        for ours, theirs in ((dst.mlp_in, src._feedforward_intermediate_dense),
                             (dst.mlp_out, src._feedforward_output_dense)):
            ours.kernel.assign(theirs.kernel)
            ours.bias.assign(theirs.bias)
    final = hub.get_layer("layer_norm")
    model.lm_head.final_norm.gamma.assign(final.gamma)
    model.lm_head.final_norm.beta.assign(final.beta)


def test_gpt2_parity_with_keras_hub(rng):
    config = ALGPT2Config.from_preset("gpt2-tiny")
    hub = keras_hub.models.GPT2Backbone(
        vocabulary_size=config.vocab_size, num_layers=config.num_layers,
        num_heads=config.num_heads, hidden_dim=config.hidden_size,
        intermediate_dim=config.intermediate_size, max_sequence_length=config.max_positions,
        dropout=0.0)
    model = ALGPT2LMHeadModel(config)
    copy_keras_hub_gpt2(hub, model)
    ids = rng.integers(0, config.vocab_size, (2, 24)).astype("int32")
    hidden = hub({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    expected = hub.get_layer("token_embedding")(hidden, reverse=True).numpy()
    got = logits(model, ids)
    assert np.abs(expected).max() > 0.1  # a real comparison, not of zeros
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_keras_round_trip(tmp_path, rng):
    model = ALGPT2LMHeadModel(tiny_config(tie_projection=True, num_layers=4, num_layer_groups=2))
    ids = rng.integers(0, 97, (2, 9))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)  # safe_mode on, no custom_objects
    assert isinstance(loaded, ALGPT2LMHeadModel)
    assert loaded.config == model.config
    np.testing.assert_array_equal(logits(loaded, ids), logits(model, ids))
    np.testing.assert_array_equal(loaded(ids)["sop_logits"], model(ids)["sop_logits"])


def test_layers_serialize_from_their_config():
    layers = [
        FactorizedEmbedding(50, 8, hidden_size=16, embedding_size=4, dropout=0.1),
        CausalSelfAttention(16, 4, dropout=0.1, output_initializer_range=0.01),
        DecoderBlock(16, 4, 32, attention_dropout=0.1, activation="relu"),
        TiedLMHead(16, embedding_size=4, tie_projection=True),
        SOPHead(16, initializer_range=0.05),
        Linear(8, activation="gelu"),
    ]
    for layer in layers:
        config = layer.get_config()
        clone = type(layer).from_config(config)
        assert clone.get_config() == config
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
        assert type(restored) is type(layer)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_linear_is_bit_identical_to_dense(rng, jit_compile):
    dense, linear = keras.layers.Dense(24), Linear(24)
    for layer in (dense, linear):
        layer.build((None, None, 16))
    linear.set_weights([w + 0.5 for w in dense.get_weights()])
    dense.set_weights(linear.get_weights())  # a non-zero bias
    x = rng.standard_normal((2, 1, 16)).astype("float32")
    run = tf.function(lambda layer: layer(x), jit_compile=jit_compile)
    np.testing.assert_array_equal(run(linear).numpy(), run(dense).numpy())


def test_mixed_bfloat16_policy_runs(rng):
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = ALGPT2LMHeadModel(tiny_config())
    assert model.embedding.token_embeddings.dtype == "float32"
    assert model.blocks[0].compute_dtype == "bfloat16"
    ids = rng.integers(0, 97, (4, 16)).astype("int32")
    out = model({"input_ids": ids})
    assert out["logits"].dtype == tf.float32 and out["sop_logits"].dtype == tf.float32
    model.compile(optimizer=keras.optimizers.AdamW(1e-2))
    ds = tf.data.Dataset.from_tensor_slices({"input_ids": ids}).batch(4).repeat(8)
    history = model.fit(ds, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0])


def test_fit_reduces_loss_and_reports_metrics(rng):
    # A small factorized model escapes the unigram plateau fast with a wider init.
    model = ALGPT2LMHeadModel(tiny_config(embedding_size=32, initializer_range=0.1))
    ids = np.tile(np.arange(16, dtype="int32"), (8, 1))
    ds = tf.data.Dataset.from_tensor_slices({
        "input_ids": ids, "attention_mask": np.ones_like(ids),
        "sop_labels": np.array([0, 1] * 4)}).batch(4)
    model.compile(optimizer=keras.optimizers.AdamW(3e-3))
    history = model.fit(ds, epochs=20, verbose=0).history
    assert set(history) >= {"loss", "lm_loss", "sop_loss", "sop_accuracy", "perplexity"}
    assert history["lm_loss"][-1] < 0.5 * history["lm_loss"][0]
    np.testing.assert_allclose(history["perplexity"][-1], np.exp(history["lm_loss"][-1]), rtol=1e-4)
    np.testing.assert_allclose(
        history["loss"][-1], history["lm_loss"][-1] + history["sop_loss"][-1], rtol=1e-4)


def test_loss_masks_padding_and_honours_labels(rng):
    model = ALGPT2LMHeadModel(tiny_config(sop_head=False))
    ids = rng.integers(0, 97, (1, 6)).astype("int32")
    out = model({"input_ids": ids})
    log_probs = tf.nn.log_softmax(out["logits"]).numpy()[0]
    expected = -np.mean([log_probs[t, ids[0, t + 1]] for t in range(5)])
    got = model.compute_loss(x={"input_ids": ids}, y_pred=out).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Padding the tail changes nothing.
    padded = np.concatenate([ids, [[5, 5]]], axis=1)
    mask = np.array([[1] * 6 + [0, 0]])
    out_p = model({"input_ids": padded, "attention_mask": mask})
    got_p = model.compute_loss(x={"input_ids": padded, "attention_mask": mask}, y_pred=out_p)
    np.testing.assert_allclose(got_p.numpy(), expected, rtol=1e-5)
    # Explicit labels: only position 2 counts.
    labels = np.full((1, 6), -100)
    labels[0, 2] = 7
    got_l = model.compute_loss(x={"input_ids": ids, "labels": labels}, y_pred=out).numpy()
    np.testing.assert_allclose(got_l, -log_probs[2, 7], rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    model = ALGPT2LMHeadModel(tiny_config())
    with pytest.raises(ValueError, match=r"input_ids must be < vocab_size \(97\)"):
        model({"input_ids": np.array([[1, 97]])})
    with pytest.raises(ValueError, match=">= 0"):
        model({"input_ids": np.array([[-1, 3]])})
    with pytest.raises(ValueError, match="max_positions"):
        model({"input_ids": np.zeros((1, 33), "int32")})
    with pytest.raises(ValueError, match="integers"):
        model({"input_ids": np.zeros((1, 3), "float32")})
    with pytest.raises(ValueError, match="shape"):
        model({"input_ids": np.zeros((3,), "int32")})
    with pytest.raises(ValueError, match="input_ids"):
        model({"ids": np.zeros((1, 3), "int32")})


def test_bad_ids_are_caught_inside_a_graph_too():
    model = ALGPT2LMHeadModel(tiny_config())
    fn = tf.function(lambda ids: model({"input_ids": ids})["logits"],
                     input_signature=[tf.TensorSpec([None, None], tf.int32)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="vocab_size"):
        fn(tf.constant([[1, 200]]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_positions"):
        fn(tf.zeros((1, 40), tf.int32))


def test_package_exports():
    import os
    import subprocess
    import sys

    assert sorted(algpt2_tf.__all__) == ["ALGPT2Backbone", "ALGPT2Config", "ALGPT2LMHeadModel",
                                         "__version__", "list_presets", "list_pretrained"]
    assert all(hasattr(algpt2_tf, name) for name in algpt2_tf.__all__)
    # Importing the model registers the classes with Keras (a .keras file then loads without
    # custom_objects); `import algpt2_tf` alone imports no TensorFlow or Keras, and reads and
    # changes no environment variable.
    assert keras.saving.get_registered_object("algpt2_tf>ALGPT2LMHeadModel") is ALGPT2LMHeadModel
    assert keras.saving.get_registered_object("algpt2_tf>ALGPT2Backbone") is algpt2_tf.ALGPT2Backbone
    code = ("import os, sys; before_env = dict(os.environ); import algpt2_tf\n"
            "before = 'tensorflow' in sys.modules or 'keras' in sys.modules\n"
            "same_env = dict(os.environ) == before_env\n"
            "model_class = algpt2_tf.ALGPT2LMHeadModel\n"
            "print(before, same_env, model_class.__module__, 'tensorflow' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout.split() == ["False", "True", "algpt2_tf.causal_lm", "True"], done.stderr[-2000:]


def test_a_file_loads_as_the_backbone_or_the_task_whichever_saved_it(tmp_path):
    """Backbone/task split: one file format; `saving.load_model(path, cls)` picks the class,
    and only the task generates."""
    from algpt2_tf import ALGPT2Backbone
    from algpt2_tf.saving import load_model

    config = ALGPT2Config(vocab_size=97, max_positions=16, hidden_size=16, num_layers=2,
                          num_heads=2, intermediate_size=32, embedding_size=8)
    ids = np.array([[5, 6, 7]])
    for saver in (ALGPT2Backbone, ALGPT2LMHeadModel):
        model = saver(config)
        path = str(tmp_path / f"{saver.__name__}.keras")
        model.save(path)
        expected = model({"input_ids": ids})["logits"]
        for cls in (ALGPT2Backbone, ALGPT2LMHeadModel):
            loaded = load_model(path, cls)
            assert type(loaded) is cls
            np.testing.assert_allclose(loaded({"input_ids": ids})["logits"], expected, atol=1e-6)
        assert not hasattr(load_model(path, ALGPT2Backbone), "generate")
        task = ALGPT2LMHeadModel.from_preset(path)
        assert len(task.generate(ids, max_new_tokens=3, stop_ids=[]).new_ids[0]) == 3
