"""The one sampler: `token_choice.choose_tokens` (TensorFlow) and its NumPy twin
`sampling.pick_tokens`, and the same seed giving the same tokens on every path."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import decode_test_model

from algpt2_tf.generation import sampling
from algpt2_tf.generation.generator import Generator
from algpt2_tf.generation.host_loop import HostLoopGenerator
from algpt2_tf.generation.sampling import SamplingParams, pick_tokens, row_seed, sampling_params
from algpt2_tf.generation.token_choice import (SAMPLE_BLOCK, choose_tokens, inverse_cdf_sample,
                                               row_uniforms)
from algpt2_tf.serving.batching import BatchEngine


def reference_sample(logits, u):
    """The textbook inverse CDF in float64: the first index whose running total passes `u`."""
    weights = np.exp(logits - logits.max())
    ends = np.cumsum(weights)
    return int(np.searchsorted(ends, u * ends[-1], side="right"))


def test_inverse_cdf_sample_equals_one_long_cumulative_sum():
    rng = np.random.default_rng(0)
    vocab = 3 * SAMPLE_BLOCK + 37  # a partial last block
    logits = (3 * rng.standard_normal((8, vocab))).astype(np.float32)
    logits[:, rng.choice(vocab, 200, replace=False)] = -np.inf  # filtered tokens
    logits[3, :SAMPLE_BLOCK] = -np.inf  # a whole empty block
    uniforms = rng.random((8, 64)).astype(np.float32)
    sample = tf.function(inverse_cdf_sample, jit_compile=True)
    got = np.stack([sample(logits, uniforms[:, j]).numpy() for j in range(64)], axis=1)
    want = np.array([[reference_sample(logits[b].astype(np.float64), float(uniforms[b, j]))
                      for j in range(64)] for b in range(8)])
    assert (got == want).mean() > 0.99  # float32 against float64: a boundary may round apart
    assert np.isfinite(logits[np.arange(8)[:, None], got]).all()  # never a filtered token


def test_inverse_cdf_sample_at_the_ends_of_the_unit_interval():
    logits = np.full((2, 600), -np.inf, np.float32)
    logits[:, [5, 300, 511]] = [0.0, 1.0, 2.0]
    for u, want in ((0.0, 5), (np.nextafter(np.float32(1), np.float32(0)), 511)):
        got = inverse_cdf_sample(tf.constant(logits), tf.fill([2], np.float32(u))).numpy()
        assert got.tolist() == [want, want]


def test_choose_tokens_draws_from_each_rows_distribution():
    rows, draws = 4, 4000
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4, 0.0]] * rows, np.float32) + 1e-30)
    settings = dict(temperature=np.ones(rows, np.float32), top_k=np.array([0, 0, 2, 1], np.int32),
                    top_p=np.ones(rows, np.float32), penalty=np.ones(rows, np.float32),
                    seeds=np.arange(rows, dtype=np.int32))
    draw = tf.function(lambda step: choose_tokens(logits, tf.zeros_like(logits), steps=step,
                                                  **settings), jit_compile=True)
    tokens = np.stack([draw(tf.fill([rows], k)).numpy() for k in range(draws)])
    frequencies = np.stack([np.bincount(tokens[:, b], minlength=5) / draws for b in range(rows)])
    np.testing.assert_allclose(frequencies[0], [0.1, 0.2, 0.3, 0.4, 0.0], atol=0.025)
    np.testing.assert_allclose(frequencies[1], frequencies[0], atol=0.03)  # another seed
    np.testing.assert_allclose(frequencies[2], [0, 0, 3 / 7, 4 / 7, 0], atol=0.03)  # top-2
    assert (tokens[:, 3] == 3).all()  # top_k 1 is greedy
    again = np.stack([draw(tf.fill([rows], k)).numpy() for k in range(50)])
    assert (again == tokens[:50]).all()  # seeded by (seed, step) alone


def test_uniforms_are_the_same_numbers_in_tensorflow_and_numpy():
    seeds = np.array([0, 1, 2, -1, -2 ** 31, 2 ** 31 - 1, 12345, 7] * 4, np.int64)
    steps = np.repeat(np.array([0, 1, 2, 1000], np.int64), 8)
    want = sampling.row_uniforms(seeds, steps)
    got = tf.function(row_uniforms, jit_compile=True)(seeds.astype(np.int32),
                                                      steps.astype(np.int32)).numpy()
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.float32 and (got >= 0).all() and (got < 1).all()
    assert len(set(got.tolist())) == len(got)  # neighbouring seeds and steps draw apart
    many = sampling.row_uniforms(np.arange(20000), 3)
    assert abs(many.mean() - 0.5) < 0.01 and abs((many < 0.1).mean() - 0.1) < 0.01
    assert row_seed(2 ** 31 - 1, 1) == -2 ** 31 and row_seed(5, 2) == 7


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.9), SamplingParams(temperature=1.3, top_k=7),
    SamplingParams(top_p=0.8), SamplingParams(temperature=0.7, top_k=20, top_p=0.9,
                                              repetition_penalty=1.3),
    SamplingParams(top_k=1, repetition_penalty=1.5), SamplingParams(temperature=0.0)])
def test_the_numpy_twin_picks_the_same_tokens(params):
    rng = np.random.default_rng(1)
    rows, vocab = 6, 3 * SAMPLE_BLOCK + 5
    choose = tf.function(choose_tokens, jit_compile=True)
    agree = total = 0
    settings = (np.float32(params.temperature), np.int32(params.top_k), np.float32(params.top_p),
                np.float32(params.repetition_penalty))
    for step in range(20):
        logits = (2 * rng.standard_normal((rows, vocab))).astype(np.float32)
        seen = rng.random((rows, vocab)) < 0.05
        seeds = [row_seed(11, r) for r in range(rows)]
        want = pick_tokens(logits, seen, params, seeds, step)
        got = choose(logits, seen.astype(np.float32), *settings, np.int32(seeds),
                     np.int32(step)).numpy()
        agree += (got == want).sum()
        total += rows
    assert agree >= total - 2  # float32 against float64: a boundary may round apart


def test_the_numpy_draw_among_few_tokens_is_the_draw_over_all():
    """`sampling.inverse_cdf_sample` draws among the drawable tokens alone when they are few
    (top-k, top-p): the same index as the running sums over the whole vocabulary, at every
    uniform, the ends of the interval included."""
    from algpt2_tf.generation.sampling import _inverse_cdf, inverse_cdf_sample

    rng = np.random.default_rng(3)
    logits = (3 * rng.standard_normal((4, 5000))).astype(np.float64)
    for row, k in enumerate((1, 2, 50, 2400)):  # 2,400 of 5,000: under half, still compacted
        kth = np.sort(logits[row])[-k]
        logits[row] = np.where(logits[row] < kth, -np.inf, logits[row])
    logits[3, :3] = -700.0  # drawable, but of weight 0 next to the others
    for uniform in np.concatenate([rng.random(200), [0.0, 1.0 - 2 ** -24]]):
        uniforms = np.full(4, uniform)
        np.testing.assert_array_equal(inverse_cdf_sample(logits, uniforms),
                                      _inverse_cdf(logits, uniforms))


@pytest.fixture(scope="module")
def model():
    return decode_test_model("algpt2")


def test_a_seed_gives_the_same_tokens_on_every_path(model):
    """`model.generate` (the XLA loop, batched), `Generator.stream` (`algpt2 generate`), the
    serving engine (the OpenAI server) and the host loop (torch/JAX, here on TensorFlow):
    row r of a batch seeded s is what a request seeded s + r gets alone."""
    prompts, new = [[5, 17, 42], [8, 1]], 12
    params = SamplingParams(temperature=1.5, top_k=20, top_p=0.95, repetition_penalty=1.2)
    generator = Generator(model)
    batched = generator.generate(prompts, new, params, seed=40).new_ids
    assert batched[0] != generator.generate(prompts, new, params, seed=41).new_ids[0]
    streamed = [list(generator.stream(p, new, params, seed=40 + r)) for r, p in enumerate(prompts)]
    host = HostLoopGenerator(model).generate(prompts, new, params, seed=40).new_ids
    engine = BatchEngine(model, max_batch=2, window_s=0.05)
    try:
        served = [engine.generate(p, new, params, seed=40 + r)[0] for r, p in enumerate(prompts)]
    finally:
        engine.close()
    assert batched == streamed == host == served


def test_a_top_k_past_int32_keeps_every_token(model):
    """A huge top_k (any non-negative integer is valid) is every token, not an int32 wrap."""
    huge = sampling_params("top_k", 1.0, top_k=2 ** 40)
    assert huge.top_k == 2 ** 31 - 1
    generator = Generator(model)
    plain = generator.generate([[5, 6]], 6, sampling_params("sample", 1.0), seed=2).new_ids
    assert generator.generate([[5, 6]], 6, huge, seed=2).new_ids == plain


def test_one_seeded_top_p_request_gives_the_same_text_through_every_entry_point(
        tmp_path, capsys):
    """Python (`model.generate`), the CLI (`algpt2 generate`), the OpenAI server alone and
    the OpenAI server batched with two other requests: one prompt, top-p 0.9, seed 7, the
    same text."""
    import concurrent.futures

    import keras
    from conftest import tiny_config
    from fastapi.testclient import TestClient

    from algpt2_tf import ALGPT2LMHeadModel
    from algpt2_tf.cli import main
    from algpt2_tf.saving import load_model
    from algpt2_tf.serving.openai_api import create_app
    from algpt2_tf.tokenizer import GPT2Tokenizer

    keras.utils.set_random_seed(11)
    model = ALGPT2LMHeadModel(tiny_config(vocab_size=50257, max_positions=64, sop_head=False,
                                          initializer_range=0.2))
    path = str(tmp_path / "tiny.keras")
    model.save(path)
    prompt, new, seed = "The old house stood", 12, 7
    python = model.generate(prompt, max_new_tokens=new, sampler="top_p", top_p=0.9,
                            seed=seed).text[0]
    assert python != model.generate(prompt, max_new_tokens=new, sampler="top_p", top_p=0.9,
                                    seed=seed + 1).text[0]  # the seed matters
    capsys.readouterr()
    assert main(["generate", "--model", path, "--prompt", prompt, "--max-new-tokens", str(new),
                 "--sampler", "top_p", "--top-p", "0.9", "--temperature", "1.0",
                 "--seed", str(seed)]) == 0
    cli = capsys.readouterr().out.rstrip("\n")

    engine = BatchEngine(load_model(path, ALGPT2LMHeadModel), max_batch=4, window_s=0.5)
    app = TestClient(create_app(engine, GPT2Tokenizer(), "tiny"))

    def complete(text, **settings):
        answer = app.post("/v1/completions", json=dict(model="tiny", prompt=text,
                                                       max_tokens=new, **settings))
        assert answer.status_code == 200, answer.text
        return prompt + answer.json()["choices"][0]["text"] if text == prompt else None

    try:
        alone = complete(prompt, top_p=0.9, seed=seed)
        before = engine.batches_run
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # within one batch window
            futures = [pool.submit(lambda text, settings: complete(text, **settings), *args)
                       for args in (("Once upon a time", dict(temperature=0.7, seed=3)),
                                    (prompt, dict(top_p=0.9, seed=seed)),
                                    ("A long", dict(temperature=0)))]
            batched = [f.result() for f in futures][1]
        assert engine.batches_run - before == 1  # the three shared one batch
    finally:
        engine.close()
    assert python == cli == alone == batched
