"""`Linear`: a Dense layer whose bias add stays out of XLA:CPU's dot fusion."""

import contextlib

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="algpt2_tf")
class Linear(keras.layers.Dense):
    """`keras.layers.Dense` (same weights, same config, same results) that
    adds its bias as `x @ kernel - (-bias)`.

    Why: XLA on CPU fuses a matrix-vector product with the bias add that
    follows it into one "output fusion", and the generated code for that
    fusion is about 1.5x slower than the plain product. Batch-1 decoding is
    a chain of matrix-vector products, so this decides its speed. A
    subtraction of the negated bias is not fused, and negation is exact, so
    the result is bit-identical to `x @ kernel + bias`. Measured on a
    2-core CPU: `algpt2` greedy decoding, batch 1, 112 -> 145 tokens/s.

    Args:
        units: output width.
        **kwargs: as for `keras.layers.Dense`.

    Example:
    >>> layer = Linear(8)
    >>> tuple(layer(np.ones((2, 4), "float32")).shape)
    (2, 8)
    """

    rows_kernel = None
    """A `[units, input_dim]` copy of the kernel, in the compute dtype, while
    `rows_kernel_copies` is active."""

    def call(self, inputs, training=None):
        if self.rows_kernel is None:
            x = ops.matmul(inputs, self.kernel)
        else:
            x = self._matmul_one_row_by_rows_kernel(inputs)
        if self.bias is not None:
            x = ops.subtract(x, ops.negative(self.bias))
        if self.activation is not None:
            x = self.activation(x)
        return x

    def _matmul_one_row_by_rows_kernel(self, inputs):
        """`inputs @ kernel`, through `rows_kernel` when there is one input row.

        XLA compiles for static shapes, so it keeps one branch of the `cond`.
        (TensorFlow only: `rows_kernel_copies` runs inside generation's XLA loop.)
        """
        import tensorflow as tf

        flat = ops.reshape(inputs, (-1, self.kernel.shape[0]))
        product = tf.cond(tf.shape(flat)[0] == 1,
                          lambda: tf.linalg.matmul(flat, self.rows_kernel, transpose_b=True),
                          lambda: tf.linalg.matmul(flat, ops.cast(self.kernel, flat.dtype)))
        return ops.reshape(product, tuple(ops.shape(inputs)[:-1]) + (self.units,))


@contextlib.contextmanager
def rows_kernel_copies(model):
    """Gives every `Linear` of `model` a `[units, input_dim]` copy of its kernel
    for one-row products, while tracing a batch-1 decode loop.

    XLA:CPU's matrix-vector code runs about 12% faster when the matrix is
    stored one row per output unit, but its matrix-matrix products (Eigen)
    run about 40% slower with that layout (measured: batch-8 decoding 580 ->
    344 tokens/s). So the kernels stay `[input_dim, units]`, and a decode
    function traced inside this context makes the transposed copies once
    per call, before its loop (`Generator` does, for its XLA-compiled
    loop): one-row steps use the copies, anything larger the kernels. The
    copies cost their size in memory during the call (28 MB for `algpt2`).
    """
    import tensorflow as tf

    layers = [layer for layer in model._flatten_layers() if isinstance(layer, Linear)]
    for layer in layers:
        layer.rows_kernel = tf.transpose(ops.cast(layer.kernel, layer.compute_dtype))
    try:
        yield
    finally:
        for layer in layers:
            layer.rows_kernel = None
