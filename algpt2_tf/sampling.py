"""Token choice on the host, in NumPy: the paths whose logits arrive as NumPy rows (the
torch/JAX host loop, the LiteRT engine) pick tokens here, without TensorFlow or Keras.

Greedy is the first argmax, as in the compiled TensorFlow loop (`generation.py`), so
greedy tokens agree across every path. Sampling (temperature, top-k, top-p, repetition
penalty, with the same meaning as there) draws with a NumPy generator seeded by the
request's seed: the same seed gives the same text on these paths.

Example:

>>> import numpy as np
>>> logits = np.array([[0.1, 2.0, 0.3]])
>>> pick_tokens(logits, np.zeros_like(logits, bool), SamplingParams(top_k=1), None).tolist()
[1]
"""

import dataclasses

import numpy as np

SAMPLERS = ("greedy", "sample", "top_k", "top_p")


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
    if temperature is None or not 0 <= temperature < float("inf"):  # NaN fails too
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), "
                         f"got {temperature!r}.")
    if repetition_penalty is None or not 0 < repetition_penalty < float("inf"):
        raise ValueError(f"repetition_penalty must be a finite number > 0, "
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
        return SamplingParams(temperature, int(top_k if top_k is not None else 50), 1.0,
                              repetition_penalty)
    return SamplingParams(temperature, 0, float(top_p if top_p is not None else 0.9),
                          repetition_penalty)


def pick_tokens(logits, seen, params, rng):
    """One token per row of float `[batch, vocab]` logits (NumPy), after the
    repetition penalty, temperature, top-k and top-p of `params`."""
    logits = logits.astype("float64")
    if params.repetition_penalty != 1.0:
        penalized = np.where(logits > 0, logits / params.repetition_penalty,
                             logits * params.repetition_penalty)
        logits = np.where(seen, penalized, logits)
    if params.top_k == 1 or params.temperature <= 0:
        return np.argmax(logits, axis=-1)  # the first index on ties
    logits = logits / max(params.temperature, 1e-6)
    if params.top_k > 0:
        kth = -np.sort(-logits, axis=-1)[:, min(params.top_k, logits.shape[-1]) - 1:][:, :1]
        logits = np.where(logits < kth, -np.inf, logits)
    if params.top_p < 1.0:
        ordered = -np.sort(-logits, axis=-1)
        probs = np.exp(ordered - ordered[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        before = np.cumsum(probs, axis=-1) - probs
        last = np.maximum((before < params.top_p).sum(axis=-1) - 1, 0)
        cutoff = ordered[np.arange(len(ordered)), last][:, None]
        logits = np.where(logits < cutoff, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in probs])
