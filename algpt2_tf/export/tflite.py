"""TFLite export: `logits`, and `prefill_N` / `decode_N` steps carrying the KV cache, per length N.

Token ids in, logits out (tf-text ops do not run in TFLite). `batch` rows
(1 by default). Like an ONNX export's `past_key_values`, the cache is an
input and an output of the steps: one `keys_NN` and one `values_NN` tensor
`[batch, heads, N, head_size]` per virtual layer, returned with the new
slots written. The steps come in each length N of
`generation.cache_lengths(max_length, first=32)` (32, 64, 128, ... up to `max_length`):

    prefill_N(input_ids [batch, T], attention_mask [batch, T], caches)
            -> logits [batch, vocab], caches
        writes the prompts, left-padded to a common length T <= N, into slots
        0..T-1 and returns the next-token logits of their last tokens;
    decode_N(input_id [batch, 1], position [batch], caches) -> logits [batch, vocab], caches
        `position` is each row's count of tokens so far; the new tokens go in at
        slot `max(position)` < N (the longest row has no padding) and each row
        attends to its own `position + 1` slots ending there (batch 1: slots
        0..position);
    logits(input_ids [batch, T], attention_mask [batch, T]) -> logits [batch, T, vocab]
        a plain forward pass.

Attention reads all N slots of the cache at every step, so a runtime starts
in the shortest cache that holds the prompt and moves the caches to the next
length when the slots run out (`steps.Steps`). Random-weight `algpt2` int8,
batch 1, AMD EPYC Zen 4 (2026-12-05), 2 rounds: decode steps at N = 32, 64,
128, 256: 718-774, 569-698, 480-530, 365-368 tokens/s.

Any runtime can pass the returned caches back in (`steps.InterpreterSteps`).
`litert.LiteRTDecoder` binds one buffer per cache as both the input and the
output, so nothing is copied: TFLite's `DYNAMIC_UPDATE_SLICE` writes the new
slots in place when its input and output share memory. Holding the caches in
resource variables instead (`READ_VARIABLE`/`ASSIGN_VARIABLE`) copied every
cache twice per step: 2 x 18.9 MB for `gpt2` at 256 slots; same CPU, int8 at
256 slots, 3 rounds: `algpt2` 218-236 -> 388-400 tokens/s, `gpt2` 144-150 ->
170-205, the same tokens. (A cache of dynamic length, resized by the runtime,
decoded 247 tokens/s at 256 slots against 367 for a fixed one.)
"""

import tempfile

import keras
import tensorflow as tf

from algpt2_tf.export.formats import QUANTIZATIONS
from algpt2_tf.export.steps import cache_names
from algpt2_tf.generation.decode_tricks import DecodePlan, DecodeTricks
from algpt2_tf.generation.generator import cache_lengths
from algpt2_tf.model import position_ids_from_mask


class TFLiteModule(tf.Module):
    """The steps and `logits` over one model: `self.functions`, by signature name."""

    def __init__(self, model, max_length, batch=1):
        super().__init__()
        self.model = model
        # The weights as plain variables that no signature assigns: the converter freezes
        # them into constants once, shared by the signatures (see `_frozen`).
        self.weights = [tf.Variable(keras.ops.convert_to_numpy(v), trainable=False,
                                    name=f"weight_{i}") for i, v in enumerate(model.variables)]
        c = model.config
        self.cache_names = cache_names(c.num_layers)
        ids_spec = tf.TensorSpec([batch, None], tf.int32, name="input_ids")
        mask_spec = tf.TensorSpec([batch, None], tf.int32, name="attention_mask")
        step_specs = [tf.TensorSpec([batch, 1], tf.int32, name="input_id"),
                      tf.TensorSpec([batch], tf.int32, name="position")]
        # autograph=False: the signatures have no Python control flow on tensors to convert
        # (as in savedmodel.py, where it took a small model's export from 31.6 to 23.5 s).
        self.functions = {"logits": tf.function(self._logits, autograph=False,
                                                input_signature=[ids_spec, mask_spec])}
        for length in cache_lengths(max_length, first=32):
            caches = [tf.TensorSpec([batch, c.num_heads, length, c.head_size], tf.float32,
                                    name=name) for name in self.cache_names]
            self.functions[f"prefill_{length}"] = tf.function(
                self._prefill, autograph=False, input_signature=[ids_spec, mask_spec] + caches)
            self.functions[f"decode_{length}"] = tf.function(
                self._decode, autograph=False, input_signature=step_specs + caches)

    def _frozen(self):
        """The model reads its weights from `self.weights` while tracing.

        The Keras variables themselves reach the converter as variables it does not
        initialise (the outputs are NaN), and the weights as constants in each traced
        function made the conversion of GPT-2 124M peak past 23.5 GB (killed on a 24 GB
        machine; 1 layer: 15.6 GB). Plain variables that no signature assigns are frozen
        into constants by the converter once: GPT-2 124M int8 then peaks at 4.65 GB
        (AMD EPYC Zen 4, 2026-12-05), 1 layer float32 at 2.86 GB, with the same outputs."""
        return keras.StatelessScope(state_mapping=[
            (v, w.read_value()) for v, w in zip(self.model.variables, self.weights)])

    def _run(self, ids, positions, key_mask, index, caches):
        """`{"logits": the last position's logits, name: cache}` after writing `ids`' keys
        and values at slot `index` of `caches` (`keys_00, values_00, keys_01, ...`)."""
        pairs = list(zip(caches[::2], caches[1::2]))
        # The XLA loop's speed tricks off (XNNPACK runs the products); the new keys and values
        # go in with one DYNAMIC_UPDATE_SLICE per cache (`DecodePlan.write_slots`).
        plan = DecodePlan(self.model, DecodeTricks().off(), slice_writes=True)
        with self._frozen():
            logits, pairs = self.model.forward_with_cache(ids, positions, key_mask, pairs, index,
                                                          last_logits_only=True, plan=plan)
        outputs = dict(zip(self.cache_names, [cache for pair in pairs for cache in pair]))
        outputs["logits"] = logits[:, -1]
        return outputs

    def _prefill(self, input_ids, attention_mask, *caches):
        length = caches[0].shape[2]
        key_mask = tf.pad(attention_mask, [[0, 0], [0, length - tf.shape(input_ids)[1]]])
        return self._run(input_ids, position_ids_from_mask(attention_mask), key_mask, 0, caches)

    def _decode(self, input_id, position, *caches):
        slot = tf.reduce_max(position)
        slots = tf.range(caches[0].shape[2])[tf.newaxis]
        first = slot - position[:, tf.newaxis]  # each row's first real slot
        visible = tf.cast((slots >= first) & (slots <= slot), tf.int32)
        return self._run(input_id, position[:, tf.newaxis], visible, slot, caches)

    def _logits(self, input_ids, attention_mask):
        with self._frozen():
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            return {"logits": self.model(inputs)["logits"]}


def convert(model, max_length, quantize="none", batch=1):
    """Returns the `.tflite` flatbuffer bytes of `TFLiteModule(model, max_length, batch)`."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {quantize!r}.")
    module = TFLiteModule(model, max_length, batch)
    signatures = {name: f.get_concrete_function() for name, f in module.functions.items()}
    with tempfile.TemporaryDirectory() as tmp:
        tf.saved_model.save(module, tmp, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(signatures))
        converter.experimental_enable_resource_variables = True
        if quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter._experimental_disable_per_channel = True
        if quantize == "fp16":
            converter.target_spec.supported_types = [tf.float16]
        return converter.convert()
