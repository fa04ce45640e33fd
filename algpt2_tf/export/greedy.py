"""The greedy decoding loop over an exported model's `prefill`/`decode` steps.

Shared by the export check (`api.tflite_greedy`), `litert.LiteRTDecoder` and
the TFLite decode benchmark. Needs numpy alone, so the TFLite runtimes use it
without TensorFlow.
"""

import numpy as np


def greedy_continuation(decode, logits, position, steps):
    """`steps` greedy tokens after next-token `logits` `[1, vocab]`.

    Each picked token is passed to `decode(token, position)` (positions
    `position`, `position + 1`, ...), which returns the next logits; so
    `decode` runs `steps` times.
    """
    new = []
    for step in range(steps):
        new.append(int(np.argmax(logits[0])))
        logits = decode(new[-1], position + step)
    return new
