"""Token choice on the host, in NumPy: the twin of `token_choice.choose_tokens` for the
paths whose logits arrive as NumPy rows (the torch/JAX host loop, the LiteRT engine), without
TensorFlow or Keras; and the sampling settings every path takes.

The same steps as there: repetition penalty, greedy as the first argmax, temperature,
top-k, top-p, then one inverse-CDF draw per row with the uniform `row_uniforms(seed, step)`,
a 32-bit integer hash. Row `r` of a request with seed `s` uses seed `row_seed(s, r)`. So the
same prompt, settings and seed give the same tokens through every path (tested).

Example:

>>> import numpy as np
>>> logits = np.array([[0.1, 2.0, 0.3]])
>>> pick_tokens(logits, np.zeros_like(logits, bool), SamplingParams(top_k=1), [0], 0).tolist()
[1]
"""

import dataclasses

import numpy as np

SAMPLERS = ("greedy", "sample", "top_k", "top_p")
HASH_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
"""The two multipliers of the 32-bit integer hash behind `row_uniforms` (lowbias32)."""
STEP_MULTIPLIER = 0x9E3779B9
"""Spreads consecutive steps apart before they meet the hashed seed (2**32 / golden ratio)."""


FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass
class SamplingParams:
    """In-graph sampling parameters: `top_k=1` or `temperature=0` is greedy,
    `top_k=0` disables top-k, `top_p=1` disables nucleus filtering."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


def sampling_params(sampler="greedy", temperature=1.0, top_k=None, top_p=None,
                    repetition_penalty=1.0):
    """Validates a named sampler and its options; returns `SamplingParams`."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
    # Finite in float32, where the compiled loops sample (1e39 would be inf there). NaN fails too.
    if temperature is None or not 0 <= temperature <= FLOAT32_MAX:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy) within float32, "
                         f"got {temperature!r}.")
    if repetition_penalty is None or not 0 < repetition_penalty <= FLOAT32_MAX:
        raise ValueError(f"repetition_penalty must be a finite number > 0 within float32, "
                         f"got {repetition_penalty!r}.")
    if top_k is not None and (int(top_k) != top_k or top_k < 0):
        raise ValueError(f"top_k must be a non-negative integer, got {top_k!r}.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}.")
    if sampler == "greedy":
        return SamplingParams(1.0, 1, 1.0, repetition_penalty)
    if sampler == "sample":
        return SamplingParams(temperature, 0, 1.0, repetition_penalty)
    if sampler == "top_k":
        top_k = min(int(top_k if top_k is not None else 50), 2 ** 31 - 1)  # >= vocab: all
        return SamplingParams(temperature, top_k, 1.0, repetition_penalty)
    return SamplingParams(temperature, 0, float(top_p if top_p is not None else 0.9),
                          repetition_penalty)


def row_seed(seed, row):
    """The seed of row (or choice) `row` of a request seeded `seed`: `seed + row`, wrapped to
    a signed 32-bit integer as TensorFlow's int32 arithmetic wraps it."""
    return (int(seed) + int(row) + 2 ** 31) % 2 ** 32 - 2 ** 31


def _mix32(x):
    """A 32-bit integer hash of uint32 array `x` (lowbias32; `token_choice._mix32`'s twin)."""
    first, second = (np.uint32(m) for m in HASH_MULTIPLIERS)
    x = (x ^ (x >> np.uint32(16))) * first
    x = (x ^ (x >> np.uint32(15))) * second
    return x ^ (x >> np.uint32(16))


def row_uniforms(seeds, steps):
    """Float32 uniforms in [0, 1), one per row, from integer `seeds` and `steps` (each a
    scalar or one per row; taken modulo 2**32): `token_choice.row_uniforms` in NumPy."""
    seeds = np.atleast_1d(np.asarray(seeds, np.int64)).astype(np.uint32)
    steps = np.atleast_1d(np.asarray(steps, np.int64)).astype(np.uint32)
    mixed = _mix32(_mix32(seeds) ^ (steps * np.uint32(STEP_MULTIPLIER)))
    return (mixed >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)


