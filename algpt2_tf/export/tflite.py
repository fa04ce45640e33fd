"""TFLite export: `logits`, `prefill` and `decode` signatures with the KV cache held in the interpreter.

Token ids in, logits out (tf-text ops do not run in TFLite). Batch 1, cache
length `max_length`. The cache lives in resource variables inside the
interpreter (keys and values of all virtual layers), so a decode step moves
one token id in and one logits row out instead of copying the whole cache
across the boundary, and the shared block runs as a WHILE loop over layers so
that its weights exist once in the interpreter:

    prefill(input_ids [1, T], attention_mask [1, T]) -> logits [1, vocab]
        writes the prompt into slots 0..T-1 (right padding only) and returns
        the next-token logits of the last real token;
    decode(input_id [1, 1], position [1]) -> logits [1, vocab]
        writes the token at slot `position` and attends to slots <= position;
    logits(input_ids [1, T], attention_mask [1, T]) -> logits [1, T, vocab]
        a plain forward pass.
"""

import collections
import os
import tempfile

import flatbuffers
import keras
import numpy as np
import tensorflow as tf
from ai_edge_litert import schema_py_generated as schema

from algpt2_tf.layers.attention import write_slots
from algpt2_tf.model import attention_bias, position_ids_from_mask

QUANTIZATIONS = ("none", "fp16", "int8")


class TFLiteModule(tf.Module):
    """The three signatures over one model; the cache is two `tf.Variable`s,
    keys and values of all virtual layers stacked: `[layers, heads,
    max_length, head_size]` (batch 1)."""

    def __init__(self, model, max_length):
        super().__init__()
        self.model = model
        self.max_length = max_length
        self._values = [keras.ops.convert_to_numpy(v) for v in model.variables]
        c = model.config
        shape = (c.num_layers, c.num_heads, max_length, c.head_size)
        self.keys = tf.Variable(tf.zeros(shape), trainable=False, name="keys")
        self.values = tf.Variable(tf.zeros(shape), trainable=False, name="values")

        ids_spec = tf.TensorSpec([1, None], tf.int32, name="input_ids")
        mask_spec = tf.TensorSpec([1, None], tf.int32, name="attention_mask")
        self.prefill = tf.function(self._prefill, input_signature=[ids_spec, mask_spec])
        self.logits = tf.function(self._logits, input_signature=[ids_spec, mask_spec])
        self.decode = tf.function(self._decode, input_signature=[
            tf.TensorSpec([1, 1], tf.int32, name="input_id"),
            tf.TensorSpec([1], tf.int32, name="position")])

    def _frozen(self):
        """Model weights read as constants while tracing: the converter then
        embeds them, and only the cache stays a (mutable) variable. Without
        this, TFLite treats the weights as uninitialised variables (NaN)."""
        return keras.StatelessScope(state_mapping=[
            (v, tf.constant(value)) for v, value in zip(self.model.variables, self._values)])

    def _layers(self, hidden, bias, caches=None, index=0):
        """The virtual layers as one WHILE loop per layer group.

        Why a graph loop and not `model.forward_with_cache`'s Python loop:
        TFLite's XNNPACK packs the weights of every FULLY_CONNECTED node
        separately, so 12 unrolled applications of the shared block became
        12 packed copies per signature (1.1 GB resident for algpt2, and each
        layer streamed its own copy from memory). In a loop body the shared
        weights belong to one node.

        Args:
            hidden: `[1, T, hidden]` embedded inputs.
            bias: the attention bias for them.
            caches: `None`, or stacked `(keys, values)` `[layers, heads,
                slots, head_size]` whose slots `index .. index + T - 1` the
                new tokens take.
            index: the first slot written.
        Returns:
            `(hidden, new_keys, new_values)`: the new rows `[layers, heads, T,
            head_size]` (zeros without caches).
        """
        c = self.model.config
        count = tf.shape(hidden)[1]
        rows = tf.zeros([c.num_layers, c.num_heads, count, c.head_size])
        state = (hidden, rows, rows)
        for group, block in enumerate(self.model.blocks):
            def body(i, hidden, new_keys, new_values, block=block):
                if caches is None:
                    return i + 1, block(hidden, bias)[0], new_keys, new_values
                cache = (tf.gather(caches[0], i)[None], tf.gather(caches[1], i)[None])
                hidden, (keys, values) = block(hidden, bias, cache=cache, cache_index=index)
                written = [tf.slice(t, [0, 0, index, 0], [1, -1, count, -1]) for t in (keys, values)]
                return (i + 1, hidden, tf.tensor_scatter_nd_update(new_keys, [[i]], written[0]),
                        tf.tensor_scatter_nd_update(new_values, [[i]], written[1]))

            stop = (group + 1) * c.layers_per_group
            _, *state = tf.while_loop(lambda i, *_: i < stop, body,
                                      (tf.constant(group * c.layers_per_group), *state))
        return state

    def _cached_logits(self, ids, positions, key_mask, index, caches):
        """Logits of `ids` written at slot `index`; stores the updated cache.

        `caches` are the stacked caches; only their first `key_mask.shape[1]`
        slots enter the layer loop (TFLite's WHILE copies its loop
        variables on every iteration, so a decode step passes the slots up to
        its position, not all `max_length`).
        """
        hidden = self.model.embedding(ids, positions)
        bias = attention_bias(index + tf.range(tf.shape(ids)[1]), key_mask)
        window = [t[:, :, :tf.shape(key_mask)[1]] for t in caches]
        hidden, new_keys, new_values = self._layers(hidden, bias, window, index)
        self.keys.assign(write_slots(caches[0], new_keys, index))
        self.values.assign(write_slots(caches[1], new_values, index))
        return self.model.logits_from_hidden(hidden)

    def _prefill(self, input_ids, attention_mask):
        with self._frozen():
            return self._prefill_frozen(input_ids, attention_mask)

    def _prefill_frozen(self, input_ids, attention_mask):
        key_mask = tf.pad(attention_mask, [[0, 0], [0, self.max_length - tf.shape(input_ids)[1]]])
        # Zeros of a run-time shape: constant zeros would be stored in the file.
        empty = tf.zeros(tf.concat([tf.shape(self.keys)[:2], tf.shape(key_mask)[1:],
                                    tf.shape(self.keys)[3:]], axis=0))
        logits = self._cached_logits(input_ids, position_ids_from_mask(attention_mask), key_mask,
                                     0, (empty, empty))
        last = tf.reduce_sum(attention_mask) - 1
        return {"logits": tf.gather(logits, last, axis=1)}

    def _decode(self, input_id, position):
        with self._frozen():
            return self._decode_frozen(input_id, position)

    def _decode_frozen(self, input_id, position):
        visible = tf.ones([1, position[0] + 1], tf.int32)  # slots 0..position
        logits = self._cached_logits(input_id, tf.expand_dims(position, 1), visible, position[0],
                                     (self.keys.read_value(), self.values.read_value()))
        return {"logits": logits[:, 0]}

    def _logits(self, input_ids, attention_mask):
        with self._frozen():
            hidden = self.model.embedding(input_ids, position_ids_from_mask(attention_mask))
            bias = attention_bias(tf.range(tf.shape(input_ids)[1]), attention_mask)
            hidden, _, _ = self._layers(hidden, bias)
            return {"logits": self.model.logits_from_hidden(hidden)}


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
