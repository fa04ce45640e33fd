"""`Linear`: a Dense layer that the decode loop's speed tricks can reach,
and which Keras' `quantize("int8")` turns weight-only int8."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="algpt2_tf")
class Linear(keras.layers.Dense):
    """`keras.layers.Dense` (same weights, same config, same results) that a decode loop
    can speed up: called with a `plan` (a `decode_tricks.DecodePlan`, which only a cached
    forward pass passes), it computes its product with `plan.matmul(self, x)` (one-row
    products through a row-major copy of the kernel) and adds its bias with
    `plan.add_bias` (as a subtraction, which XLA:CPU does not fuse into the slower
    "output fusion" of the product). Both are bit-identical to `x @ kernel + bias`; their
    measured gains are in `algpt2_tf.generation.decode_tricks`. Without a plan (training, evaluation,
    `model(...)`) it is a plain Dense.

    Args:
        units: output width.
        **kwargs: as for `keras.layers.Dense`.

    Example:
    >>> layer = Linear(8)
    >>> tuple(layer(np.ones((2, 4), "float32")).shape)
    (2, 8)
    """

    def quantize(self, mode=None, type_check=True, config=None):
        """Weight-only int8 (`model.quantize("int8")` calls this): an int8
        kernel with one scale per output unit; inputs and outputs stay float.

        Keras' default int8 also quantizes each input row on the fly; this
        layer keeps its inputs float, so the only error is the weights'
        rounding (see `ALGPT2Backbone.quantize`).
        """
        if mode != "int8":
            raise NotImplementedError(f"Linear supports int8 quantization only, not {mode!r}.")
        from keras import quantizers  # deferred: imports Keras

        weight_only = quantizers.Int8QuantizationConfig(
            weight_quantizer=quantizers.AbsMaxQuantizer(axis=0), activation_quantizer=None)
        super().quantize("int8", type_check=False, config=weight_only)

    def float_kernel(self):
        """The `[input_dim, units]` kernel in the compute dtype (dequantized when int8)."""
        kernel = ops.cast(self.kernel, self.compute_dtype)
        if self.quantization_mode == "int8":
            kernel = ops.divide(kernel, ops.cast(self.kernel_scale, self.compute_dtype))
        return kernel

    def _int8_call(self, inputs, training=None, plan=None):
        return self.call(inputs, training=training, plan=plan)

    def call(self, inputs, training=None, plan=None):
        if plan is None:
            x = ops.matmul(inputs, self.float_kernel())
        else:
            x = plan.matmul(self, inputs)
        if self.bias is not None:
            x = ops.add(x, self.bias) if plan is None else plan.add_bias(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x
