"""Causal multi-head self-attention with an optional key/value cache."""

import math

import keras
from keras import ops

from algpt2_tf.layers.adapter import add_delta
from algpt2_tf.layers.linear import Linear


def write_slots(cache, new, index, rows=None):
    """`cache` `[batch, heads, slots, head_size]` with `new` `[R, heads, T,
    head_size]` written at slots `index .. index + T - 1` of the cache rows
    `rows` (int `[R]`; default: every row, R = batch).

    A scatter of `head_size` rows (`tensor_scatter_nd_update`): XLA updates
    the cache in place, touching only the new rows (a select over the whole
    cache cost 12% of batch-1 decode time), and the same op runs in plain
    TensorFlow (TF Serving) and as a TFLite builtin.
    """
    batch, heads, count = ops.shape(new)[0], ops.shape(new)[1], ops.shape(new)[2]
    rows = ops.arange(batch) if rows is None else rows
    rows, head, slot = ops.meshgrid(rows, ops.arange(heads), index + ops.arange(count),
                                    indexing="ij")
    # One row of indices per written head_size vector: the form every
    # backend's scatter takes (PyTorch's needs 2-D indices).
    indices = ops.reshape(ops.stack([rows, head, slot], axis=-1), (-1, 3))
    return ops.scatter_update(cache, indices, ops.reshape(new, (-1, new.shape[-1])))


