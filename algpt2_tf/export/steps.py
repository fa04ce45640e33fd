"""Decoding with an exported `.tflite` model's `prefill`/`decode` steps.

The steps take the KV cache as inputs named by `cache_names` and return it
updated under the same names (`tflite.py`). `Steps` holds what every runtime
shares: prompts left-padded into the build's batch, each row's position, and
the greedy loop (over `sampling.host_decode`, the one NumPy decode loop).
`InterpreterSteps` runs them with LiteRT's classic `Interpreter`, passing the
caches back in as arrays; `litert.LiteRTDecoder` binds them in place. Needs
numpy alone, so the TFLite runtimes use it without TensorFlow.
"""

import numpy as np

from algpt2_tf.generation.prompts import left_pad
from algpt2_tf.generation.sampling import SamplingParams, host_decode


def cache_names(num_layers):
    """The cache inputs (and outputs) of the steps: `keys_00, values_00, keys_01, ...`."""
    return [f"{kind}_{layer:02d}" for layer in range(num_layers) for kind in ("keys", "values")]


def is_cache(name):
    """Whether a step's input or output named `name` is a cache (`cache_names`)."""
    return name.startswith(("keys_", "values_"))


class Steps:
    """The rows of an exported model's steps; a runtime gives `batch` (the build's) and
    `_run(signature, feeds) -> logits [batch, vocab]`, which keeps the caches."""

    batch = 1

    def _run(self, signature, feeds):
        raise NotImplementedError

    def _full(self, rows):
        """`rows` (an array, one per prompt) repeated to the build's batch: the extra rows
        decode a copy of the last one, and their outputs are dropped."""
        if not 1 <= len(rows) <= self.batch:
            raise ValueError(f"This build decodes 1 to {self.batch} rows, got {len(rows)}.")
        return np.concatenate([rows, np.repeat(rows[-1:], self.batch - len(rows), axis=0)])

    def prefill_rows(self, prompts):
        """Writes the prompts (left-padded to the longest) into the cache; returns their
        next-token logits `[rows, vocab]`. Then `decode_rows` with `positions` = the
        prompts' lengths, one more at each step."""
        ids, mask = left_pad(prompts)
        feeds = {"input_ids": self._full(ids), "attention_mask": self._full(mask)}
        return self._run("prefill", feeds)[:len(prompts)]

    def decode_rows(self, tokens, positions):
        """Adds each row's token at its position; returns the next-token logits `[rows, vocab]`."""
        feeds = {"input_id": self._full(np.asarray(tokens, np.int32)[:, None]),
                 "position": self._full(np.asarray(positions, np.int32))}
        return self._run("decode", feeds)[:len(tokens)]

    def prefill(self, prompt_ids):
        """Writes one prompt into the cache; returns the next-token logits `[1, vocab]`."""
        return self.prefill_rows([list(prompt_ids)])

    def decode(self, token, position):
        """Adds `token` at `position`; returns the next-token logits `[1, vocab]`."""
        return self.decode_rows([token], [position])

    def greedy_rows(self, prompts, steps):
        """The greedy continuations of `prompts`, `steps` tokens each."""
        lengths = np.array([len(p) for p in prompts])
        logits = self.prefill_rows(prompts)
        seen = np.zeros(np.shape(logits), bool)
        picked = [tokens for tokens, _, _ in host_decode(
            logits, seen, SamplingParams(top_k=1), [0] * len(prompts), steps, (),
            lambda tokens, step: self.decode_rows(tokens, lengths + step))]
        return np.stack(picked, axis=1).tolist()

    def greedy(self, prompt_ids, steps):
        """The greedy continuation of one prompt, `steps` tokens."""
        return self.greedy_rows([list(prompt_ids)], steps)[0]


class InterpreterSteps(Steps):
    """The steps through a LiteRT `Interpreter`'s signature runners: the caches go in as
    arrays and come back as new arrays at every call (zeros at first).

    Args:
        interpreter: an `ai_edge_litert.interpreter.Interpreter` of an exported model.
    """

    def __init__(self, interpreter):
        self.runners = {name: interpreter.get_signature_runner(name)
                        for name in ("prefill", "decode")}
        details = self.runners["decode"].get_input_details()
        self.caches = {name: np.zeros(d["shape"], d["dtype"])
                       for name, d in details.items() if is_cache(name)}
        self.batch = int(details["position"]["shape"][0])

    def _run(self, signature, feeds):
        outputs = self.runners[signature](**feeds, **self.caches)
        self.caches = {name: outputs[name] for name in self.caches}
        return outputs["logits"]
