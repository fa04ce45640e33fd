"""The factorized token + position embedding (ALBERT idea #1)."""

import keras
from keras import ops

from algpt2_tf.layers.linear import Linear


def projection_initializer(kind, fan_in, initializer_range):
    """The initializer of a factorization projection (`ALGPT2Config.projection_init`).

    `normal`: stddev `initializer_range`, like every other kernel. With E=128
    and hidden 256 that starts the hidden states about 4x smaller than GPT-2's
    embedding and the softmax's features about 3x smaller than a LayerNorm's
    output, and trains to a worse model: in `experiments/algpt2_vs_gpt2` a
    factorized, unshared model reaches validation loss 6.376 with `normal` and
    5.798 with `fan_in`, each at its swept rate (GPT-2 shape: 5.553). With the
    block shared too, `fan_in` gains nothing under AdamW but is what LAMB
    needs: ALGPT2 with LAMB reaches 6.432 with `normal`, 5.798 with `fan_in`
    (mean of two seeds).
    `fan_in`: stddev `1 / sqrt(fan_in)`, which keeps the scale through the
    projection.
    """
    stddev = fan_in ** -0.5 if kind == "fan_in" else initializer_range
    return keras.initializers.TruncatedNormal(stddev=stddev)


@keras.saving.register_keras_serializable(package="algpt2_tf")
class FactorizedEmbedding(keras.layers.Layer):
    """Token and position tables of width E, summed, then projected E -> hidden.

    With `embedding_size=None` both tables are `hidden_size` wide and there is
    no projection: exactly GPT-2's `wte + wpe`. Positions live in the E space,
    as in ALBERT and the original ALGPT2.

    Args:
        vocab_size: number of token ids.
        max_positions: number of rows of the position table.
        hidden_size: width of the output.
        embedding_size: table width E, or `None` for no factorization.
        dropout: dropout rate applied to the output.
        initializer_range: stddev of the normal initializer.
        projection_init: `normal` or `fan_in` (see `projection_initializer`).

    Example:
    >>> layer = FactorizedEmbedding(100, 16, hidden_size=32, embedding_size=8)
    >>> tuple(layer(np.array([[1, 2]]), np.array([[0, 1]])).shape)
    (1, 2, 32)
    """

    def __init__(self, vocab_size, max_positions, hidden_size, embedding_size=None,
                 dropout=0.0, initializer_range=0.02, projection_init="normal", **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.max_positions = max_positions
        self.hidden_size = hidden_size
        self.embedding_size = embedding_size
        self.dropout = dropout
        self.initializer_range = initializer_range
        self.projection_init = projection_init
        self.projection = None
        if embedding_size is not None:
            self.projection = Linear(
                hidden_size, name="projection", dtype=self.dtype_policy,
                kernel_initializer=projection_initializer(
                    projection_init, embedding_size, initializer_range))
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

    def _initializer(self):
        return keras.initializers.TruncatedNormal(stddev=self.initializer_range)

    def build(self, input_shape=None):
        table_width = self.embedding_size or self.hidden_size
        self.token_embeddings = self.add_weight(
            name="token_embeddings", shape=(self.vocab_size, table_width),
            initializer=self._initializer())
        self.position_embeddings = self.add_weight(
            name="position_embeddings", shape=(self.max_positions, table_width),
            initializer=self._initializer())
        if self.projection is not None:
            self.projection.build((None, None, table_width))
        self.built = True

    token_scale = None
    """`[vocab]` scales of an int8 token table (after `quantize`), else None."""

    def quantize(self, mode=None, type_check=True, config=None):
        """Weight-only int8 for the token table: Keras' abs-max quantizer,
        `round(row * 127 / max|row|)` with one scale per token, so one int8 copy serves both the lookup here
        and the tied softmax (`TiedLMHead` divides each token's logit by its
        scale). The position table stays float; the projection is a `Linear`
        and quantizes itself.
        """
        if mode != "int8":
            raise NotImplementedError(f"FactorizedEmbedding supports int8 only, not {mode!r}.")
        values, scale = keras.quantizers.abs_max_quantize(  # Linear's quantizer, per row
            self.token_embeddings, axis=-1, to_numpy=True)
        values, scale = ops.convert_to_numpy(values), ops.convert_to_numpy(scale)[:, 0]
        del self.token_embeddings
        self.token_embeddings = self.add_weight(
            name="token_embeddings", shape=values.shape, dtype="int8", trainable=False,
            initializer="zeros")
        self.token_scale = self.add_weight(
            name="token_scale", shape=scale.shape, trainable=False, initializer="ones")
        self.token_embeddings.assign(values)
        self.token_scale.assign(scale.astype("float32"))
        self._is_quantized = True

    def call(self, input_ids, position_ids, training=None, plan=None):
        """`[batch, seq, hidden]` embeddings; `plan`: a decode loop's `DecodePlan` for the
        projection (see `Linear`), or `None`."""
        x = ops.take(self.token_embeddings, input_ids, axis=0)
        if self.token_scale is not None:
            x = ops.cast(x, self.compute_dtype)
            x = x / ops.expand_dims(ops.take(self.token_scale, input_ids, axis=0), -1)
        x = x + ops.take(self.position_embeddings, position_ids, axis=0)
        if self.projection is not None:
            x = self.projection(x, plan=plan)
        return self.dropout_layer(x, training=training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.hidden_size,)

    def get_config(self):
        config = super().get_config()
        config.update(
            vocab_size=self.vocab_size,
            max_positions=self.max_positions,
            hidden_size=self.hidden_size,
            embedding_size=self.embedding_size,
            dropout=self.dropout,
            initializer_range=self.initializer_range,
            projection_init=self.projection_init,
        )
        return config
