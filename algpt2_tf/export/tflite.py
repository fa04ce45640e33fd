"""TFLite export: `logits`, and `prefill_N` / `decode_N` steps over a KV cache, per length N.

Token ids in, logits out (tf-text ops do not run in TFLite). `batch` rows
(1 by default). Like an ONNX export's `past_key_values`, the cache is an
input of the decode steps, one `keys_NN` and one `values_NN` tensor `[batch,
heads, N, head_size]` per virtual layer, but the steps only read it: they
return the new keys and values (`new_keys_values`, `[2 * layers, batch,
heads, T, head_size]` in `keys_00, values_00, keys_01, ...` order) and the
runtime writes them into its cache. The steps come in each length N of
`generation.cache_lengths(max_length, first=32)` (32, 64, 128, ... up to `max_length`):

    prefill_N(input_ids [batch, T], attention_mask [batch, T])
            -> logits [batch, vocab], new_keys_values (T = N: zeros past the prompt)
        the prompts, left-padded to a common length T <= N, for slots 0..T-1,
        and the next-token logits of their last tokens;
    decode_N(input_id [batch, 1], position [batch], caches)
            -> logits [batch, vocab], new_keys_values (T = 1)
        `position` is each row's count of tokens so far; the new tokens go in at
        slot `max(position)` < N (the longest row has no padding) and each row
        attends to its own `position` slots before it (batch 1: slots
        0..position - 1) and to the new token;
    logits(input_ids [batch, T], attention_mask [batch, T]) -> logits [batch, T, vocab]
        a plain forward pass.

Attention reads all N slots of the cache at every step, so a runtime starts
in the shortest cache that holds the prompt and moves the caches to the next
length when the slots run out (`steps.Steps`). Random-weight `algpt2` int8,
batch 1, AMD EPYC Zen 4 (2026-12-05), 2 rounds, when the steps still wrote
their caches: decode steps at N = 32, 64, 128, 256: 718-774, 569-698,
480-530, 365-368 tokens/s.

Why the runtime writes the cache: steps that returned their caches with the
new slots written (one `DYNAMIC_UPDATE_SLICE` each) copied every cache once
per step in LiteRT, even with the input and the output bound to one buffer
(24 such writes of 256-slot caches alone: 0.9 ms a step, the same with
separate buffers); held in resource variables they were copied twice.
`litert.LiteRTDecoder` writes the new slots through NumPy views of the
buffers the steps read, so a step copies nothing; `steps.InterpreterSteps`
passes NumPy caches in. Random-weight int8 builds of 256 slots, a 16-token
prompt and 128 greedy tokens, fresh processes, 3 alternating rounds (AMD
EPYC Zen 4, 2026-12-05), tokens/s with the copies -> without, round by
round: `algpt2` batch 1 410 -> 538, 406 -> 513, 335 -> 384; `gpt2` batch 8
500 -> 646, 448 -> 502, 360 -> 605; `gpt2` batch 1 179 -> 187, 164 -> 163,
166 -> 177. A decode step of `algpt2` batch 1 went from about 1.2 ms + 8.5 us
per cache slot to 1.27 ms at 32 slots and 1.93 ms at 256 (3 us a slot).
"""

import functools
import tempfile

import keras
import tensorflow as tf

from algpt2_tf.export import int4
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
                functools.partial(self._prefill, length=length), autograph=False,
                input_signature=[ids_spec, mask_spec])
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

    def _run(self, ids, positions, key_mask, index, pairs):
        """`{"logits": the last position's logits, "new_keys_values": ...}`: the keys and
        values of `ids` at every layer, stacked in `cache_names` order, for the runtime to
        write into its caches. `pairs`: each layer's read-only `(keys, values)` cache, or
        `None` (a prefill)."""
        # The XLA loop's speed tricks off (XNNPACK runs the products); the attention reads
        # the caches and returns the new keys and values (`DecodePlan.host_writes`).
        plan = DecodePlan(self.model, DecodeTricks().off(), host_writes=True)
        with self._frozen():
            logits, new = self.model.forward_with_cache(ids, positions, key_mask, pairs, index,
                                                        last_logits_only=True, plan=plan)
        # `squeeze`, not `[:, -1]`: that slice was a STRIDED_SLICE over the vocabulary in
        # TFLite's reference kernel, outside XNNPACK: 16% of a one-thread `algpt2` int4
        # decode step at 32 slots (`perf`). Without it (and the model's slice of a decode
        # step's one position), random-weight `algpt2` int4 batch 1, 256 slots: the step at
        # 32 slots 0.86 -> 0.60 ms; a 16-token prompt and 128 greedy tokens 405 -> 551
        # tokens/s (medians of 5 alternating rounds, AMD EPYC Zen 4, 2026-12-06).
        return {"logits": tf.squeeze(logits, axis=1),
                "new_keys_values": tf.stack([tensor for pair in new for tensor in pair])}

    def _prefill(self, input_ids, attention_mask, length):
        outputs = self._run(input_ids, position_ids_from_mask(attention_mask), attention_mask, 0,
                            [None] * self.model.config.num_layers)
        # Padded to the cache's `length` slots: an output's size must not depend on the
        # prompt's (LiteRT sizes output buffers before the run).
        new = outputs["new_keys_values"]
        shape = [*new.shape[:3], length, *new.shape[4:]]
        outputs["new_keys_values"] = tf.reshape(
            tf.pad(new, [[0, 0], [0, 0], [0, 0], [0, length - tf.shape(new)[3]], [0, 0]]), shape)
        return outputs

    def _decode(self, input_id, position, *caches):
        length = caches[0].shape[2]
        slot = tf.reduce_max(position)
        slots = tf.range(length)[tf.newaxis]
        first = slot - position[:, tf.newaxis]  # each row's first real slot
        cached = tf.cast((slots >= first) & (slots < slot), tf.int32)
        # The key mask covers the cache's slots, then the new token (index `length`).
        key_mask = tf.concat([cached, tf.ones_like(cached[:, :1])], axis=1)
        pairs = list(zip(caches[::2], caches[1::2]))
        return self._run(input_id, position[:, tf.newaxis], key_mask, length, pairs)

    def _logits(self, input_ids, attention_mask):
        with self._frozen():
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            return {"logits": self.model(inputs)["logits"]}


def convert(model, max_length, quantize="none", batch=1):
    """Returns the `.tflite` flatbuffer bytes of `TFLiteModule(model, max_length, batch)`."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {quantize!r}.")
    module = TFLiteModule(model, max_length, batch)
    # The functions themselves, traced once inside the save (as `savedmodel.save`): a tiny
    # model's conversion took 9.7 s with each signature traced twice, 4.6 s (Zen 4, 2026-12-06).
    signatures = dict(module.functions)
    with tempfile.TemporaryDirectory() as tmp:
        tf.saved_model.save(module, tmp, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(signatures))
        converter.experimental_enable_resource_variables = True
        if quantize in ("fp16", "int8"):
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter._experimental_disable_per_channel = True
        if quantize == "fp16":
            converter.target_spec.supported_types = [tf.float16]
        flatbuffer = converter.convert()
    # int4: the float32 model's weights rewritten (TFLite's converter makes no int4 weights).
    return int4.quantize_weights(flatbuffer) if quantize == "int4" else flatbuffer
