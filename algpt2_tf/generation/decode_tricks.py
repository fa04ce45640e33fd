"""The decode loop's speed tricks, each behind a switch, with its measured gain.

Batch-1 decoding on a CPU is a chain of matrix-vector products that XLA
generates itself, and it waits on memory; these tricks make that chain
faster without changing a single output bit. Each one is a field of
`DecodeTricks`:

  row_major_copies      one-row products multiply by `[units, input_dim]`
                        copies of the kernels, made once per call before the
                        loop: XLA's dot-product GEMV is faster than its
                        column form, while its matrix products (batch > 1)
                        are faster with the kernels as stored.
  bias_as_subtraction   `x @ W - (-b)` instead of `x @ W + b`: XLA:CPU fuses a
                        product with the add that follows into one slower
                        "output fusion"; a subtraction of the negated bias is
                        not fused, and negation is exact.
  growing_cache         the loop starts with a 64-slot cache and pads it as
                        the text grows (`generation.cache_lengths`), so early
                        steps do not attend over empty slots.
  two_reduction_argmax  greedy picks with a max and a min reduction instead of
                        XLA:CPU's scalar `ArgMax` loop over the vocabulary.
  wide_vectors          XLA:CPU generates 512-bit vector code on AVX-512 CPUs
                        (`xla_flags.prefer_wide_vectors`; process-wide, before
                        the first compilation).
  last_position_head    the prefill applies the LM head to the last position
                        only (the only logits a decode needs).

Tried and not kept (Intel Xeon with AVX512-BF16 and AMX, `algpt2` batch 1):
bfloat16 copies of the kernels (half the bytes per step) decode at 89.3
tokens/s against 90.2 for float32 inside XLA's loop (91.8 with bfloat16
activations too), although a lone bfloat16 matrix-vector product outside a
loop runs 2x faster (143 vs 283 us for 768 x 3072); int8 kernels held as
bfloat16 integers, 88.0. AMX serves matrix products, not batch-1 steps.
An int8 model's copies are dequantized once per call: XLA:CPU has no faster
matrix-vector product for int8 weights either (int8 x int8 products, fused
in-loop conversions and YNNPACK's dots all run 0.4-0.8x float32 on AMD Zen 3:
`benchmarks/int8_gemv.py`), so int8 models decode at float32 speed and keep
their 4x smaller weights at rest.

Measured gains of each switch, per CPU: `benchmarks/decode_tricks.py` and
`benchmarks/results/decode_tricks_*.md`. Choose switches with `Generator(model,
tricks=...)`, `BatchEngine(model, tricks=...)`, `generate(..., tricks=...)`, or for the
`algpt2` command the environment, e.g. `ALGPT2_DECODE_TRICKS="wide_vectors=0,
growing_cache=0"` (read once at its start-up: `DecodeTricks.from_environment`). The code a
trick changes receives it: the loop its `DecodeTricks`, the layers a `DecodePlan`.

Example:
>>> DecodeTricks.from_environment({"ALGPT2_DECODE_TRICKS": "growing_cache=0"}).growing_cache
False
>>> DecodeTricks().off()
DecodeTricks(row_major_copies=False, bias_as_subtraction=False, growing_cache=False, \
two_reduction_argmax=False, wide_vectors=False, last_position_head=False)
"""

import dataclasses
import os

import tensorflow as tf
from keras import ops

from algpt2_tf.generation.token_choice import first_argmax, plain_argmax

ENVIRONMENT_VARIABLE = "ALGPT2_DECODE_TRICKS"


