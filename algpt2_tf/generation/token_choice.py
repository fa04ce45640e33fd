"""The next token, in TensorFlow: the one sampler of every TensorFlow path.

The compiled decode loop (`generation.decode`: `model.generate`, `algpt2 generate`, the
SavedModel's `generate` signature) and the serving engine (`serving/batching.py`) pick
tokens with `choose_tokens`; the paths whose logits arrive in NumPy (the torch/JAX host
loop, the LiteRT engine) with its twin `sampling.pick_tokens`. Both, row by row:

1. apply the repetition penalty (CTRL) to the tokens already in the row;
2. greedy rows (`top_k == 1` or `temperature <= 0`) take the first argmax;
3. other rows divide by the temperature, keep the `top_k` best (0: all), then the nucleus
   of what is left (the fewest tokens whose probability reaches `top_p`; 1: all);
4. and draw by inverse CDF with one uniform per row, `row_uniforms(seed, step)`: a 32-bit
   integer hash of the row's seed and the number of tokens it has so far.

So a seed means one thing everywhere: row `r` of a request with seed `s` draws its step-`t`
token with the uniform of `(s + r, t)` (`sampling.row_seed`) on every path, whatever else
shares the batch, and the same logits give the same token (up to float rounding at a
boundary of the cumulative sum).

Example:

>>> import tensorflow as tf
>>> logits = tf.math.log([[0.25, 0.0, 0.75], [0.25, 0.0, 0.75]])
>>> choose_tokens(logits, tf.zeros_like(logits), temperature=1.0, top_k=[1, 0], top_p=1.0,
...               penalty=1.0, seeds=[0, 1], steps=0).numpy().tolist()
[2, 2]
"""

import numpy as np
import tensorflow as tf

from algpt2_tf.generation.sampling import HASH_MULTIPLIERS, STEP_MULTIPLIER

SAMPLE_BLOCK = 256
"""The block width of `inverse_cdf_sample`'s two-level cumulative sum."""


def _mix32(x):
    """A 32-bit integer hash of uint32 `x` (`sampling._mix32`'s twin)."""
    first, second = (tf.constant(m, tf.uint32) for m in HASH_MULTIPLIERS)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32))) * first
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(15, tf.uint32))) * second
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))


def row_uniforms(seeds, steps):
    """Float32 uniforms in [0, 1), one per row, from int32 `seeds` and `steps` (each a
    scalar or `[batch]`): the same numbers as `sampling.row_uniforms`."""
    seeds = tf.bitcast(tf.cast(seeds, tf.int32), tf.uint32)
    steps = tf.bitcast(tf.cast(steps, tf.int32), tf.uint32)
    mixed = _mix32(tf.bitwise.bitwise_xor(_mix32(seeds),
                                          steps * tf.constant(STEP_MULTIPLIER, tf.uint32)))
    return tf.cast(tf.bitwise.right_shift(mixed, tf.constant(8, tf.uint32)), tf.float32) * 2.0 ** -24


def apply_repetition_penalty(logits, seen, penalty):
    """CTRL's penalty on the tokens marked in `seen` `[batch, vocab]`; `penalty`
    is one number, or one per row `[batch]`.

    A penalty of 1 (the default) changes nothing, and skips the pass over the
    vocabulary (about 3% of a batch-1 decode step).
    """
    logits = tf.cast(logits, tf.float32)
    penalty = tf.reshape(tf.cast(penalty, tf.float32), [-1, 1])  # one row, or one per row

    def penalize():
        penalized = tf.where(logits > 0, logits / penalty, logits * penalty)
        return tf.where(seen > 0, penalized, logits)

    return tf.cond(tf.reduce_all(tf.equal(penalty, 1.0)), lambda: logits, penalize)


def first_argmax(logits):
    """`tf.argmax(logits, axis=-1)` (int32, first index on ties) as two plain reductions.

    XLA:CPU compiles `ArgMax` to a scalar loop over the (value, index) pairs:
    over a 50257-word vocabulary that took 4% of a batch-1 decode step.
    """
    vocab = tf.shape(logits)[-1]
    best = tf.reduce_max(logits, axis=-1, keepdims=True)
    first = tf.reduce_min(tf.where(logits == best, tf.range(vocab), vocab), axis=-1)
    return tf.minimum(first, vocab - 1)  # a NaN row matches nothing: still a valid id


def plain_argmax(logits):
    """`tf.argmax` as int32 (what `first_argmax` replaces, for comparisons)."""
    return tf.argmax(logits, axis=-1, output_type=tf.int32)