@keras.saving.register_keras_serializable(package="algpt2_tf")
class CausalSelfAttention(keras.layers.Layer):
    """GPT-2 self-attention: one fused q/k/v projection, softmax in float32.

    The caller supplies an additive `attention_bias` (0 where a query may see a
    key, a large negative number elsewhere) so that causality and padding are
    decided once per forward pass, not once per layer.

    With a cache, a `(keys, values)` pair of preallocated `[batch, heads,
    max_length, head_size]` tensors, the new keys and values are written at
    `cache_index` and the queries attend over the whole cache (the bias hides
    the unwritten slots).

    Args:
        hidden_size: model width.
        num_heads: number of heads; must divide `hidden_size`.
        dropout: dropout rate on the attention probabilities.
        initializer_range: stddev of the normal initializer.
        output_initializer_range: stddev for the output projection (GPT-2
            scales it down with depth); defaults to `initializer_range`.

    Example:
    >>> attention = CausalSelfAttention(hidden_size=32, num_heads=4)
    >>> x = np.zeros((1, 3, 32), "float32")
    >>> out, cache = attention(x, np.zeros((1, 1, 3, 3), "float32"))
    >>> tuple(out.shape), cache is None
    ((1, 3, 32), True)
    """

    def __init__(self, hidden_size, num_heads, dropout=0.0, initializer_range=0.02,
                 output_initializer_range=None, **kwargs):
        super().__init__(**kwargs)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}).")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_size = hidden_size // num_heads
        self.dropout = dropout
        self.initializer_range = initializer_range
        self.output_initializer_range = output_initializer_range
        init = keras.initializers.TruncatedNormal(stddev=initializer_range)
        out_init = keras.initializers.TruncatedNormal(
            stddev=output_initializer_range or initializer_range)
        self.qkv = Linear(3 * hidden_size, kernel_initializer=init, name="qkv",
                                      dtype=self.dtype_policy)
        self.output_dense = Linear(hidden_size, kernel_initializer=out_init,
                                               name="output", dtype=self.dtype_policy)
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

    def build(self, input_shape):
        self.qkv.build((None, None, self.hidden_size))
        self.output_dense.build((None, None, self.hidden_size))
        self.built = True

    def _split_heads(self, x):
        # [batch, seq, hidden] -> [batch, heads, seq, head_size]
        batch, seq = ops.shape(x)[0], ops.shape(x)[1]
        x = ops.reshape(x, (batch, seq, self.num_heads, self.head_size))
        return ops.transpose(x, (0, 2, 1, 3))

    def call(self, x, attention_bias, cache=None, cache_index=None, training=None, adapter=None,
             plan=None):
        """Returns `(output, cache)`; `cache` is `None` when none was given.

        `adapter`: a `LayerAdapter` whose low-rank deltas are added to the
        q/k/v and output projections, or `None`. `plan`: a decode loop's
        `DecodePlan` for the projections (see `Linear`), or `None`. With
        `plan.host_writes` the cache is read only and the new `(keys, values)`
        are returned in its place, for the runtime to write.
        """
        q, k, v = ops.split(add_delta(self.qkv(x, plan=plan), adapter, "qkv", x), 3, axis=-1)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        if plan is not None and plan.host_writes:
            out = self._attend_beside_cache(q, k, v, cache, attention_bias)
            cache = (k, v)
        else:
            if cache is not None:
                key_cache, value_cache = cache
                k = write_slots(key_cache, ops.cast(k, key_cache.dtype), cache_index)
                v = write_slots(value_cache, ops.cast(v, value_cache.dtype), cache_index)
                cache = (k, v)
                k, v = ops.cast(k, q.dtype), ops.cast(v, q.dtype)
            out = self._attend(q, k, v, attention_bias, training)
        out = ops.transpose(out, (0, 2, 1, 3))
        batch, seq = ops.shape(out)[0], ops.shape(out)[1]
        out = ops.reshape(out, (batch, seq, self.hidden_size))
        return add_delta(self.output_dense(out, plan=plan), adapter, "attention_output", out), cache

    def _attend(self, q, k, v, attention_bias, training=None):
        """`softmax(q k^T / sqrt(head_size) + bias) v`, `[batch, heads, queries, head_size]`."""
        if q.shape[2] == 1:
            # One query per row (decoding): keys @ query reads the key cache in
            # place; query @ keys^T makes XLA copy the whole transposed cache
            # in every layer (12% of a batch-1 decode step).
            scores = ops.swapaxes(ops.matmul(k, ops.swapaxes(q, 2, 3)), 2, 3)
        else:
            scores = ops.matmul(q, ops.swapaxes(k, 2, 3))
        scores = ops.cast(scores, "float32") * (1.0 / math.sqrt(self.head_size))
        probs = ops.softmax(scores + ops.cast(attention_bias, "float32"), axis=-1)
        probs = self.dropout_layer(ops.cast(probs, v.dtype), training=training)
        return ops.matmul(probs, v)

    def _attend_beside_cache(self, q, k, v, cache, attention_bias):
        """Attention over a read-only `cache` and the new keys `k`/values `v` beside it
        (`DecodePlan.host_writes`: the runtime writes them into its cache itself).

        No cache (a prefill): the new keys alone. With one (a decode step, one query per
        row), `attention_bias` `[batch, 1, 1, slots + 1]` covers the cache's slots, then
        the new key; the products are broadcast multiplies and sums, which XNNPACK runs
        over the cache as it lies, where a batch matmul packs it into a matrix first (12
        layers of it in LiteRT, AMD EPYC Zen 4: batch 1 at 256 slots 0.55 ms against 0.67,
        batch 8 at 128 slots 2.1 ms against 3.0).
        """
        if cache is None:
            return self._attend(q, k, v, attention_bias)
        if q.shape[2] != 1:
            raise ValueError(f"Attention beside a cache takes one query per row, got {q.shape[2]}.")
        keys, values = cache
        slots = keys.shape[2]
        scale = 1.0 / math.sqrt(self.head_size)
        scores = ops.concatenate([ops.expand_dims(ops.sum(keys * q, axis=-1), 2),
                                  ops.sum(k * q, axis=-1, keepdims=True)], axis=-1)
        probs = ops.softmax(scores * scale + attention_bias, axis=-1)
        cached, own = ops.split(probs, [slots], axis=-1)
        return ops.sum(ops.swapaxes(cached, 2, 3) * values, axis=2, keepdims=True) + own * v

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            dropout=self.dropout,
            initializer_range=self.initializer_range,
            output_initializer_range=self.output_initializer_range,
        )
        return config
