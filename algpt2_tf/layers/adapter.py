"""`LayerAdapter`: what one virtual layer owns around a shared block (relaxed sharing).

This relaxes ALBERT idea #2 (cross-layer sharing, the loop in `model.py`).

A shared block gives every virtual layer the same function. Two cheap ways to
let the layers differ, each an `ALGPT2Config` option:

- `per_layer_norms`: each virtual layer owns the block's two LayerNorms
  (4 x hidden parameters a layer); the block keeps none.
- `lora_rank = r`: each virtual layer adds a rank-r delta `x @ A @ B` to the
  output of each of the block's four kernels (fused q/k/v, attention output,
  MLP in, MLP out), as in Relaxed Recursive Transformers (Bae et al., 2024).
  `B` starts at zero, so a new model computes exactly the plain shared model.
"""

import keras
from keras import ops

KERNELS = ("qkv", "attention_output", "mlp_in", "mlp_out")
"""The block kernels a low-rank delta applies to, in the order of `kernel_shapes`."""


def kernel_shapes(hidden_size, intermediate_size):
    """`{kernel name: (input width, output width)}` of a decoder block."""
    h, i = hidden_size, intermediate_size
    return {"qkv": (h, 3 * h), "attention_output": (h, h), "mlp_in": (h, i), "mlp_out": (i, h)}


@keras.saving.register_keras_serializable(package="algpt2_tf")
class LayerAdapter(keras.layers.Layer):
    """Per-virtual-layer LayerNorms and/or low-rank kernel deltas.

    `DecoderBlock.call(..., adapter=...)` reads `attention_norm` and
    `mlp_norm` from here when they exist, and adds `delta(name, x)` to the
    output of each kernel.

    Args:
        hidden_size: model width.
        intermediate_size: MLP width.
        norms: own the two LayerNorms of the layer.
        lora_rank: rank of the deltas (0: none).
        layer_norm_epsilon: epsilon of the LayerNorms.
        initializer_range: stddev of the normal initializer of the `A` factors.

    Example:
    >>> adapter = LayerAdapter(hidden_size=32, intermediate_size=64, lora_rank=4)
    >>> adapter.build()
    >>> delta = adapter.delta("mlp_in", np.ones((1, 3, 32), "float32"))
    >>> tuple(delta.shape), float(np.abs(delta).max())  # B starts at zero: no change yet
    ((1, 3, 64), 0.0)
    """

    def __init__(self, hidden_size, intermediate_size, norms=False, lora_rank=0,
                 layer_norm_epsilon=1e-5, initializer_range=0.02, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.norms = norms
        self.lora_rank = lora_rank
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.attention_norm = self.mlp_norm = None
        if norms:
            self.attention_norm = keras.layers.LayerNormalization(
                epsilon=layer_norm_epsilon, name="attention_norm", dtype=self.dtype_policy)
            self.mlp_norm = keras.layers.LayerNormalization(
                epsilon=layer_norm_epsilon, name="mlp_norm", dtype=self.dtype_policy)

    def build(self, input_shape=None):
        if self.norms:
            self.attention_norm.build((None, None, self.hidden_size))
            self.mlp_norm.build((None, None, self.hidden_size))
        self.lora_a, self.lora_b = {}, {}
        if self.lora_rank:
            init = keras.initializers.TruncatedNormal(stddev=self.initializer_range)
            for name, (fan_in, fan_out) in kernel_shapes(self.hidden_size,
                                                         self.intermediate_size).items():
                self.lora_a[name] = self.add_weight(
                    name=f"{name}_lora_a", shape=(fan_in, self.lora_rank), initializer=init)
                self.lora_b[name] = self.add_weight(
                    name=f"{name}_lora_b", shape=(self.lora_rank, fan_out), initializer="zeros")
        self.built = True

    def delta(self, name, x):
        """The low-rank correction `x @ A @ B` of kernel `name`, or `None` without deltas."""
        if not self.lora_rank:
            return None
        a = ops.cast(self.lora_a[name], x.dtype)
        b = ops.cast(self.lora_b[name], x.dtype)
        return ops.matmul(ops.matmul(x, a), b)

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            norms=self.norms,
            lora_rank=self.lora_rank,
            layer_norm_epsilon=self.layer_norm_epsilon,
            initializer_range=self.initializer_range,
        )
        return config


def add_delta(output, adapter, name, x):
    """`output` plus `adapter`'s delta of kernel `name` applied to `x` (if any)."""
    delta = adapter.delta(name, x) if adapter is not None else None
    return output if delta is None else output + delta