def filter_logits(scaled, top_k, top_p):
    """`-inf` on the tokens that top-k (`[batch]` int32, 0: none) and then the nucleus of
    what it keeps (`[batch]` float32, 1: none) leave out of float32 `[batch, vocab]`
    logits (already divided by the temperature)."""
    vocab = tf.shape(scaled)[-1]
    ordered = tf.sort(scaled, direction="DESCENDING", axis=-1)
    k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)
    ordered = tf.where(tf.range(vocab)[None, :] < k[:, None], ordered, -np.inf)
    before = tf.cumsum(tf.nn.softmax(ordered, axis=-1), axis=-1, exclusive=True)
    # The last rank still inside the nucleus (the first is always kept).
    last = tf.maximum(tf.reduce_sum(tf.cast(before < top_p[:, None], tf.int32), -1) - 1, 0)
    last = tf.where(top_p < 1.0, tf.minimum(last, k - 1), k - 1)
    cutoff = tf.gather(ordered, last, batch_dims=1)[:, None]
    return tf.where(scaled < cutoff, -np.inf, scaled)


def inverse_cdf_sample(logits, uniforms):
    """One index per row drawn from `softmax(logits)`: the first index whose
    cumulative probability exceeds the row's uniform in [0, 1).

    Args:
        logits: float `[batch, vocab]` (`-inf` for tokens that may not be drawn).
        uniforms: float `[batch]` in [0, 1).
    Returns:
        int32 `[batch]`.

    One uniform per row instead of one per token (the Gumbel-max trick this
    replaced): drawing 16 rows over a 50257-word vocabulary took 69 ms by
    Gumbel-max and 10.8 ms by a plain inverse CDF, most of it `tf.cumsum` over
    the vocabulary, which XLA:CPU runs slowly (4.9 ms for 16 rows). So the
    sum runs in two levels: the running total of the blocks of `SAMPLE_BLOCK`
    tokens picks the block, a running total inside that block the token (same
    draw as one long cumulative sum, up to float rounding).

    Example:
    >>> int(inverse_cdf_sample(tf.math.log([[0.25, 0.0, 0.75]]), tf.constant([0.3]))[0])
    2
    """
    batch, vocab = tf.shape(logits)[0], tf.shape(logits)[1]
    weights = tf.exp(logits - tf.reduce_max(logits, axis=-1, keepdims=True))
    weights = tf.pad(weights, [[0, 0], [0, (-vocab) % SAMPLE_BLOCK]])  # padding: weight 0
    blocks = tf.reshape(weights, [batch, -1, SAMPLE_BLOCK])
    block_ends = tf.cumsum(tf.reduce_sum(blocks, axis=-1), axis=-1)  # [batch, blocks]
    target = uniforms * block_ends[:, -1]
    # The first block whose running total passes the target (never an empty one).
    block = tf.minimum(tf.reduce_sum(tf.cast(block_ends <= target[:, None], tf.int32), -1),
                       tf.shape(blocks)[1] - 1)
    inside = tf.gather(blocks, block, batch_dims=1)  # [batch, SAMPLE_BLOCK]
    before = tf.gather(block_ends, block, batch_dims=1) - tf.reduce_sum(inside, axis=-1)
    ends = tf.cumsum(inside, axis=-1)
    index = tf.reduce_sum(tf.cast(ends <= (target - before)[:, None], tf.int32), -1)
    # Rounding can put the target past the block's own total: take its last drawable token.
    last = SAMPLE_BLOCK - 1 - first_argmax(tf.cast(tf.reverse(inside, [1]) > 0, tf.float32))
    return block * SAMPLE_BLOCK + tf.minimum(index, last)


def choose_tokens(logits, seen, temperature, top_k, top_p, penalty, seeds, steps,
                  argmax=first_argmax):
    """One token per row, each from its own settings and random stream.

    Args:
        logits: float `[batch, vocab]`; seen: float `[batch, vocab]` (1 on tokens already
            in the row, for the repetition penalty).
        temperature, top_p, penalty (float) and top_k (int): one value for every row, or
            one per row `[batch]`, with the meaning of `sampling.SamplingParams`.
        seeds: int32 `[batch]`, each row's seed (`sampling.row_seed`), or one for all.
        steps: int32, each row's tokens so far: a scalar or `[batch]`.
        argmax: the greedy pick (`first_argmax`, or `plain_argmax` to compare).
    Returns:
        int32 `[batch]`.
    """
    rows = tf.zeros_like(logits[:, 0], tf.int32)  # [batch], keeping a static batch size

    def per_row(value, dtype):
        return tf.cast(value, dtype) + tf.cast(rows, dtype)

    temperature, top_p, penalty = (per_row(v, tf.float32) for v in (temperature, top_p, penalty))
    top_k, seeds, steps = (per_row(v, tf.int32) for v in (top_k, seeds, steps))
    penalized = apply_repetition_penalty(logits, seen, penalty)
    greedy = tf.logical_or(tf.equal(top_k, 1), temperature <= 0.0)

    def sampled():
        scaled = penalized / tf.maximum(temperature, 1e-6)[:, None]
        needs_filter = tf.reduce_any(tf.logical_or(top_k > 1, top_p < 1.0))
        scaled = tf.cond(needs_filter, lambda: filter_logits(scaled, top_k, top_p),
                         lambda: scaled)
        return inverse_cdf_sample(scaled, row_uniforms(seeds, steps))

    picked = tf.cond(tf.reduce_all(greedy), lambda: rows, sampled)
    return tf.where(greedy, argmax(penalized), picked)
