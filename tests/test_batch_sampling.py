"""The batch engine's sampler: `per_row_tokens` and `inverse_cdf_sample`."""

import numpy as np
import tensorflow as tf

from algpt2_tf.serving.batching import SAMPLE_BLOCK, inverse_cdf_sample, per_row_tokens


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


def test_per_row_tokens_draws_from_each_rows_distribution():
    rows, draws = 4, 4000
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4, 0.0]] * rows, np.float32) + 1e-30)
    settings = dict(temperature=np.ones(rows, np.float32), top_k=np.array([0, 0, 2, 1], np.int32),
                    top_p=np.ones(rows, np.float32), penalty=np.ones(rows, np.float32),
                    seeds=np.arange(rows, dtype=np.int32))
    draw = tf.function(lambda step: per_row_tokens(logits, tf.zeros_like(logits), steps=step,
                                                   **settings), jit_compile=True)
    tokens = np.stack([draw(tf.fill([rows], k)).numpy() for k in range(draws)])
    frequencies = np.stack([np.bincount(tokens[:, b], minlength=5) / draws for b in range(rows)])
    np.testing.assert_allclose(frequencies[0], [0.1, 0.2, 0.3, 0.4, 0.0], atol=0.025)
    np.testing.assert_allclose(frequencies[1], frequencies[0], atol=0.03)  # another seed
    np.testing.assert_allclose(frequencies[2], [0, 0, 3 / 7, 4 / 7, 0], atol=0.03)  # top-2
    assert (tokens[:, 3] == 3).all()  # top_k 1 is greedy
    again = np.stack([draw(tf.fill([rows], k)).numpy() for k in range(50)])
    assert (again == tokens[:50]).all()  # seeded by (seed, step) alone
