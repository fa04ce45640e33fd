"""Losses and metrics of the causal LM and the SOP task."""

import keras
from keras import ops

IGNORE_INDEX = -100
"""Label value that contributes no loss (as in Hugging Face)."""


def shifted_labels(input_ids, attention_mask):
    """Next-token targets aligned with the logits: `labels[:, t] = input_ids[:, t + 1]`.

    A position gets `IGNORE_INDEX` when it or its successor is padding, and the
    last position always does.
    """
    ids = ops.cast(input_ids, "int32")
    mask = ops.cast(attention_mask, "bool")
    next_ids = ops.pad(ids[:, 1:], [[0, 0], [0, 1]], constant_values=IGNORE_INDEX)
    next_mask = ops.pad(mask[:, 1:], [[0, 0], [0, 1]], constant_values=False)
    return ops.where(ops.logical_and(mask, next_mask), next_ids, IGNORE_INDEX)


def token_nll(labels, logits):
    """Per-position negative log likelihood and a 0/1 weight (0 where ignored).

    Args:
        labels: int `[batch, seq]`, `IGNORE_INDEX` (any negative) where ignored.
        logits: float `[batch, seq, vocab]`.
    Returns:
        `(nll, weight)`, both float32 `[batch, seq]`.
    """
    labels = ops.cast(labels, "int32")
    valid = labels >= 0
    nll = keras.losses.sparse_categorical_crossentropy(
        ops.where(valid, labels, 0), ops.cast(logits, "float32"), from_logits=True)
    weight = ops.cast(valid, "float32")
    return nll * weight, weight


@keras.saving.register_keras_serializable(package="algpt2_tf")
class Perplexity(keras.metrics.Mean):
    """`exp` of the token-weighted mean negative log likelihood."""

    def __init__(self, name="perplexity", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def result(self):
        return ops.exp(super().result())


def kl_to_teacher(student_logits, teacher_logits, weights, temperature=1.0):
    """`T^2 * KL(teacher || student)` of the softened distributions, the mean
    over positions weighted by `weights` (`[batch, seq]`, 0 = not counted).

    Example:
    >>> logits = np.array([[[1.0, 2.0, 3.0]]], "float32")
    >>> float(kl_to_teacher(logits, logits, np.ones((1, 1), "float32")))
    0.0
    """
    teacher = ops.log_softmax(ops.cast(teacher_logits, "float32") / temperature, axis=-1)
    student = ops.log_softmax(ops.cast(student_logits, "float32") / temperature, axis=-1)
    per_token = ops.sum(ops.exp(teacher) * (teacher - student), axis=-1)
    weights = ops.cast(weights, "float32")
    return ops.sum(per_token * weights) / ops.maximum(ops.sum(weights), 1.0) * temperature ** 2
