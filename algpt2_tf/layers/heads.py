"""The tied LM head (the softmax reuses the token table) and the SOP head (ALBERT idea #3)."""

import keras
from keras import ops

from algpt2_tf.layers.embedding import projection_initializer
from algpt2_tf.layers.linear import Linear


@keras.saving.register_keras_serializable(package="algpt2_tf")
class TiedLMHead(keras.layers.Layer):
    """Final LayerNorm, hidden -> E projection, then `x @ token_table^T`.

    The head owns no vocabulary-sized weight: the caller passes the token
    table (and, with `tie_projection`, the input E -> hidden kernel) at call
    time, so the softmax is tied to the input embedding by construction.
    Logits are float32 even under a mixed precision policy.

    Args:
        hidden_size: model width.
        embedding_size: E, or `None` when the tables are hidden-sized (GPT-2).
        tie_projection: reuse the transpose of the input projection kernel
            (passed to `call`) instead of owning a hidden -> E kernel.
        layer_norm_epsilon: epsilon of the final LayerNorm.
        initializer_range: stddev of the normal initializer.
        projection_init: `normal` or `fan_in`: the hidden -> E projection's
            initializer (see `layers.embedding.projection_initializer`).

    Example:
    >>> head = TiedLMHead(hidden_size=32, embedding_size=8)
    >>> logits = head(np.zeros((1, 3, 32), "float32"), np.zeros((100, 8), "float32"))
    >>> tuple(logits.shape), str(logits.dtype)
    ((1, 3, 100), "<dtype: 'float32'>")
    """

    def __init__(self, hidden_size, embedding_size=None, tie_projection=False,
                 layer_norm_epsilon=1e-5, initializer_range=0.02, projection_init="normal",
                 **kwargs):
        super().__init__(**kwargs)
        if tie_projection and embedding_size is None:
            raise ValueError("tie_projection=True needs an embedding_size.")
        self.hidden_size = hidden_size
        self.embedding_size = embedding_size
        self.tie_projection = tie_projection
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.projection_init = projection_init
        self.final_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, name="final_norm", dtype=self.dtype_policy)
        self.projection = None
        if embedding_size is not None and not tie_projection:
            self.projection = Linear(
                embedding_size, name="projection", dtype=self.dtype_policy,
                kernel_initializer=projection_initializer(
                    projection_init, hidden_size, initializer_range))

    def build(self, input_shape=None):
        self.final_norm.build((None, None, self.hidden_size))
        if self.projection is not None:
            self.projection.build((None, None, self.hidden_size))
        self.projection_bias = None
        if self.tie_projection:
            self.projection_bias = self.add_weight(
                name="projection_bias", shape=(self.embedding_size,), initializer="zeros")
        self.built = True

    def normalize(self, hidden):
        """The final LayerNorm alone (the SOP head reads this too)."""
        return self.final_norm(hidden)

    def call(self, hidden, token_embeddings, input_projection_kernel=None, normalized=False,
             token_scale=None, plan=None):
        """Maps hidden states `[..., hidden]` to float32 logits `[..., vocab]`.

        Args:
            hidden: the last decoder block's output.
            token_embeddings: the `[vocab, E]` token table of the embedding.
            input_projection_kernel: the embedding's `[E, hidden]` kernel;
                required with `tie_projection`.
            normalized: `hidden` already went through `normalize`.
            token_scale: `[vocab]` scales when `token_embeddings` is int8
                (a quantized embedding); each token's logit is divided by
                its scale.
            plan: a decode loop's `DecodePlan` for the projection (see `Linear`), or `None`.
        """
        x = hidden if normalized else self.final_norm(hidden)
        if self.projection is not None:
            x = self.projection(x, plan=plan)
        elif self.tie_projection:
            if input_projection_kernel is None:
                raise ValueError("tie_projection=True: pass input_projection_kernel.")
            kernel = ops.cast(input_projection_kernel, x.dtype)
            x = ops.matmul(x, ops.transpose(kernel)) + ops.cast(self.projection_bias, x.dtype)
        table = ops.cast(token_embeddings, x.dtype)
        logits = ops.matmul(x, ops.transpose(table))
        if token_scale is not None:
            logits = logits / ops.cast(token_scale, x.dtype)
        return ops.cast(logits, "float32")

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_size=self.hidden_size,
            embedding_size=self.embedding_size,
            tie_projection=self.tie_projection,
            layer_norm_epsilon=self.layer_norm_epsilon,
            initializer_range=self.initializer_range,
            projection_init=self.projection_init,
        )
        return config


def last_token_index(attention_mask):
    """Index of the last position with `attention_mask == 1` in each row."""
    mask = ops.cast(attention_mask, "int32")
    seq_len = ops.shape(mask)[1]
    return seq_len - 1 - ops.argmax(ops.flip(mask, axis=1), axis=1)


@keras.saving.register_keras_serializable(package="algpt2_tf")
class SOPHead(keras.layers.Layer):
    """Sentence-order prediction (ALBERT idea #3): a 2-way classifier on the last real token.

    A causal model has seen the whole pair only at its last token, so that
    token's hidden state (after the final LayerNorm) is the pooled summary.
    Works with left and right padding.

    Args:
        hidden_size: model width.
        initializer_range: stddev of the normal initializer.

    Example:
    >>> head = SOPHead(hidden_size=32)
    >>> tuple(head(np.zeros((2, 5, 32), "float32"), np.ones((2, 5), "int32")).shape)
    (2, 2)
    """

    def __init__(self, hidden_size, initializer_range=0.02, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.initializer_range = initializer_range
        self.classifier = Linear(
            2, name="classifier", dtype=self.dtype_policy,
            kernel_initializer=keras.initializers.TruncatedNormal(stddev=initializer_range))

    def build(self, input_shape=None):
        self.classifier.build((None, self.hidden_size))
        self.built = True

    def call(self, normalized_hidden, attention_mask):
        index = last_token_index(attention_mask)
        pooled = ops.take_along_axis(
            normalized_hidden, ops.reshape(index, (-1, 1, 1)), axis=1)[:, 0]
        return ops.cast(self.classifier(pooled), "float32")

    def get_config(self):
        config = super().get_config()
        config.update(hidden_size=self.hidden_size, initializer_range=self.initializer_range)
        return config
