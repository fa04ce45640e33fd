"""Weight-only int4 for a float32 `.tflite` model: the matrix products read half int8's bytes.

A decode step of a small model is bound by reading its weights: `algpt2`'s one
block (7 M parameters) is read 12 times per token, about 85 MB in int8, from
the L3 cache. `quantize_weights` rewrites a float32 flatbuffer so that

- every `FULLY_CONNECTED` weight is INT4, two values a byte, symmetric, one
  scale per block of `block_size` inputs of an output row (a float16 scales
  tensor beside it), or one scale per output row with `block_size=None`
  (XNNPACK runs both with the activations quantized to int8 on the fly, as it
  runs int8 weights);
- every `GATHER` table (the token and position embeddings) is INT8 with one
  scale, followed by a `DEQUANTIZE` of the gathered rows (as TFLite's own int8
  conversion stores them);
- a float32 buffer shared by several tensors (the shared block's weights in every
  layer and signature) becomes one quantized buffer, still shared.

The tied output embedding is both a `GATHER` table and a `FULLY_CONNECTED`
weight: it is stored twice, as an int8 table and an int4 matrix.

What it buys and costs (`benchmarks/README.md`, Zen 4, 2026-12-06 runs of 5 and 7 rounds):
`algpt2` decodes 1.16-1.25x and `gpt2` 1.74-2.02x int8's tokens/s at batch 1, and the
shipped `algpt2-pd-books` loses about 10% of held-out perplexity (int8: 0.4%), so int4 is
a speed option, not a default.

Example:
>>> import numpy as np
>>> packed = pack_int4(np.array([[1, -2, 7, -7]], np.int8))
>>> [hex(b) for b in packed]
['0xe1', '0x97']
"""

import copy

import numpy as np
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils


