"""The one seam between the backend-agnostic model and TensorFlow.

The model and its layers are written with `keras.ops` and run on Keras 3's
TensorFlow, PyTorch and JAX backends. What needs a backend's own means lives
here:

- `checked_inputs`: ids outside the vocabulary and sequences longer than
  `max_positions` are clear errors on every backend: a `ValueError` whenever
  the values are at hand (eager calls on every backend). Inside a TensorFlow
  graph the checks are `tf.debugging` asserts (so a SavedModel keeps them;
  they raise `InvalidArgumentError`); under `jax.jit` the
  values are not known while tracing, so JAX checks the ids it can see
  (eager calls, `predict` inputs before they are traced), and inside a
  compiled step an out-of-range id is clipped by the lookup instead.

- `traced`: a `tf.function` (one graph per input shape) on TensorFlow, the
  plain function elsewhere (PyTorch runs eagerly; the model's JAX variables
  live outside a pure function, so `jax.jit` would need Keras' stateless
  calls).

Generation's XLA loop, the tf.data pipelines and the exports are TensorFlow
by nature and stay in their modules.
"""

import keras
import numpy as np


def name():
    """The Keras backend in use: `tensorflow`, `torch` or `jax`."""
    return keras.backend.backend()


def is_tensorflow():
    return name() == "tensorflow"


def traced(function):
    """`function` as a TensorFlow graph function on TensorFlow, unchanged elsewhere."""
    if is_tensorflow():
        import tensorflow as tf

        return tf.function(function, reduce_retracing=True)
    return function


def _being_traced(tensor):
    """Whether `tensor` is symbolic (inside a `tf.function` or `jax.jit`): no values yet."""
    if name() == "tensorflow":
        import tensorflow as tf

        return not tf.executing_eagerly()
    if name() == "jax":
        import jax

        return isinstance(tensor, jax.core.Tracer)
    return False  # PyTorch runs eagerly


def checked_inputs(input_ids, attention_mask, vocab_size, max_positions):
    """`(input_ids, attention_mask)`, after checking the ids are in `[0, vocab_size)`
    and the sequence is at most `max_positions` long (an error naming the limit)."""
    if _being_traced(input_ids):
        if not is_tensorflow():
            return input_ids, attention_mask  # under jax.jit: see the module docstring
        import tensorflow as tf

        checks = [
            tf.debugging.assert_non_negative(input_ids, message="input_ids must be >= 0"),
            tf.debugging.assert_less(input_ids, vocab_size,
                                     message=f"input_ids must be < vocab_size ({vocab_size})"),
            tf.debugging.assert_less_equal(
                tf.shape(input_ids)[1], max_positions,
                message=f"sequence length exceeds max_positions ({max_positions})"),
        ]
        # Both pass through the checks: positions come from the mask, so a
        # mask that skipped them could reach the position lookup first.
        with tf.control_dependencies(checks):
            return tf.identity(input_ids), tf.identity(attention_mask)
    ids = keras.ops.convert_to_numpy(input_ids)  # eager: check the values themselves
    if ids.size:
        if ids.shape[1] > max_positions:
            raise ValueError(f"sequence length exceeds max_positions ({max_positions})")
        if np.min(ids) < 0:
            raise ValueError("input_ids must be >= 0")
        if np.max(ids) >= vocab_size:
            raise ValueError(f"input_ids must be < vocab_size ({vocab_size})")
    return input_ids, attention_mask