@dataclasses.dataclass(frozen=True)
class DecodeTricks:
    """The switches of the decode loop's speed tricks (see the module docstring)."""

    row_major_copies: bool = True
    bias_as_subtraction: bool = True
    growing_cache: bool = True
    two_reduction_argmax: bool = True
    wide_vectors: bool = True
    last_position_head: bool = True

    @classmethod
    def names(cls):
        return tuple(field.name for field in dataclasses.fields(cls))

    def off(self):
        """Every switch off: the plain decode loop."""
        return DecodeTricks(**{name: False for name in self.names()})

    def with_switches(self, text):
        """These switches changed by `text`: comma-separated `name=0|1` entries.

        Raises:
            ValueError: an unknown name or a value other than 0/1.
        """
        changes = {}
        for entry in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = (part.strip() for part in entry.partition("="))
            if name not in self.names():
                raise ValueError(f"unknown decode trick {name!r} (known: {', '.join(self.names())}).")
            if value not in ("0", "1"):
                raise ValueError(f"decode trick {name}: give 0 or 1, not {value!r}.")
            changes[name] = value == "1"
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_cpu(cls):
        """The defaults for this CPU, from the measurements in `benchmarks/results/decode_tricks_*`.

        Every exact trick measured as a gain (or as no change) on the AMD EPYC
        (Zen 4) and Intel Xeon (Sapphire Rapids class) machines this project
        ran on, so the defaults are the same for both.
        """
        return cls()

    @classmethod
    def from_environment(cls, environ=None):
        """`for_cpu()` with the switches of `ALGPT2_DECODE_TRICKS` (in `environ`, default `os.environ`)."""
        environ = os.environ if environ is None else environ
        return cls.for_cpu().with_switches(environ.get(ENVIRONMENT_VARIABLE, ""))


# ------------------------------------------------- what a decode function computes with
class RowMajorCopy:
    """A `[units, input_dim]` copy of a `Linear` kernel (in the compute dtype,
    dequantized when int8) for one-row products."""

    def __init__(self, layer):
        self.values = tf.transpose(layer.float_kernel())

    def matmul(self, inputs, kernel):
        """`inputs @ kernel` (`kernel`: a function giving the stored-layout float kernel, so
        an int8 kernel is dequantized in the other branch only), through the copy when there
        is one input row.

        XLA compiles for static shapes, so it keeps one branch of the `cond`.
        """
        flat = tf.reshape(inputs, [-1, tf.shape(inputs)[-1]])
        product = tf.cond(
            tf.shape(flat)[0] == 1,
            lambda: tf.linalg.matmul(flat, tf.cast(self.values, flat.dtype), transpose_b=True),
            lambda: tf.linalg.matmul(flat, tf.cast(kernel(), flat.dtype)))
        return tf.reshape(product, tf.concat([tf.shape(inputs)[:-1], tf.shape(product)[-1:]], 0))


class DecodePlan:
    """The tricks of one traced decode function, as the code they change receives them:
    the decode loop reads the loop-level switches (`tricks`), and every `Linear` of a
    cached forward pass (`model.forward_with_cache(..., plan=plan)`) calls `matmul` and
    `add_bias`. Nothing else sees it: `model(...)`, training and evaluation run the plain
    layers.

    Args:
        model: the model the function decodes with.
        tricks: a `DecodeTricks`.
        one_row: the function runs batch 1 only, where the row-major copies pay (made for
            larger batches, they cost up to 12% at batch 8 and serve no product:
            `benchmarks/results/decode_tricks_*.md`).
        host_writes: the attention layers read their caches and return the new keys and
            values instead of writing them (`CausalSelfAttention._attend_beside_cache`): the
            runtime writes them in place into caches it holds (the TFLite export only).

    Make it inside the traced function: with `row_major_copies`, every `Linear` of the model
    gets its copy here, before the loop, so the copies are made once per call (28 MB for
    `algpt2`, 340 MB for `gpt2` in float32) and live for that call only.
    """

    def __init__(self, model, tricks, one_row=False, host_writes=False):
        self.tricks = tricks
        self.host_writes = host_writes
        self.copies = {}
        if tricks.row_major_copies and one_row:
            self.copies = {id(layer): RowMajorCopy(layer) for layer in model._flatten_layers()
                           if hasattr(layer, "float_kernel")}

    def matmul(self, layer, inputs):
        """`inputs @ layer`'s kernel, through its row-major copy when it has one."""
        copy = self.copies.get(id(layer))
        if copy is None:
            return ops.matmul(inputs, layer.float_kernel())
        return copy.matmul(inputs, layer.float_kernel)

    def add_bias(self, x, bias):
        """`x + bias`, as `x - (-bias)` with `bias_as_subtraction` (bit-identical)."""
        if self.tricks.bias_as_subtraction:
            return ops.subtract(x, ops.negative(bias))
        return ops.add(x, bias)

    def argmax(self):
        """The greedy pick of `token_choice.choose_tokens` (`two_reduction_argmax`)."""
        return first_argmax if self.tricks.two_reduction_argmax else plain_argmax
