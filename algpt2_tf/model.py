"""`ALGPT2Backbone`: factorized embedding -> the shared-block loop -> tied head (+ SOP head).

The model core: the network and its training loss, everything `fit`, `evaluate` and a decode
step use. It imports nothing of generation, conversion, export or serving; the task class
`causal_lm.ALGPT2LMHeadModel` adds `generate` and `from_preset` on top (keras-hub's
backbone/task split). A saved file is an ALGPT2 model whichever of the two saved it;
`saving.load_model(path, cls)` loads it as the class asked for.
"""

import keras
from keras import ops

from algpt2_tf import losses
from algpt2_tf.config import ALGPT2Config
from algpt2_tf.layers.adapter import LayerAdapter
from algpt2_tf.layers.block import DecoderBlock
from algpt2_tf.layers.embedding import FactorizedEmbedding
from algpt2_tf.layers.heads import SOPHead, TiedLMHead
from algpt2_tf.layers.linear import Linear
from algpt2_tf.runtime import backend

NEG_INF = -1e9
"""Additive attention bias of a hidden key (finite, so fully hidden rows stay NaN-free)."""


def position_ids_from_mask(attention_mask):
    """Position of each token counted over real tokens only: left padding does
    not shift the positions of the text after it."""
    mask = ops.cast(attention_mask, "int32")
    return ops.maximum(ops.cumsum(mask, axis=1) - 1, 0)


def attention_bias(query_positions, key_mask):
    """Additive bias `[batch, 1, queries, keys]`: 0 where key j <= query slot and
    the key is real, `NEG_INF` elsewhere.

    Args:
        query_positions: int `[queries]`, the slot index of each query.
        key_mask: `[batch, keys]`, 1 for real (or already written) keys.
    """
    keys = ops.arange(ops.shape(key_mask)[1])
    causal = ops.expand_dims(query_positions, 1) >= ops.expand_dims(keys, 0)
    # expand_dims rather than [None] indexing: TFLite has no new-axis strided slice.
    visible = ops.logical_and(ops.expand_dims(causal, 0),
                              ops.expand_dims(ops.cast(key_mask, "bool"), 1))
    return ops.expand_dims(ops.where(visible, 0.0, NEG_INF), 1)


