"""The GPT-2 pre-LayerNorm decoder block (the unit that ALGPT2 shares)."""

import keras

from algpt2_tf.layers.adapter import add_delta
from algpt2_tf.layers.attention import CausalSelfAttention
from algpt2_tf.layers.linear import Linear


def get_activation(name):
    """Maps a config activation name to a function (`gelu` = GPT-2's tanh approximation)."""
    if name == "gelu":
        return lambda x: keras.activations.gelu(x, approximate=True)
    if name == "gelu_exact":
        return lambda x: keras.activations.gelu(x, approximate=False)
    if name == "relu":
        return keras.activations.relu
    raise ValueError(f"Unknown activation {name!r}; expected gelu, gelu_exact or relu.")


@keras.saving.register_keras_serializable(package="algpt2_tf")
class DecoderBlock(keras.layers.Layer):
    """`x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`, exactly as GPT-2.

    Args:
        hidden_size: model width.
        num_heads: attention heads.
        intermediate_size: MLP width.
        attention_dropout: dropout on attention probabilities.
        residual_dropout: dropout on each residual branch.
        layer_norm_epsilon: LayerNorm epsilon.
        activation: `gelu` (tanh approximation), `gelu_exact` or `relu`.
        initializer_range: stddev of the normal initializer.
        output_initializer_range: stddev of the two residual output projections.
        layer_norms: own the two LayerNorms. `False` when each virtual layer
            owns them instead (`per_layer_norms`): every call then passes a
            `LayerAdapter` that has them.

    Example:
    >>> block = DecoderBlock(hidden_size=32, num_heads=4, intermediate_size=128)
    >>> y, _ = block(np.zeros((1, 3, 32), "float32"), np.zeros((1, 1, 3, 3), "float32"))
    >>> tuple(y.shape)
    (1, 3, 32)
    """

    def __init__(self, hidden_size, num_heads, intermediate_size, attention_dropout=0.0,
                 residual_dropout=0.0, layer_norm_epsilon=1e-5, activation="gelu",
                 initializer_range=0.02, output_initializer_range=None, layer_norms=True,
                 **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size
        self.attention_dropout = attention_dropout
        self.residual_dropout = residual_dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        self.activation = activation
        self.initializer_range = initializer_range
        self.output_initializer_range = output_initializer_range
        self.layer_norms = layer_norms
        self._activation_fn = get_activation(activation)
        init = keras.initializers.TruncatedNormal(stddev=initializer_range)
        out_init = keras.initializers.TruncatedNormal(
            stddev=output_initializer_range or initializer_range)
        policy = self.dtype_policy
        self.attention_norm = self.mlp_norm = None
        if layer_norms:
            self.attention_norm = keras.layers.LayerNormalization(
                epsilon=layer_norm_epsilon, name="attention_norm", dtype=policy)
            self.mlp_norm = keras.layers.LayerNormalization(
                epsilon=layer_norm_epsilon, name="mlp_norm", dtype=policy)
        self.attention = CausalSelfAttention(
            hidden_size, num_heads, dropout=attention_dropout, initializer_range=initializer_range,
            output_initializer_range=output_initializer_range, name="attention", dtype=policy)
        self.mlp_in = Linear(intermediate_size, kernel_initializer=init,
                                         name="mlp_in", dtype=policy)
        self.mlp_out = Linear(hidden_size, kernel_initializer=out_init,
                                          name="mlp_out", dtype=policy)
        self.residual_dropout_layer = keras.layers.Dropout(residual_dropout, dtype=policy)

    def build(self, input_shape=None):
        shape = (None, None, self.hidden_size)
        if self.layer_norms:
            self.attention_norm.build(shape)
            self.mlp_norm.build(shape)
        self.attention.build(shape)
        self.mlp_in.build(shape)
        self.mlp_out.build((None, None, self.intermediate_size))
        self.built = True

    def call(self, x, attention_bias, cache=None, cache_index=None, training=None, adapter=None,
             plan=None):
        """Returns `(output, cache)`, see `CausalSelfAttention.call`.

        `adapter`: the calling virtual layer's `LayerAdapter` (its own
        LayerNorms, its low-rank deltas), or `None`. `plan`: a decode loop's
        `DecodePlan` for the block's `Linear`s, or `None`.
        """
        owns_norms = adapter is not None and adapter.attention_norm is not None
        attention_norm = adapter.attention_norm if owns_norms else self.attention_norm
        mlp_norm = adapter.mlp_norm if owns_norms else self.mlp_norm
        if attention_norm is None:
            raise ValueError("This block has no LayerNorms (layer_norms=False): pass an adapter "
                             "that owns them.")
        attended, cache = self.attention(attention_norm(x), attention_bias, cache=cache,
                                         cache_index=cache_index, training=training,
                                         adapter=adapter, plan=plan)
        x = x + self.residual_dropout_layer(attended, training=training)
        normed = mlp_norm(x)
        h = self._activation_fn(add_delta(self.mlp_in(normed, plan=plan), adapter, "mlp_in",
                                          normed))
        h = add_delta(self.mlp_out(h, plan=plan), adapter, "mlp_out", h)
        x = x + self.residual_dropout_layer(h, training=training)
        return x, cache

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            attention_dropout=self.attention_dropout,
            residual_dropout=self.residual_dropout,
            layer_norm_epsilon=self.layer_norm_epsilon,
            activation=self.activation,
            initializer_range=self.initializer_range,
            output_initializer_range=self.output_initializer_range,
            layer_norms=self.layer_norms,
        )
        return config
