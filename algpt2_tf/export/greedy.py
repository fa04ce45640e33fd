"""Decoding with an exported `.tflite` model's `prefill`/`decode` steps, and their greedy loop.

The steps take the KV cache as inputs named by `cache_names` and return it
updated under the same names (`tflite.py`). `InterpreterSteps` carries it
between the calls of LiteRT's classic `Interpreter`; `litert.LiteRTDecoder`
binds it in place. `greedy_continuation` is shared by the export check,
both decoders and the TFLite decode benchmark. Needs numpy alone, so the
TFLite runtimes use it without TensorFlow.
"""

import numpy as np

from algpt2_tf.generation.sampling import SamplingParams, host_decode


def cache_names(num_layers):
    """The cache inputs (and outputs) of the steps: `keys_00, values_00, keys_01, ...`."""
    return [f"{kind}_{layer:02d}" for layer in range(num_layers) for kind in ("keys", "values")]


def is_cache(name):
    """Whether a step's input or output named `name` is a cache (`cache_names`)."""
    return name.startswith(("keys_", "values_"))


def greedy_continuation(decode, logits, position, steps):
    """`steps` greedy tokens after next-token `logits` `[1, vocab]` (`sampling.host_decode`,
    the one NumPy decode loop).

    Each picked token but the last is passed to `decode(token, position)` (positions
    `position`, `position + 1`, ...), which returns the next logits.
    """
    seen = np.zeros(np.shape(logits), bool)
    return [int(tokens[0]) for tokens, _, _ in host_decode(
        np.asarray(logits), seen, SamplingParams(top_k=1), [0], steps, (),
        lambda tokens, step: decode(int(tokens[0]), position + step))]


class InterpreterSteps:
    """`prefill` and `decode` through a LiteRT `Interpreter`'s signature runners: the
    caches go in as arrays and come back as new arrays at every call (zeros at first).

    Args:
        interpreter: an `ai_edge_litert.interpreter.Interpreter` of an exported model.
    """

    def __init__(self, interpreter):
        self.runners = {name: interpreter.get_signature_runner(name)
                        for name in ("prefill", "decode")}
        details = self.runners["decode"].get_input_details()
        self.caches = {name: np.zeros(d["shape"], d["dtype"])
                       for name, d in details.items() if is_cache(name)}

    def _run(self, signature, **feeds):
        outputs = self.runners[signature](**feeds, **self.caches)
        self.caches = {name: outputs[name] for name in self.caches}
        return outputs["logits"]

    def prefill(self, prompt_ids):
        """Writes the prompt into the cache; returns the next-token logits `[1, vocab]`."""
        ids = np.asarray([prompt_ids], np.int32)
        return self._run("prefill", input_ids=ids, attention_mask=np.ones_like(ids))

    def decode(self, token, position):
        """Adds `token` at `position`; returns the next-token logits `[1, vocab]`."""
        return self._run("decode", input_id=np.array([[token]], np.int32),
                         position=np.array([position], np.int32))

    def greedy(self, prompt_ids, steps):
        """The greedy continuation of `prompt_ids`, `steps` tokens."""
        return greedy_continuation(self.decode, self.prefill(prompt_ids), len(prompt_ids), steps)