def pack_int4(values):
    """Packs int values in [-8, 7] two per byte, the first of each pair in the low nibble
    (TFLite's INT4 layout); an odd count gets a zero nibble at the end."""
    flat = np.asarray(values, np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nibbles = flat.view(np.uint8) & 0x0F
    return nibbles[0::2] | (nibbles[1::2] << 4)


def quantize_rows(weights, bits, block_size=None):
    """Symmetric quantization of a `[rows, columns]` matrix with one scale per row, or per
    block of `block_size` columns of a row: `(values in [-(2**(bits-1) - 1),
    2**(bits-1) - 1], scales [rows] or [rows, columns / block_size])`."""
    rows, columns = weights.shape
    block = block_size or columns
    if columns % block:
        raise ValueError(f"{columns} columns do not split into blocks of {block}.")
    blocks = weights.reshape(rows, columns // block, block)
    top = 2 ** (bits - 1) - 1
    scales = np.maximum(np.abs(blocks).max(axis=2), np.finfo(np.float16).tiny) / top
    if block_size:
        scales = scales.astype(np.float16).astype(np.float32)  # stored as float16
    values = np.clip(np.round(blocks / scales[:, :, None]), -top, top).astype(np.int8)
    scales = scales if block_size else scales[:, 0]
    return values.reshape(rows, columns), scales.astype(np.float32)


def _builtin(code):
    """The builtin operator of an `OperatorCode` (older files keep it in the deprecated
    field)."""
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def _quantization(scales, dimension=0):
    params = schema.QuantizationParametersT()
    params.scale = [float(s) for s in scales]
    params.zeroPoint = [0] * len(params.scale)
    params.quantizedDimension = dimension
    return params


class _Rewriter:
    """One pass over a model object (`flatbuffer_utils.read_model_from_bytearray`)."""

    def __init__(self, model, block_size):
        self.model = model
        self.block_size = block_size
        # (float buffer, "int4" | "int8" | "scales") -> (quantized buffer, scales)
        self.buffers = {}
        self.dequantize = None

    def _float_constant(self, graph, index):
        tensor = graph.tensors[index]
        data = self.model.buffers[tensor.buffer].data if tensor.buffer else None
        return tensor.type == schema.TensorType.FLOAT32 and data is not None and len(data) > 0

    def _quantized_buffer(self, tensor, kind):
        """The int4 matrix (`kind` "int4") or int8 table ("int8") of a float tensor's buffer,
        made once per buffer."""
        key = (tensor.buffer, kind)
        if key not in self.buffers:
            raw = self.model.buffers[tensor.buffer].data
            weights = np.frombuffer(bytes(raw), np.float32).reshape(tensor.shape)
            buffer = schema.BufferT()
            if kind == "int4":
                block = self.block_size if weights.shape[1] % (self.block_size or 1) == 0 else None
                values, scales = quantize_rows(weights, 4, block)
                buffer.data = pack_int4(values)
            else:  # one scale for the table: a gathered row keeps it
                values, scales = quantize_rows(weights.reshape(1, -1), 8)
                buffer.data = values.view(np.uint8).reshape(-1)
            self.model.buffers.append(buffer)
            self.buffers[key] = (len(self.model.buffers) - 1, scales)
        return self.buffers[key]

    def _quantized_tensor(self, graph, index, kind):
        tensor = copy.deepcopy(graph.tensors[index])
        tensor.buffer, scales = self._quantized_buffer(graph.tensors[index], kind)
        tensor.type = schema.TensorType.INT4 if kind == "int4" else schema.TensorType.INT8
        if scales.ndim == 2:  # blocks: the scales are a float16 tensor of the graph
            tensor.quantization = self._blockwise(graph, tensor, scales)
        else:
            tensor.quantization = _quantization(scales)
        tensor.name = (tensor.name or b"") + f"/{kind}".encode()
        graph.tensors.append(tensor)
        return len(graph.tensors) - 1

    def _blockwise(self, graph, tensor, scales):
        key = (tensor.buffer, "scales")
        if key not in self.buffers:
            buffer = schema.BufferT()
            buffer.data = scales.astype(np.float16).view(np.uint8).reshape(-1)
            self.model.buffers.append(buffer)
            self.buffers[key] = (len(self.model.buffers) - 1, None)
        table = schema.TensorT()
        table.shape, table.type = list(scales.shape), schema.TensorType.FLOAT16
        table.buffer, table.name = self.buffers[key][0], (tensor.name or b"") + b"/scales"
        graph.tensors.append(table)
        details = schema.BlockwiseQuantizationT()
        details.scales, details.zeroPoints = len(graph.tensors) - 1, -1
        details.blockSize = tensor.shape[1] // scales.shape[1]
        params = schema.QuantizationParametersT()
        params.detailsType = schema.QuantizationDetails.BlockwiseQuantization
        params.details = details
        return params

    def _dequantize_code(self):
        if self.dequantize is None:
            for i, code in enumerate(self.model.operatorCodes):
                if _builtin(code) == schema.BuiltinOperator.DEQUANTIZE:
                    self.dequantize = i
            if self.dequantize is None:
                code = schema.OperatorCodeT()
                code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.DEQUANTIZE
                code.version = 1
                self.model.operatorCodes.append(code)
                self.dequantize = len(self.model.operatorCodes) - 1
        return self.dequantize

    def graph(self, graph):
        # (float buffer, shape, kind) -> quantized tensor, in this graph: the layers that share
        # a weight read one tensor (its scales are stored once, not once per layer).
        made = {}
        operators = []
        for op in graph.operators:
            operators.append(op)
            kind = {schema.BuiltinOperator.FULLY_CONNECTED: "int4",
                    schema.BuiltinOperator.GATHER: "int8"}.get(
                        _builtin(self.model.operatorCodes[op.opcodeIndex]))
            weight = op.inputs[1] if kind == "int4" else op.inputs[0]
            if kind is None or not self._float_constant(graph, weight):
                continue
            key = (graph.tensors[weight].buffer, tuple(graph.tensors[weight].shape), kind)
            if key not in made:
                made[key] = self._quantized_tensor(graph, weight, kind)
            if kind == "int4":
                op.inputs[1] = made[key]
                continue
            op.inputs[0] = made[key]
            # The gather now yields int8 rows; a DEQUANTIZE gives the float tensor back.
            rows = copy.deepcopy(graph.tensors[op.outputs[0]])
            rows.type = schema.TensorType.INT8
            rows.quantization = copy.deepcopy(graph.tensors[op.inputs[0]].quantization)
            rows.name = (rows.name or b"") + b"/int8"
            graph.tensors.append(rows)
            dequantize = schema.OperatorT()
            dequantize.opcodeIndex = self._dequantize_code()
            dequantize.inputs, dequantize.outputs = [len(graph.tensors) - 1], [op.outputs[0]]
            op.outputs = [len(graph.tensors) - 1]
            operators.append(dequantize)
        graph.operators = operators

    def drop_unused_buffers(self):
        """Empties the buffers no operator reads any more (the float weights)."""
        used = set()
        for graph in self.model.subgraphs:
            tensors = {*graph.inputs, *graph.outputs}
            for op in graph.operators:
                tensors.update(op.inputs)
                tensors.update(op.outputs)
            tensors.discard(-1)
            for i in list(tensors):  # a block-wise weight's scales are read through it
                details = getattr(graph.tensors[i].quantization, "details", None)
                if isinstance(details, schema.BlockwiseQuantizationT):
                    tensors.add(details.scales)
            used.update(graph.tensors[i].buffer for i in tensors)
        for i, buffer in enumerate(self.model.buffers):
            if i and i not in used:
                buffer.data = None


def quantize_weights(flatbuffer, block_size=None):
    """Returns `flatbuffer` (a float32 `.tflite` model's bytes) with int4 matrix weights
    and int8 embedding tables (module docstring).

    Args:
        flatbuffer: the float32 model.
        block_size: inputs per scale of a matrix row (a multiple of 32; a matrix whose
            rows do not split into such blocks gets one scale per row), or None (the
            default, what `--quantize int4` builds): one scale per row for every matrix.
            `algpt2-pd-books` (LiteRT, held-out books, token perplexity against float32's
            83.07): one scale per row 92.02 (+10.8%), blocks of 128 92.11, of 64 92.24, of
            32 89.49 (+7.7%); `algpt2` batch 1 decodes at the same speed within this
            machine's noise for all four (Zen 4, 3 alternating rounds: 379-428, 386-460,
            326-464, 416-485 tokens/s; int8 289-410).
    """
    if block_size is not None and (block_size < 32 or block_size % 32):
        raise ValueError(f"block_size must be a multiple of 32 or None, got {block_size}.")
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    rewriter = _Rewriter(model, block_size)
    for graph in model.subgraphs:
        rewriter.graph(graph)
    rewriter.drop_unused_buffers()
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))