def inverse_cdf_sample(logits, uniforms):
    """One index per row of float `[batch, vocab]` logits: the first whose cumulative
    probability exceeds the row's uniform (never a token of probability 0)."""
    drawable = logits > -np.inf
    if 2 * drawable.sum(axis=-1).max() < logits.shape[-1]:
        # Few drawable tokens (after top-k or top-p): the draw among them alone is the same
        # draw, since a token of weight 0 adds exactly nothing to the running sums. Top-k 50 of
        # 50,257: 1.47 -> 0.42 ms a pick (top-p 0.9: 3.64 -> 2.28; AMD EPYC Zen 4), where a LiteRT
        # `algpt2` step is about 1.6 ms.
        return np.array([kept[_inverse_cdf(row[None, kept], uniform[None])[0]]
                         for row, uniform, kept in zip(logits, np.asarray(uniforms),
                                                       map(np.flatnonzero, drawable))])
    return _inverse_cdf(logits, uniforms)


def _inverse_cdf(logits, uniforms):
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    ends = np.cumsum(weights, axis=-1)
    index = (ends <= (uniforms * ends[:, -1])[:, None]).sum(axis=-1)
    last = weights.shape[-1] - 1 - np.argmax(weights[:, ::-1] > 0, axis=-1)
    return np.minimum(index, last)


def pick_tokens(logits, seen, params, seeds, steps):
    """One token per row of float `[batch, vocab]` logits (NumPy), after the
    repetition penalty, temperature, top-k and top-p of `params`; a sampled row draws
    with `row_uniforms(seeds, steps)` (`seeds`: one per row, `row_seed`)."""
    if params.repetition_penalty != 1.0:
        logits = logits.astype("float64")
        penalized = np.where(logits > 0, logits / params.repetition_penalty,
                             logits * params.repetition_penalty)
        logits = np.where(seen, penalized, logits)
    if params.top_k == 1 or params.temperature <= 0:
        # Greedy on the logits as they come (float64 orders them the same): a float64 copy of
        # 8 rows of 50,257 cost 0.24 ms a step, 2% of a `gpt2` batch-8 LiteRT step (Zen 4).
        return np.argmax(logits, axis=-1)  # the first index on ties
    logits = np.asarray(logits, "float64") / max(params.temperature, 1e-6)
    if params.top_k > 0:
        # The k-th largest value by a partial sort (1 row of 50,257: 0.37 ms against 1.79 ms
        # for the full sort it replaced, AMD EPYC Zen 4); the same value, so the same tokens.
        first = logits.shape[-1] - min(params.top_k, logits.shape[-1])
        kth = np.partition(logits, first, axis=-1)[:, first:first + 1]
        logits = np.where(logits < kth, -np.inf, logits)
    if params.top_p < 1.0:
        ordered = -np.sort(-logits, axis=-1)
        probs = np.exp(ordered - ordered[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        before = np.cumsum(probs, axis=-1) - probs
        last = np.maximum((before < params.top_p).sum(axis=-1) - 1, 0)
        cutoff = ordered[np.arange(len(ordered)), last][:, None]
        logits = np.where(logits < cutoff, -np.inf, logits)
    return inverse_cdf_sample(logits, row_uniforms(seeds, steps).astype(np.float64))


def host_decode(logits, seen, params, seeds, max_new_tokens, stop_ids, advance):
    """The decode loop of every path that runs the model step by step from NumPy (the
    torch/JAX host loop, the LiteRT engine, an export's greedy check): picks each row's
    token with `pick_tokens` and yields `(tokens [batch], logits [batch, vocab], running
    [batch])`: the logits they were picked from, and which rows had not stopped before
    this step (a stopped row's later tokens mean nothing).

    Args:
        logits: float `[batch, vocab]`, the prompts' next-token logits.
        seen: bool `[batch, vocab]`, the prompts' tokens (updated in place).
        params: `SamplingParams`; seeds: one per row (`row_seed`).
        max_new_tokens: the most steps.
        stop_ids: a row that emits one is done (the loop goes on while another row runs).
        advance: `advance(tokens, step) -> logits`, the model's next step.

    Example:
    >>> table = np.eye(4)[[1, 2, 3, 0]]  # token t -> logits of t + 1
    >>> steps = host_decode(table[[0]], np.zeros((1, 4), bool), SamplingParams(top_k=1), [0],
    ...                     5, (3,), lambda tokens, step: table[tokens])
    >>> [int(tokens[0]) for tokens, _, _ in steps]
    [1, 2, 3]
    """
    done = np.zeros(len(logits), bool)
    stop = np.asarray(list(stop_ids), dtype=np.int64)
    for step in range(max_new_tokens):
        tokens = pick_tokens(logits, seen, params, seeds, step)
        yield tokens, logits, ~done
        if stop.size:
            done |= np.isin(tokens, stop)
        if done.all() or step == max_new_tokens - 1:
            return
        seen[np.arange(len(tokens)), tokens] = True
        logits = advance(tokens, step)
