import gc
import weakref

import numpy as np
import pytest
import tensorflow as tf
from conftest import decode_test_model, tiny_config

from algpt2_tf import ALGPT2LMHeadModel
from algpt2_tf.generation import generator
from algpt2_tf.generation.generator import Generator, SamplingParams, cache_lengths, sampling_params
from algpt2_tf.generation.token_choice import (apply_repetition_penalty, choose_tokens,
                                               filter_logits, first_argmax)


@pytest.fixture(params=["algpt2", "gpt2"], scope="module")
def model(request):
    return decode_test_model(request.param)


# The decode loop's own behaviour (batching, streaming, traces, seeds, stops) does not depend on
# the model's shape: the fast tier runs it on the `algpt2` model, the slow tier on `gpt2` too.
# The model-level checks (cached logits, greedy with and without the cache, the host loop, the
# growing cache without XLA) run on both in the fast tier.
LOOP_MODELS = pytest.mark.parametrize(
    "model", ["algpt2", pytest.param("gpt2", marks=pytest.mark.slow)], indirect=True)


def full_logits(model, ids, mask=None):
    inputs = {"input_ids": np.asarray(ids, np.int32)}
    if mask is not None:
        inputs["attention_mask"] = np.asarray(mask, np.int32)
    return model(inputs)["logits"].numpy()


