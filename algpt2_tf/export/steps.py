"""Decoding with an exported `.tflite` model's `prefill_N` and `decode_N` steps.

The decode steps read the KV cache, inputs named by `cache_names`, and return
the new token's keys and values (`new_keys_values`) for the runtime to write
into it; they come in several cache lengths N (`tflite.py`). A prefill reads
no cache and returns the prompt's, padded to N slots. `Steps` holds what every runtime shares:
the caches, as NumPy arrays it writes the new slots into, prompts left-padded
into the build's batch, each row's position, the shortest cache length that
holds the slots so far (the caches move to the next length when they fill),
and the greedy loop (over `sampling.host_decode`, the one NumPy decode loop).
`InterpreterSteps` runs them with LiteRT's classic `Interpreter`, copying the
caches in at each step; `litert.LiteRTDecoder` binds them without a copy.
Needs numpy alone, so the TFLite runtimes use it without TensorFlow.
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
    """The rows of an exported model's steps. A runtime calls `_start` with its signature
    names and one decode step's input details, makes each cache (`_new_cache(name, length)`:
    a NumPy array the runtime's step reads, zeros), and gives `_run(signature, length,
    feeds) -> (logits [batch, vocab], new_keys_values)` (a decode step reads the caches of
    `length`, a prefill none). The caches are kept in `self.caches[length]` (`{name:
    array}`); `_store` writes the steps' new keys and values into them in place."""

    def _start(self, signature_names, details):
        self.lengths = sorted(int(name.split("_")[1]) for name in signature_names
                              if name.startswith("decode_"))
        self.batch = int(details["position"]["shape"][0])
        self.cache_shapes = {name: list(d["shape"]) for name, d in details.items()
                             if is_cache(name)}
        self.names = cache_names(len(self.cache_shapes) // 2)  # new_keys_values' order
        self.caches = {}
        self.length = self.lengths[0]

    @property
    def max_length(self):
        """The most slots a row can fill (prompt and new tokens)."""
        return self.lengths[-1]

    def _cache_shape(self, name, length):
        shape = list(self.cache_shapes[name])
        shape[2] = length
        return shape

    def _caches(self, length):
        """The caches of `length`, made (zeros) on first use: a NaN in a masked slot would
        still reach the attention's weighted sum."""
        if length not in self.caches:
            self.caches[length] = {}
            for name in self.names:
                self.caches[length][name] = self._new_cache(name, length)
                self.caches[length][name][...] = 0.0
        return self.caches[length]

    def _fitting(self, slots):
        """The shortest cache length with `slots` slots."""
        for length in self.lengths:
            if length >= slots:
                return length
        raise ValueError(f"{slots} tokens exceed the build's cache of {self.max_length}.")

    def _move(self, length):
        """Copies the caches into the longer `length` and decodes there from now on."""
        grown, old = self._caches(length), self._caches(self.length)
        for name in self.names:
            grown[name][:, :, :self.length] = old[name]
        self.length = length

    def _store(self, new_keys_values, index):
        """Writes a step's `new_keys_values` `[caches, batch, heads, T, head_size]` (one per
        cache, `self.names` order) at slots `index .. index + T - 1` of every row."""
        count = new_keys_values.shape[3]
        for name, new in zip(self.names, new_keys_values):
            self.caches[self.length][name][:, :, index:index + count] = new

    def _full(self, rows):
        """`rows` (an array, one per prompt) repeated to the build's batch: the extra rows
        decode a copy of the last one, and their outputs are dropped."""
        if not 1 <= len(rows) <= self.batch:
            raise ValueError(f"This build decodes 1 to {self.batch} rows, got {len(rows)}.")
        if len(rows) == self.batch:
            return rows
        return np.concatenate([rows, np.repeat(rows[-1:], self.batch - len(rows), axis=0)])

    def prefill_rows(self, prompts):
        """Writes the prompts (left-padded to the longest) into the shortest cache that holds
        them; returns their next-token logits `[rows, vocab]`. Then `decode_rows` with
        `positions` = the prompts' lengths, one more at each step."""
        ids, mask = left_pad(prompts)
        self.length = self._fitting(ids.shape[1])
        self._caches(self.length)
        feeds = {"input_ids": self._full(ids), "attention_mask": self._full(mask)}
        logits, new = self._run(f"prefill_{self.length}", None, feeds)
        self._store(new, 0)
        return logits[:len(prompts)]

    def decode_rows(self, tokens, positions):
        """Adds each row's token at its position; returns the next-token logits `[rows, vocab]`."""
        slot = int(np.max(positions))  # the longest row's: the slot all rows write
        if slot >= self.length:
            self._move(self._fitting(slot + 1))
        feeds = {"input_id": self._full(np.asarray(tokens, np.int32)[:, None]),
                 "position": self._full(np.asarray(positions, np.int32))}
        logits, new = self._run(f"decode_{self.length}", self.length, feeds)
        self._store(new, slot)
        return logits[:len(tokens)]

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
    """The steps through a LiteRT `Interpreter`'s signature runners: the caches are NumPy
    arrays, copied in at every decode step.

    Args:
        interpreter: an `ai_edge_litert.interpreter.Interpreter` of an exported model.
    """

    def __init__(self, interpreter):
        self.runners = {name: interpreter.get_signature_runner(name)
                        for name in interpreter.get_signature_list()}
        decode = next(name for name in self.runners if name.startswith("decode_"))
        self._start(self.runners, self.runners[decode].get_input_details())

    def _new_cache(self, name, length):
        return np.empty(self._cache_shape(name, length), np.float32)  # `_caches` zeroes it

    def _run(self, signature, length, feeds):
        caches = self.caches[length] if length else {}
        outputs = self.runners[signature](**feeds, **caches)
        return outputs["logits"], outputs["new_keys_values"]
