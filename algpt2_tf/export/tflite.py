"""TFLite export: `logits`, `prefill` and `decode` signatures with the KV cache held in the interpreter.

Token ids in, logits out (tf-text ops do not run in TFLite). Batch 1, cache
length `max_length`. The cache lives in resource variables inside the
interpreter, one per virtual layer, so a decode step moves one token id in
and one logits row out instead of copying the whole cache across the
boundary:

    prefill(input_ids [1, T], attention_mask [1, T]) -> logits [1, vocab]
        writes the prompt into slots 0..T-1 (right padding only) and returns
        the next-token logits of the last real token;
    decode(input_id [1, 1], position [1]) -> logits [1, vocab]
        writes the token at slot `position` and attends to slots <= position;
    logits(input_ids [1, T], attention_mask [1, T]) -> logits [1, T, vocab]
        a plain forward pass.
"""

import collections
import tempfile

import flatbuffers
import keras
import numpy as np
import tensorflow as tf
from ai_edge_litert import schema_py_generated as schema

from algpt2_tf.export.formats import QUANTIZATIONS
from algpt2_tf.generation.decode_tricks import DecodePlan, DecodeTricks
from algpt2_tf.model import position_ids_from_mask


class TFLiteModule(tf.Module):
    """The three signatures over one model; the cache is `tf.Variable`s."""

    def __init__(self, model, max_length):
        super().__init__()
        self.model = model
        self.max_length = max_length
        # The weights as plain variables that no signature assigns: the converter freezes
        # them into constants once, shared by the signatures (see `_frozen`).
        self.weights = [tf.Variable(keras.ops.convert_to_numpy(v), trainable=False,
                                    name=f"weight_{i}") for i, v in enumerate(model.variables)]
        c = model.config
        shape = (1, c.num_heads, max_length, c.head_size)
        self.caches = [(tf.Variable(tf.zeros(shape), trainable=False, name=f"keys_{i}"),
                        tf.Variable(tf.zeros(shape), trainable=False, name=f"values_{i}"))
                       for i in range(c.num_layers)]

        ids_spec = tf.TensorSpec([1, None], tf.int32, name="input_ids")
        mask_spec = tf.TensorSpec([1, None], tf.int32, name="attention_mask")
        # autograph=False: the signatures have no Python control flow on tensors to convert
        # (as in savedmodel.py, where it took a small model's export from 31.6 to 23.5 s).
        specs = [ids_spec, mask_spec]
        self.prefill = tf.function(self._prefill, autograph=False, input_signature=specs)
        self.logits = tf.function(self._logits, autograph=False, input_signature=specs)
        self.decode = tf.function(self._decode, autograph=False, input_signature=[
            tf.TensorSpec([1, 1], tf.int32, name="input_id"),
            tf.TensorSpec([1], tf.int32, name="position")])

    def _frozen(self):
        """The model reads its weights from `self.weights` while tracing.

        The Keras variables themselves reach the converter as variables it does not
        initialise (the outputs are NaN), and the weights as constants in each traced
        function made the conversion of GPT-2 124M peak past 23.5 GB (killed on a 24 GB
        machine; 1 layer: 15.6 GB). Plain variables that no signature assigns are frozen
        into constants by the converter once: GPT-2 124M int8 then peaks at 4.65 GB
        (AMD EPYC Zen 4, 2026-12-05), 1 layer float32 at 2.86 GB, with the same outputs.
        Only the cache stays a (mutable) variable."""
        return keras.StatelessScope(state_mapping=[
            (v, w.read_value()) for v, w in zip(self.model.variables, self.weights)])

    def _run(self, ids, positions, key_mask, index):
        caches = [(k.read_value(), v.read_value()) for k, v in self.caches]
        # The XLA loop's speed tricks off (XNNPACK runs the products); the new keys and values
        # go in with one DYNAMIC_UPDATE_SLICE per cache (`DecodePlan.write_slots`).
        plan = DecodePlan(self.model, DecodeTricks().off(), slice_writes=True)
        logits, caches = self.model.forward_with_cache(ids, positions, key_mask, caches, index,
                                                       plan=plan)
        for (k_var, v_var), (k, v) in zip(self.caches, caches):
            k_var.assign(k)
            v_var.assign(v)
        return logits

    def _prefill(self, input_ids, attention_mask):
        with self._frozen():
            return self._prefill_frozen(input_ids, attention_mask)

    def _prefill_frozen(self, input_ids, attention_mask):
        key_mask = tf.pad(attention_mask, [[0, 0], [0, self.max_length - tf.shape(input_ids)[1]]])
        logits = self._run(input_ids, position_ids_from_mask(attention_mask), key_mask, 0)
        last = tf.reduce_sum(attention_mask) - 1
        return {"logits": tf.gather(logits, last, axis=1)}

    def _decode(self, input_id, position):
        with self._frozen():
            return self._decode_frozen(input_id, position)

    def _decode_frozen(self, input_id, position):
        slots = tf.range(self.max_length)
        visible = tf.cast(tf.expand_dims(slots, 0) <= tf.expand_dims(position, 1), tf.int32)
        logits = self._run(input_id, tf.expand_dims(position, 1), visible, position[0])
        return {"logits": logits[:, 0]}

    def _logits(self, input_ids, attention_mask):
        with self._frozen():
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            return {"logits": self.model(inputs)["logits"]}