@keras.saving.register_keras_serializable(package="algpt2_tf")
class ALGPT2Backbone(keras.Model):
    """ALBERT-style GPT-2: a causal LM network with a factorized embedding,
    shared decoder blocks, a tied softmax and an optional SOP head, and its
    training loss. Use `ALGPT2LMHeadModel` (the task: this plus `generate`
    and `from_preset`) unless you need the network alone.

    `num_layer_groups` block objects exist; the forward pass applies them
    `num_layers` times (layer `i` runs block `config.block_of_layer(i)`), so
    the weight count of the blocks does not depend on `num_layers`. With
    `per_layer_norms` or `lora_rank`, each virtual layer also owns a small
    `LayerAdapter` (relaxed sharing).

    Call it with a dict `{"input_ids": int [batch, seq], "attention_mask":
    [batch, seq]}` (the mask is optional; 1 = real token, left or right
    padding) or with the ids alone. It returns `{"logits": float32 [batch,
    seq, vocab]}` plus `"sop_logits"` `[batch, 2]` with the SOP head.

    For `fit`, compile with an optimizer and no loss. Batches are dicts with
    `input_ids`, `attention_mask` and optionally `labels` (targets aligned
    with the logits, default: the inputs shifted by one; negative = ignored)
    and `sop_labels`.

    Args:
        config: an `ALGPT2Config` (or its dict form).

    Example:
    >>> model = ALGPT2Backbone(ALGPT2Config.from_preset("algpt2-tiny"))
    >>> tuple(model({"input_ids": np.array([[464, 3290]])})["logits"].shape)
    (1, 2, 50257)
    """

    def __init__(self, config, **kwargs):
        if isinstance(config, dict):
            config = ALGPT2Config.from_dict(config)
        kwargs.setdefault("name", "algpt2")
        super().__init__(**kwargs)
        self.config = config
        c = config
        output_init = c.initializer_range / (2 * c.num_layers) ** 0.5
        policy = self.dtype_policy
        self.embedding = FactorizedEmbedding(
            c.vocab_size, c.max_positions, c.hidden_size, c.embedding_size,
            dropout=c.embedding_dropout, initializer_range=c.initializer_range,
            projection_init=c.projection_init, name="embedding", dtype=policy)
        # ALBERT idea #2: one block object per group, reused by every layer of the group.
        self.blocks = [
            DecoderBlock(
                c.hidden_size, c.num_heads, c.intermediate_size,
                attention_dropout=c.attention_dropout, residual_dropout=c.residual_dropout,
                layer_norm_epsilon=c.layer_norm_epsilon, activation=c.activation,
                initializer_range=c.initializer_range, output_initializer_range=output_init,
                layer_norms=not c.per_layer_norms, name=f"block_{g}", dtype=policy)
            for g in range(c.num_layer_groups)
        ]
        self.lm_head = TiedLMHead(
            c.hidden_size, c.embedding_size, tie_projection=c.tie_projection,
            layer_norm_epsilon=c.layer_norm_epsilon, initializer_range=c.initializer_range,
            projection_init=c.projection_init, name="lm_head", dtype=policy)
        self.sop_head = SOPHead(c.hidden_size, c.initializer_range, name="sop_head",
                                dtype=policy) if c.sop_head else None
        # Relaxed sharing: what each virtual layer owns around its block (none by default).
        self.adapters = [
            LayerAdapter(c.hidden_size, c.intermediate_size, norms=c.per_layer_norms,
                         lora_rank=c.lora_rank, layer_norm_epsilon=c.layer_norm_epsilon,
                         initializer_range=c.initializer_range, name=f"layer_{i}", dtype=policy)
            for i in range(c.num_layers)
        ] if c.has_layer_adapters else []
        self.lm_loss_tracker = keras.metrics.Mean(name="lm_loss")
        self.perplexity_tracker = losses.Perplexity(name="perplexity")
        self.sop_loss_tracker = keras.metrics.Mean(name="sop_loss")
        self.sop_accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="sop_accuracy")
        self.distill_loss_tracker = keras.metrics.Mean(name="distill_loss")
        self.build()

    def build(self, input_shape=None):
        """Creates every weight up front (the shapes follow from the config alone)."""
        hidden_shape = (None, None, self.config.hidden_size)
        self.embedding.build()
        for block in self.blocks:
            block.build(hidden_shape)
        self.lm_head.build(hidden_shape)
        if self.sop_head is not None:
            self.sop_head.build(hidden_shape)
        for adapter in self.adapters:
            adapter.build(hidden_shape)
        self.built = True

    # ------------------------------------------------------------------ pieces
    def block_for_layer(self, layer_index):
        """The block object that virtual layer `layer_index` runs."""
        return self.blocks[self.config.block_of_layer(layer_index)]

    def run_layer(self, layer_index, hidden, bias, cache=None, cache_index=None, training=False,
                  plan=None):
        """Virtual layer `layer_index`: its block, with the layer's adapter if it has one."""
        adapter = self.adapters[layer_index] if self.adapters else None
        return self.block_for_layer(layer_index)(hidden, bias, cache=cache, cache_index=cache_index,
                                                 training=training, adapter=adapter, plan=plan)

    def _unpack_inputs(self, inputs):
        if isinstance(inputs, dict):
            if "input_ids" not in inputs:
                raise ValueError("The model's input dict needs an 'input_ids' entry.")
            input_ids = inputs["input_ids"]
            attention_mask = inputs.get("attention_mask")
        else:
            input_ids, attention_mask = inputs, None
        input_ids = ops.convert_to_tensor(input_ids)
        if len(input_ids.shape) != 2:
            raise ValueError(f"input_ids must have shape [batch, seq], got {tuple(input_ids.shape)}.")
        if not keras.backend.standardize_dtype(input_ids.dtype).startswith(("int", "uint")):
            raise ValueError(f"input_ids must be integers, got dtype {input_ids.dtype}.")
        input_ids = ops.cast(input_ids, "int32")
        if attention_mask is None:
            attention_mask = ops.ones_like(input_ids)
        attention_mask = ops.cast(attention_mask, "int32")
        return input_ids, attention_mask

    def _check_inputs(self, input_ids, attention_mask):
        """Rejects ids outside the vocabulary and sequences longer than `max_positions`."""
        c = self.config
        seq_len = input_ids.shape[1]
        if seq_len is not None and seq_len > c.max_positions:
            raise ValueError(
                f"Sequence length {seq_len} exceeds max_positions ({c.max_positions}).")
        if tuple(attention_mask.shape) != tuple(input_ids.shape) and None not in attention_mask.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match "
                             f"input_ids shape {tuple(input_ids.shape)}.")
        return backend.checked_inputs(input_ids, attention_mask, c.vocab_size, c.max_positions)

    def hidden_states(self, input_ids, attention_mask, training=False):
        """Embedding and the `num_layers` decoder applications; `[batch, seq, hidden]`."""
        hidden = self.embedding(input_ids, position_ids_from_mask(attention_mask), training=training)
        bias = attention_bias(ops.arange(ops.shape(input_ids)[1]), attention_mask)
        for i in range(self.config.num_layers):
            hidden, _ = self.run_layer(i, hidden, bias, training=training)
        return hidden

    def logits_from_hidden(self, hidden, normalized=False, plan=None):
        """The tied LM head applied to decoder output."""
        kernel = self.embedding.projection.float_kernel() if self.config.tie_projection else None
        return self.lm_head(hidden, self.embedding.token_embeddings,
                            input_projection_kernel=kernel, normalized=normalized,
                            token_scale=self.embedding.token_scale, plan=plan)

    def forward_with_cache(self, input_ids, position_ids, key_mask, caches, cache_index,
                           last_logits_only=False, plan=None):
        """One cached step (prefill or decode), for generation.

        Args:
            input_ids: int `[batch, T]`, written at cache slots
                `cache_index .. cache_index + T - 1`.
            position_ids: int `[batch, T]`, their positions.
            key_mask: `[batch, max_length]`, 1 for slots holding real tokens
                (the new ones included).
            caches: one `(keys, values)` pair of `[batch, heads, max_length,
                head_size]` tensors per virtual layer (the block is shared,
                the cache is not).
            cache_index: int scalar, the first slot written.
            last_logits_only: apply the LM head to the last position only
                (a prefill needs no more), giving logits `[batch, 1, vocab]`.
            plan: the decode loop's speed tricks for every `Linear` (a
                `decode_tricks.DecodePlan`: bit-identical products), or `None`.
                With `plan.host_writes` (the TFLite export) the caches are read
                only (`None` for a prefill), `key_mask` covers the cache's slots
                and then the T new tokens, `cache_index` is the cache's length,
                and the new `(keys, values)` of each layer are returned instead
                of the caches, for the runtime to write.
        Returns:
            `(logits [batch, T, vocab], new caches)`.
        """
        hidden = self.embedding(input_ids, position_ids, plan=plan)
        query_slots = cache_index + ops.arange(ops.shape(input_ids)[1])
        bias = attention_bias(query_slots, key_mask)
        new_caches = []
        for i in range(self.config.num_layers):
            hidden, cache = self.run_layer(i, hidden, bias, cache=caches[i],
                                           cache_index=cache_index, plan=plan)
            new_caches.append(cache)
        if last_logits_only and hidden.shape[1] != 1:  # a decode step's one position: no slice
            hidden = hidden[:, -1:]
        return self.logits_from_hidden(hidden, plan=plan), new_caches

    def empty_caches(self, batch_size, max_length, dtype="float32"):
        """Zero caches for `forward_with_cache`, one per virtual layer."""
        c = self.config
        shape = (batch_size, c.num_heads, max_length, c.head_size)
        return [(ops.zeros(shape, dtype), ops.zeros(shape, dtype)) for _ in range(c.num_layers)]

    def call(self, inputs, training=False):
        input_ids, attention_mask = self._unpack_inputs(inputs)
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask)
        hidden = self.hidden_states(input_ids, attention_mask, training=training)
        normalized = self.lm_head.normalize(hidden)
        outputs = {"logits": self.logits_from_hidden(normalized, normalized=True)}
        if self.sop_head is not None:
            outputs["sop_logits"] = self.sop_head(normalized, attention_mask)
        return outputs

    # ---------------------------------------------------------------- training
    _distillation = None

    def set_teacher(self, teacher, weight=1.0, temperature=1.0):
        """Trains against `teacher` too (see `training/distillation.py`); `None` stops it.

        The teacher is not one of this model's layers: its weights are not
        saved, checkpointed or trained with it.
        """
        # object.__setattr__: Keras would otherwise track the teacher as a sub-layer.
        object.__setattr__(self, "_distillation",
                           None if teacher is None else (teacher, float(weight), float(temperature)))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Next-token cross-entropy (masked) + `sop_loss_weight` x SOP cross-entropy
        (+ the distillation term with a teacher, see `set_teacher`).

        Also updates the `lm_loss`, `perplexity`, `sop_loss`, `sop_accuracy`
        and `distill_loss` metrics.
        """
        input_ids, attention_mask = self._unpack_inputs(x)
        labels = x.get("labels") if isinstance(x, dict) else None
        if labels is None and y is not None and not isinstance(y, dict):
            labels = y
        if labels is None:
            labels = losses.shifted_labels(input_ids, attention_mask)
        nll, weight = losses.token_nll(labels, y_pred["logits"])
        tokens = ops.sum(weight)
        lm_loss = ops.sum(nll) / ops.maximum(tokens, 1.0)
        self.lm_loss_tracker.update_state(lm_loss, sample_weight=tokens)
        self.perplexity_tracker.update_state(lm_loss, sample_weight=tokens)
        per_token = lm_loss  # the terms averaged over tokens, then those averaged over sequences
        per_sequence = 0.0
        if self._distillation is not None:
            teacher, distill_weight, temperature = self._distillation
            teacher_logits = ops.stop_gradient(teacher(
                {"input_ids": input_ids, "attention_mask": attention_mask})["logits"])
            distill = losses.kl_to_teacher(y_pred["logits"], teacher_logits, weight,
                                                 temperature)
            self.distill_loss_tracker.update_state(distill, sample_weight=tokens)
            per_token = per_token + distill_weight * distill
        sop_labels = x.get("sop_labels") if isinstance(x, dict) else None
        if sop_labels is not None:
            if "sop_logits" not in y_pred:
                raise ValueError("The batch has sop_labels but the config has sop_head=False.")
            sop_loss = ops.mean(keras.losses.sparse_categorical_crossentropy(
                sop_labels, y_pred["sop_logits"], from_logits=True))
            self.sop_loss_tracker.update_state(sop_loss)
            self.sop_accuracy_tracker.update_state(sop_labels, y_pred["sop_logits"])
            per_sequence = self.config.sop_loss_weight * sop_loss
        replicas = backend.replicas_in_sync()
        if replicas > 1:  # data parallel (distribute.py): this replica's share of the global loss
            all_tokens = backend.sum_over_replicas(tokens)
            per_token = per_token * tokens / ops.maximum(all_tokens, 1.0)
            per_sequence = per_sequence / replicas
        total = per_token + per_sequence
        return total + self._aggregate_additional_loss(self.losses) if self.losses else total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """The standard metrics; the SOP ones only for batches that carry
        `sop_labels`, `distill_loss` only with a teacher."""
        results = super().compute_metrics(x, y, y_pred, sample_weight)
        if not (isinstance(x, dict) and "sop_labels" in x):
            results.pop("sop_loss", None)
            results.pop("sop_accuracy", None)
        if self._distillation is None:
            results.pop("distill_loss", None)
        return results

    # ------------------------------------------------------------ quantization
    quantization = None
    """"int8" after `quantize("int8")` (saved with the model), else None."""

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Weight-only int8, through Keras' `Model.quantize` API.

        Every `Linear` (the shared block's kernels, the E -> hidden
        projection, the heads) gets an int8 kernel with one scale per output
        unit, and the token table becomes one int8 table with one scale per
        token that serves both the embedding lookup and the tied softmax.
        LayerNorms, biases and the position table stay float; activations
        are never quantized. The result saves to `.keras` and loads back
        quantized; it is for inference (its int8 weights do not train).

        Args:
            mode: "int8" (the only mode).
            config: an int8 `keras.quantizers.QuantizationConfig` is
                accepted, but its quantizers are not used: ALGPT2's int8 is
                always weight-only, abs-max, whole model.
            filters: not supported.

        Example:
        >>> model = ALGPT2Backbone(ALGPT2Config.from_preset("algpt2-tiny"))
        >>> model.quantize("int8")
        >>> str(model.embedding.token_embeddings.dtype), model.quantization
        ('int8', 'int8')
        """
        mode = mode or getattr(config, "mode", None)
        if mode != "int8" or filters is not None or kwargs:
            raise ValueError(f"ALGPT2 models support quantize('int8') (weight-only, whole model) "
                             f"only; got mode={mode!r}" + (" and filters." if filters else "."))
        if self.quantization is not None:
            raise ValueError(f"This model is already quantized ({self.quantization}).")
        for layer in self._flatten_layers():
            if isinstance(layer, Linear):
                layer.quantize("int8")
        self.embedding.quantize("int8")
        self.quantization = "int8"
        self.train_function = self.test_function = self.predict_function = None
        self._post_quantize(mode)

    # ------------------------------------------------------------ serialization
    def get_config(self):
        config = {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.saving.serialize_keras_object(self.dtype_policy),
            "config": self.config.to_dict(),
        }
        if self.quantization is not None:
            config["quantization"] = self.quantization
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        model_config = config.pop("config")
        quantization = config.pop("quantization", None)
        if "dtype" in config and isinstance(config["dtype"], dict):
            config["dtype"] = keras.saving.deserialize_keras_object(config["dtype"])
        model = cls(ALGPT2Config.from_dict(model_config), **config)
        if quantization is not None:
            model.quantize(quantization)  # the int8 weights load into the quantized layout
        return model
