"""`Linear`: a Dense layer whose bias add stays out of XLA:CPU's dot fusion,
and which Keras' `quantize("int8")` turns weight-only int8."""

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

    def quantize(self, mode=None, type_check=True, config=None):
        """Weight-only int8 (`model.quantize("int8")` calls this): an int8
        kernel with one scale per output unit; inputs and outputs stay float.

        Keras' default int8 also quantizes each input row on the fly; this
        layer keeps its inputs float, so the only error is the weights'
        rounding (see `ALGPT2LMHeadModel.quantize`).
        """
        if mode != "int8":
            raise NotImplementedError(f"Linear supports int8 quantization only, not {mode!r}.")
        from keras import quantizers

        weight_only = quantizers.Int8QuantizationConfig(
            weight_quantizer=quantizers.AbsMaxQuantizer(axis=0), activation_quantizer=None)
        super().quantize("int8", type_check=False, config=weight_only)

    def float_kernel(self):
        """The `[input_dim, units]` kernel in the compute dtype (dequantized when int8)."""
        kernel = ops.cast(self.kernel, self.compute_dtype)
        if self.quantization_mode == "int8":
            kernel = ops.divide(kernel, ops.cast(self.kernel_scale, self.compute_dtype))
        return kernel

    def _int8_call(self, inputs, training=None):
        return self.call(inputs, training=training)

    def call(self, inputs, training=None):
        if self.rows_kernel is None:
            x = ops.matmul(inputs, self.float_kernel())
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
                          lambda: tf.linalg.matmul(flat, ops.cast(self.float_kernel(), flat.dtype)))
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

    An int8 kernel's copy is dequantized here, once per call: XLA:CPU has
    no faster matrix-vector product for int8 weights (measured on the dev
    machine: 768 x 3072, float32 rows 257 us, int8 converted inside the
    loop 300 us, int8 x int8 -> int32 262 us), so int8 models decode at
    float32 speed and keep their 4x smaller weights at rest.
    """
    import tensorflow as tf

    layers = [layer for layer in model._flatten_layers() if isinstance(layer, Linear)]
    for layer in layers:
        layer.rows_kernel = tf.transpose(layer.float_kernel())
    try:
        yield
    finally:
        for layer in layers:
            layer.rows_kernel = None
