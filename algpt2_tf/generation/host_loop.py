"""Generation on the torch and JAX backends: a compiled cached step in a Python loop.

`generator.py`'s decode loop is one XLA-compiled TensorFlow function. On
the other Keras backends, `HostLoopGenerator` runs the same steps with the
model's backend-agnostic `forward_with_cache` (prefill the left-padded
prompts, then one token per step into a cache per virtual layer), compiled
by `backend.compiled_inference` (`jax.jit` on JAX; on PyTorch eager without
gradients, or `torch.compile` on request), and picks each token on the host
from the `[batch, vocab]` logits row:

- greedy is the first argmax, as in the TensorFlow loop, so greedy tokens
  are the TensorFlow backend's (tested);
- sampling (temperature, top-k, top-p, repetition penalty) is
  `sampling.pick_tokens`, the NumPy twin of the TensorFlow loop's sampler, with the
  same seeds: the same seed gives the TensorFlow loop's text (tested).

The host loop costs a device-to-host copy of one logits row per step; it is
here so that a model trained on PyTorch or JAX can be sampled where it was
trained (`make bench` gives each backend's decode speed).
"""

import numpy as np
from keras import ops

from algpt2_tf.generation.prompts import (GenerationOutput, check_fits, check_max_new_tokens,
                                          check_prompts, left_pad)
from algpt2_tf.generation.sampling import SamplingParams, host_decode, row_seed
from algpt2_tf.model import position_ids_from_mask
from algpt2_tf.runtime import backend


def tensors(*arrays):
    """int32 backend tensors: a compiled step sees values, never constants
    (`torch.compile` would recompile for each new Python or NumPy scalar)."""
    return [ops.convert_to_tensor(np.asarray(a, "int32")) for a in arrays]


class HostLoopGenerator:
    """`Generator.generate` for any Keras backend (see the module docstring).

    Args:
        model: an `ALGPT2LMHeadModel`.
        torch_compile: on PyTorch, `torch.compile` the step (about 65 s of
            compiling, then 8x faster steps: for long-lived processes).

    Example:
    >>> from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel
    >>> model = ALGPT2LMHeadModel(ALGPT2Config.from_preset("algpt2-tiny"))
    >>> out = HostLoopGenerator(model).generate([[5, 6, 7]], max_new_tokens=4)
    >>> len(out.new_ids[0])
    4
    """

    def __init__(self, model, torch_compile=False):
        self.model = model
        # One uncompiled step first: it builds the weights that the compiled
        # step reads, and Keras layers set Python state on their first call
        # (name-scope paths) that would otherwise fail torch.compile's guards
        # and recompile the step on the next call.
        self._step(*tensors([[0]], [[0]], [[1]]), model.empty_caches(1, 1), *tensors(0))
        self.step = backend.compiled_inference(self._step, model.variables, torch_compile)

    def _step(self, input_ids, position_ids, key_mask, caches, cache_index):
        """Logits of the last position `[batch, vocab]` and the new caches."""
        logits, caches = self.model.forward_with_cache(
            input_ids, position_ids, key_mask, caches, cache_index, last_logits_only=True)
        return logits[:, -1], caches

    def generate(self, prompt_ids, max_new_tokens=32, params=None, seed=0, stop_ids=(),
                 pad_id=0):
        """Generates from token-id prompts; returns a `GenerationOutput` without text."""
        config = self.model.config
        prompts = check_prompts(prompt_ids, config.vocab_size)
        check_max_new_tokens(max_new_tokens)
        longest = max(len(p) for p in prompts)
        check_fits(longest, max_new_tokens, config.max_positions)
        params = params or SamplingParams(top_k=1)
        seeds = [row_seed(seed or 0, row) for row in range(len(prompts))]
        batch, total = len(prompts), longest + max_new_tokens
        ids, mask = left_pad(prompts, longest, pad_id)
        key_mask = np.zeros((batch, total), "int32")
        key_mask[:, :longest] = mask
        positions = position_ids_from_mask(mask)
        seen = np.zeros((batch, config.vocab_size), bool)
        for row, prompt in enumerate(prompts):
            seen[row, prompt] = True
        logits, caches = self.step(*tensors(ids, positions, key_mask),
                                   self.model.empty_caches(batch, total), *tensors(0))
        next_position = mask.sum(axis=1).astype("int32")

        def advance(tokens, step):
            nonlocal caches
            slot = longest + step
            key_mask[:, slot] = 1
            logits, caches = self.step(
                *tensors(tokens[:, None], (next_position + step)[:, None], key_mask), caches,
                *tensors(slot))
            return ops.convert_to_numpy(logits)

        new = [[] for _ in prompts]
        for tokens, _, running in host_decode(ops.convert_to_numpy(logits), seen, params, seeds,
                                              max_new_tokens, stop_ids, advance):
            for row in np.flatnonzero(running):
                new[row].append(int(tokens[row]))
        return GenerationOutput(ids=[p + n for p, n in zip(prompts, new)], new_ids=new)
