"""Keras int8 (`ALGPT2LMHeadModel.quantize`): what it stores, how close it stays, and every
path a quantized model takes (save, load, generate, evaluate, export, serve, refusals)."""

import os

import keras
import numpy as np
import pytest

from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel
from algpt2_tf.cli import main
from algpt2_tf.evaluation import evaluate_texts
from algpt2_tf.export import PROBE_TEXT, export_model, probe_batch
from algpt2_tf.export.api import GREEDY_TOKENS
from algpt2_tf.layers.linear import Linear
from algpt2_tf.saving import load_model
from algpt2_tf.tokenizer import GPT2Tokenizer

CONFIG = dict(max_positions=64, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64,
              embedding_size=16, sop_head=True, initializer_range=0.1)


def small_model(seed=3, **overrides):
    keras.utils.set_random_seed(seed)
    return ALGPT2LMHeadModel(ALGPT2Config(**dict(CONFIG, **overrides)))


@pytest.fixture(scope="module")
def float_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("f32") / "m.keras")
    small_model().save(path)
    return path


@pytest.fixture(scope="module")
def int8_report(tmp_path_factory, float_path):
    """The Keras int8 export of `float_path` (`algpt2 export --format keras --quantize int8`)."""
    out = str(tmp_path_factory.mktemp("int8") / "q")
    return export_model(float_path, "keras", out, quantize="int8", log=lambda *_: None)


def logits(model, ids):
    return model({"input_ids": ids})["logits"].numpy()


def test_linear_int8_is_the_rounded_kernel_per_output_unit():
    layer = Linear(6)
    layer.build((None, 5))
    kernel = np.random.default_rng(0).normal(size=(5, 6)).astype("float32")
    layer.kernel.assign(kernel)
    x = np.random.default_rng(1).normal(size=(3, 5)).astype("float32")
    layer.quantize("int8")
    assert str(layer.kernel.dtype) == "int8" and layer.kernel_scale.shape == (6,)
    scale = 127 / np.abs(kernel).max(axis=0)
    expected = x @ (np.round(kernel * scale) / scale) + layer.bias.numpy()
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides", [{}, {"tie_projection": True}, {"embedding_size": None}])
def test_quantized_model_stays_close_and_stores_int8(overrides):
    model = small_model(**overrides)
    ids = np.array([[5, 17, 300, 4000, 9]])
    before = logits(model, ids)
    float_bytes = sum(v.numpy().nbytes for v in model.weights)
    model.quantize("int8")
    after = logits(model, ids)
    assert model.embedding.token_embeddings.dtype == "int8"
    assert all(layer.kernel.dtype == "int8" for layer in model._flatten_layers()
               if isinstance(layer, Linear))
    assert sum(v.numpy().nbytes for v in model.weights) < 0.35 * float_bytes  # E=16: scales weigh
    # Rounding to 1/254 of each row's range moves logits by a small fraction of their spread.
    assert 0 < np.abs(after - before).max() < 0.02 * before.std() * before.shape[-1] ** 0.5
    assert np.mean(after.argmax(-1) == before.argmax(-1)) >= 0.8


def test_quantize_refuses_other_modes_and_twice():
    model = small_model()
    with pytest.raises(ValueError, match="int8"):
        model.quantize("int4")
    model.quantize("int8")
    with pytest.raises(ValueError, match="already quantized"):
        model.quantize("int8")
    with pytest.raises(ValueError, match="float32 model"):
        from algpt2_tf import convert
        convert.to_hf(model, "/nonexistent/never-written")


def test_keras_int8_export_saves_loads_generates_and_evaluates(float_path, int8_report):
    report = int8_report
    assert report.quantize == "int8"
    assert os.path.getsize(report.path) < 0.4 * os.path.getsize(float_path)  # the float .keras
    float_model, model = load_model(float_path, ALGPT2LMHeadModel), load_model(report.path, ALGPT2LMHeadModel)
    assert model.quantization == "int8" and float_model.quantization is None
    ids, mask = probe_batch(GPT2Tokenizer())
    reference = small_model()
    reference.quantize("int8")  # the same weights, quantized in memory
    np.testing.assert_array_equal(logits(model, ids), logits(reference, ids))
    prompt = GPT2Tokenizer().encode(PROBE_TEXT[0])
    tokens = model.generate([prompt], max_new_tokens=GREEDY_TOKENS, stop_ids=[]).new_ids[0]
    assert tokens == model.generate([prompt], max_new_tokens=GREEDY_TOKENS, stop_ids=[]).new_ids[0]
    float_tokens = float_model.generate([prompt], max_new_tokens=GREEDY_TOKENS,
                                        stop_ids=[]).new_ids[0]
    assert report.greedy_agreement == np.mean(np.equal(tokens, float_tokens))
    text = ["The quick brown fox jumps over the lazy dog. " * 8]
    q, f = (evaluate_texts(m, GPT2Tokenizer(), text, seq_len=32, stride=16, verbose=0)
            for m in (model, float_model))
    assert q["tokens"] == f["tokens"]
    assert q["nll"] != f["nll"]
    assert abs(q["token_perplexity"] / f["token_perplexity"] - 1) < 0.05


def test_int8_savedmodel_export_serves_the_quantized_model(tmp_path, float_path):
    report = export_model(float_path, "savedmodel", str(tmp_path / "sm"), quantize="int8",
                          max_length=48, log=lambda *_: None)
    assert report.quantize == "int8" and os.path.isfile(os.path.join(report.path, "saved_model.pb"))


def test_cli_generates_with_an_int8_model_and_refuses_to_requantize_it(tmp_path, int8_report,
                                                                         capsys):
    quantized = int8_report.path
    for extra, message in [(["--format", "tflite"], "already quantized"),
                           (["--format", "keras", "--quantize", "int8"], "already quantized")]:
        assert main(["export", "--model", quantized, "--out", str(tmp_path / "x")] + extra) == 2
        assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
    assert main(["generate", "--model", quantized, "--prompt", "Hello", "--max-new-tokens", "4",
                 "--sampler", "greedy"]) == 0
    assert capsys.readouterr().out.startswith("Hello")


def test_the_batching_server_engine_serves_a_quantized_model():
    from algpt2_tf.generation.generator import SamplingParams
    from algpt2_tf.serving.batching import BatchEngine

    model = small_model()
    model.quantize("int8")
    engine = BatchEngine(model, max_batch=2, window_s=0.01)
    try:
        tokens, reason = engine.generate([5, 6, 7], 8, SamplingParams(top_k=1), 0)
    finally:
        engine.close()
    assert reason == "length"
    assert tokens == model.generate([[5, 6, 7]], max_new_tokens=8, stop_ids=[]).new_ids[0]