def convert(model, max_length, quantize="none"):
    """Returns the `.tflite` flatbuffer bytes."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {quantize!r}.")
    module = TFLiteModule(model, max_length)
    with tempfile.TemporaryDirectory() as tmp:
        tf.saved_model.save(module, tmp, signatures={
            "prefill": module.prefill.get_concrete_function(),
            "decode": module.decode.get_concrete_function(),
            "logits": module.logits.get_concrete_function()})
        converter = tf.lite.TFLiteConverter.from_saved_model(
            tmp, signature_keys=["prefill", "decode", "logits"])
        converter.experimental_enable_resource_variables = True
        if quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter._experimental_disable_per_channel = True
        if quantize == "fp16":
            converter.target_spec.supported_types = [tf.float16]
        return fill_zero_initializers(converter.convert())


def fill_zero_initializers(flatbuffer):
    """Replaces all-zero variable initial values by `FILL(shape, 0)` ops.

    The converter stores a resource variable's initial value as a constant
    buffer of the initializer subgraph (the one that `CALL_ONCE` runs before
    the first signature). The caches start as zeros, so that buffer is pure
    padding: 0.8 MB for the algpt2 preset at `max_length` 256. A `FILL` op
    computes the same zeros when the interpreter starts.

    Args:
        flatbuffer: `.tflite` bytes from the converter.
    Returns:
        The rewritten `.tflite` bytes (unchanged when nothing matched).
    """
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    signature_subgraphs = {s.subgraphIndex for s in model.signatureDefs or []}
    codes = [c.builtinCode for c in model.operatorCodes]
    references = collections.Counter(t.buffer for g in model.subgraphs for t in g.tensors)
    changed = False
    for index, subgraph in enumerate(model.subgraphs):
        if index in signature_subgraphs:
            continue
        assigned = {op.inputs[1] for op in subgraph.operators or []
                    if codes[op.opcodeIndex] == schema.BuiltinOperator.ASSIGN_VARIABLE}
        fills = []
        for tensor_index in sorted(assigned):
            tensor = subgraph.tensors[tensor_index]
            data = model.buffers[tensor.buffer].data
            if (tensor.type != schema.TensorType.FLOAT32 or data is None or len(data) < 1024
                    or np.any(np.asarray(data, np.uint8))):
                continue
            if references[tensor.buffer] == 1:  # the converter shares equal buffers
                model.buffers[tensor.buffer].data = None
            tensor.buffer = 0  # buffer 0 is the empty buffer: an ordinary tensor now
            inputs = []
            for value, kind in ((np.asarray(tensor.shape, np.int32), schema.TensorType.INT32),
                                (np.zeros((), np.float32), schema.TensorType.FLOAT32)):
                buffer = schema.BufferT()
                buffer.data = np.frombuffer(value.tobytes(), np.uint8)
                model.buffers.append(buffer)
                constant = schema.TensorT()
                constant.shape, constant.type = list(value.shape), kind
                constant.buffer = len(model.buffers) - 1
                subgraph.tensors.append(constant)
                inputs.append(len(subgraph.tensors) - 1)
            fills.append((inputs, tensor_index))
        if not fills:
            continue
        if schema.BuiltinOperator.FILL not in codes:
            code = schema.OperatorCodeT()
            code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.FILL
            code.version = 1
            model.operatorCodes.append(code)
            codes.append(schema.BuiltinOperator.FILL)
        for inputs, output in fills:
            op = schema.OperatorT()
            op.opcodeIndex = codes.index(schema.BuiltinOperator.FILL)
            op.inputs, op.outputs = inputs, [output]
            op.builtinOptionsType = schema.BuiltinOptions.FillOptions
            op.builtinOptions = schema.FillOptionsT()
            subgraph.operators.insert(0, op)
        changed = True
    if not changed:
        return flatbuffer
    builder = flatbuffers.Builder(len(flatbuffer))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
