"""The greedy decoding loop over an exported model's `prefill`/`decode` steps.

Shared by the export check (`api.tflite_greedy`), `litert.LiteRTDecoder` and
the TFLite decode benchmark. Needs numpy alone, so the TFLite runtimes use it
without TensorFlow.
"""

import numpy as np

from algpt2_tf.generation.sampling import SamplingParams, host_decode


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