@pytest.mark.parametrize("padded", [False, True])
def test_cached_logits_equal_full_recompute(model, padded, rng):
    ids = rng.integers(0, 97, (2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    if padded:
        mask[0, :4] = 0  # left padding in row 0
    else:
        ids, mask = ids[:1], mask[:1]
    max_length = 16
    prefill = 8
    caches = model.empty_caches(ids.shape[0], max_length)
    key_mask = np.zeros((ids.shape[0], max_length), np.int32)
    key_mask[:, :prefill] = mask[:, :prefill]
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    logits, caches = model.forward_with_cache(ids[:, :prefill], positions[:, :prefill], key_mask,
                                              caches, 0)
    got = [logits.numpy()]
    last, _ = model.forward_with_cache(ids[:, :prefill], positions[:, :prefill], key_mask,
                                       model.empty_caches(ids.shape[0], max_length), 0,
                                       last_logits_only=True)
    np.testing.assert_allclose(last.numpy(), got[0][:, -1:], atol=1e-5)
    for t in range(prefill, 12):
        key_mask[:, t] = 1
        step, caches = model.forward_with_cache(ids[:, t:t + 1], positions[:, t:t + 1], key_mask,
                                                caches, t)
        got.append(step.numpy())
    got = np.concatenate(got, axis=1)
    expected = full_logits(model, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4)


def naive_greedy(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(np.argmax(full_logits(model, [ids])[0, -1])))
    return ids[len(prompt):]


def test_greedy_with_cache_equals_without(model):
    generator = Generator(model)
    prompt = [5, 17, 42, 8, 3]
    out = generator.generate([prompt], max_new_tokens=20)
    assert out.new_ids[0] == naive_greedy(model, prompt, 20)
    assert out.ids[0] == prompt + out.new_ids[0]


def test_cache_lengths_double_up_to_max_length():
    assert cache_lengths(40) == [40]
    assert cache_lengths(64) == [64]
    assert cache_lengths(192) == [64, 128, 192]
    assert cache_lengths(1024) == [64, 128, 256, 512, 1024]
    assert cache_lengths(256, first=32) == [32, 64, 128, 256]  # the TFLite export's steps


@pytest.mark.parametrize("model, jit", [
    ("algpt2", True), ("gpt2", False),
    pytest.param("algpt2", False, marks=pytest.mark.slow),
    pytest.param("gpt2", True, marks=pytest.mark.slow)], indirect=["model"])
def test_growing_cache_gives_the_same_tokens(model, monkeypatch, jit):
    # Cache lengths 4, 8, 16, 32, 64: the prompt bucket (16) skips the first
    # three loops, then the cache grows twice while decoding.
    monkeypatch.setattr(generator, "CACHE_SEGMENT", 4)
    prompts = [[5, 17, 42], [9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
    out = Generator(model, jit_compile=jit).generate(prompts, max_new_tokens=30)
    assert out.new_ids == [naive_greedy(model, p, 30) for p in prompts]


@LOOP_MODELS
def test_batch_equals_one_by_one(model):
    generator = Generator(model)
    prompts = [[5, 17, 42, 8, 3], [9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
    batch = generator.generate(prompts, max_new_tokens=12).new_ids
    alone = [generator.generate([p], max_new_tokens=12).new_ids[0] for p in prompts]
    assert batch == alone


def test_the_host_loop_gives_the_xla_loops_greedy_tokens(model):
    # The torch / JAX decode loop (here on TensorFlow): same steps, same picks.
    from algpt2_tf.generation.host_loop import HostLoopGenerator

    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    expected = Generator(model).generate(prompts, 10, SamplingParams(top_k=1), 0, ()).new_ids
    assert HostLoopGenerator(model).generate(prompts, 10).new_ids == expected


@LOOP_MODELS
def test_stream_equals_generate(model):
    generator = Generator(model)
    prompt = [4, 8, 15, 16, 23, 42]
    for params in (SamplingParams(top_k=1), sampling_params("top_p", 0.9, top_p=0.8)):
        expected = generator.generate([prompt], 15, params, seed=5).new_ids[0]
        assert list(generator.stream(prompt, 15, params, seed=5)) == expected


@LOOP_MODELS
def test_compiled_once_per_bucket(model):
    generator = Generator(model)
    generator.generate([[1, 2, 3]], max_new_tokens=8)
    generator.generate([[4, 5, 6, 7, 8]], max_new_tokens=10, params=sampling_params("top_k", 0.7, top_k=5), seed=3)
    assert generator.trace_count == 1
    # Batches of more than one row get their own trace (no row-major copies), once.
    generator.generate([[4, 5], [6, 7, 8, 9]], max_new_tokens=8, params=sampling_params("top_p", 1.2, top_p=0.5))
    generator.generate([[4], [6, 7], [1]], max_new_tokens=8)
    assert generator.trace_count == 2


@LOOP_MODELS
def test_seeded_sampling_is_reproducible(model):
    generator = Generator(model)
    params = sampling_params("sample", temperature=1.5)
    a = generator.generate([[1, 2, 3]], 20, params, seed=11).new_ids
    b = generator.generate([[1, 2, 3]], 20, params, seed=11).new_ids
    c = generator.generate([[1, 2, 3]], 20, params, seed=12).new_ids
    assert a == b and a != c


@LOOP_MODELS
def test_stops_at_stop_ids(model):
    generator = Generator(model)
    free = generator.generate([[5, 17, 42]], max_new_tokens=10).new_ids[0]
    stop = free[3]
    out = generator.generate([[5, 17, 42], [5, 17, 42]], max_new_tokens=10, stop_ids=[stop]).new_ids
    assert out[0] == free[:free.index(stop) + 1] == out[1]


@LOOP_MODELS
def test_temperature_zero_is_greedy(model):
    generator = Generator(model)
    greedy = generator.generate([[3, 1, 4]], 10).new_ids
    assert generator.generate([[3, 1, 4]], 10, sampling_params("sample", temperature=0.0), seed=9).new_ids == greedy


@pytest.mark.parametrize("jit", [False, True])
def test_first_argmax_is_argmax_with_first_index_on_ties(rng, jit):
    logits = rng.normal(size=(6, 301)).astype(np.float32)
    logits[1, [7, 40, 300]] = 9.0  # a three-way tie: the first wins
    logits[2, :] = -np.inf
    logits[2, 5] = -3.0
    logits[3, :] = 0.0
    got = tf.function(first_argmax, jit_compile=jit)(tf.constant(logits)).numpy()
    np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
    assert got.dtype == np.int32 and got[1] == 7 and got[3] == 0
    nan_row = tf.function(first_argmax, jit_compile=jit)(tf.fill([1, 301], np.nan)).numpy()
    assert 0 <= nan_row[0] < 301


def test_top_k_never_leaves_the_k_best(rng):
    logits = tf.constant(rng.normal(size=(4, 200)).astype(np.float32))
    seen = tf.zeros_like(logits)
    best = np.argsort(-logits.numpy(), axis=1)[:, :5]
    for seed in range(40):
        tokens = choose_tokens(logits, seen, 1.0, 5, 1.0, 1.0, seed, 0).numpy()
        assert all(t in best[row] for row, t in enumerate(tokens))


def test_top_p_never_leaves_the_nucleus(rng):
    logits = rng.normal(size=(3, 100)).astype(np.float32) * 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    nuclei = []
    for row in probs:
        order = np.argsort(-row)
        before = np.cumsum(row[order]) - row[order]
        nuclei.append(set(order[before < 0.6].tolist()))
    seen = tf.zeros_like(logits)
    picked = [set() for _ in nuclei]
    for seed in range(60):
        tokens = choose_tokens(tf.constant(logits), seen, 1.0, 0, 0.6, 1.0, seed, 1).numpy()
        for row, t in enumerate(tokens):
            assert t in nuclei[row]
            picked[row].add(int(t))
    assert any(len(p) > 1 for p in picked)  # it does sample
    kept = np.isfinite(filter_logits(logits, tf.zeros([3], tf.int32), tf.fill([3], 0.6)).numpy())
    assert [set(np.flatnonzero(k).tolist()) for k in kept] == nuclei


def test_repetition_penalty_discourages_seen_tokens():
    logits = tf.constant([[2.0, 1.9, -1.0]])
    seen = tf.constant([[1.0, 0.0, 0.0]])
    assert choose_tokens(logits, seen, 1.0, 1, 1.0, 1.2, 0, 0).numpy()[0] == 1
    assert choose_tokens(logits, seen, 1.0, 1, 1.0, 1.0, 0, 0).numpy()[0] == 0
    penalized = apply_repetition_penalty(tf.constant([[2.0, -1.0, 3.0]]),
                                         tf.constant([[1.0, 1.0, 0.0]]), 2.0)
    np.testing.assert_array_equal(penalized.numpy(), [[1.0, -2.0, 3.0]])


def test_model_generate_with_text_and_ids():
    model = ALGPT2LMHeadModel(tiny_config(vocab_size=50257, max_positions=64))
    out = model.generate(["Hello world", "A longer prompt here"], max_new_tokens=6, seed=1)
    assert len(out.text) == 2 and out.text[0].startswith("Hello world")
    assert out.ids[0][:2] == [15496, 995]
    ids_out = model.generate(np.array([[15496, 995]]), max_new_tokens=6)
    assert ids_out.text is None and ids_out.new_ids[0] == out.new_ids[0][:len(ids_out.new_ids[0])]


def test_bad_generation_requests(model):
    generator = Generator(model)
    with pytest.raises(ValueError, match="max_positions"):
        generator.generate([[1] * 60], max_new_tokens=10)
    with pytest.raises(ValueError, match="empty"):
        generator.generate([[]], max_new_tokens=3)
    with pytest.raises(ValueError, match="ids must be in"):
        generator.generate([[1, 500]], max_new_tokens=3)
    with pytest.raises(ValueError, match="sampler"):
        sampling_params("beam")
    with pytest.raises(ValueError, match="top_p"):
        sampling_params("top_p", top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        sampling_params("sample", temperature=-1)


def test_the_generator_cache_does_not_keep_a_model_alive():
    """`model.generate` caches the model's compiled loops; once the model is gone, so are
    they (a strong reference from the cache let every test worker grow past 10 GB)."""
    model = ALGPT2LMHeadModel(tiny_config())
    model.generate([[1, 2, 3]], max_new_tokens=3, stop_ids=[])
    list(generator.generator_for(model).stream([1, 2], 2))
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
