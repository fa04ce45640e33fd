"""`Linear`: a dense layer laid out for fast matrix-vector products on CPU."""

import keras
import tensorflow as tf
from keras import ops


@keras.saving.register_keras_serializable(package="algpt2_tf")
class Linear(keras.layers.Layer):
    """`y = x @ kernel^T + bias`, with `kernel` stored `[units, input_dim]`.

    The results are those of `keras.layers.Dense` given the transposed
    kernel; two choices make batch-1 decoding, a chain of matrix-vector
    products, faster under XLA on CPU:

    - The kernel is stored one row per output unit (PyTorch's and TFLite's
      layout), so each output is a dot product over a contiguous row. XLA:CPU
      computes `x @ kernel^T` about 12% faster than `x @ kernel` with a
      `[input_dim, units]` kernel, and nothing changes for large batches.
    - The bias is added as `x @ kernel^T - (-bias)`. XLA fuses a
      matrix-vector product with a following `+ bias` into one "output
      fusion" whose generated code is about 1.5x slower than the plain
      product; a subtraction is not fused, and negation is exact, so the
      result equals `+ bias` bit for bit.

    Args:
        units: output width.
        use_bias: add a bias.
        kernel_initializer: initializer of the `[units, input_dim]` kernel.
        bias_initializer: initializer of the bias.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Example:
    >>> layer = Linear(8)
    >>> layer(np.ones((2, 4), "float32")).shape
    (2, 8)
    >>> layer.kernel.shape
    (8, 4)
    """

    def __init__(self, units, use_bias=True, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(self.units, input_shape[-1]),
                                      initializer=self.kernel_initializer)
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.units,),
                                        initializer=self.bias_initializer)

    def call(self, inputs):
        kernel = ops.cast(self.kernel, self.compute_dtype)
        flat = ops.reshape(inputs, (-1, ops.shape(kernel)[1]))
        x = tf.linalg.matmul(flat, kernel, transpose_b=True)
        x = ops.reshape(x, tuple(ops.shape(inputs)[:-1]) + (self.units,))
        if self.bias is not None:
            x = ops.subtract(x, ops.negative(ops.cast(self.bias, self.compute_dtype)))
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
        )
        return config
