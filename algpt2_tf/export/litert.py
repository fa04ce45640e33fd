"""Running an exported `.tflite` model with LiteRT's `CompiledModel` and XNNPACK's weight cache.

The 12 applications of ALGPT2's shared block are 12 `FULLY_CONNECTED` nodes
per layer kind over the same weight buffers. `ai_edge_litert`'s `Interpreter`
lets XNNPACK pack each node's weights separately, so the float32 `algpt2`
model holds 36 packed copies of its block (1.2 GB resident, and every layer
streams its own copy from memory). LiteRT's `CompiledModel` with an XNNPACK
weight cache file packs each weight buffer once, so the sharing survives
into the runtime (float32 `algpt2` in `make bench`: 212 MB peak instead of
1192 MB, 179.9 instead of 117.2 tokens/s).
"""

import ctypes
import functools
import hashlib
import os

import ai_edge_litert
import numpy as np
from ai_edge_litert.compiled_model import CompiledModel
from ai_edge_litert.cpu_options import CpuOptions
from ai_edge_litert.options import Options

from algpt2_tf.export.steps import Steps, is_cache
from algpt2_tf.runtime.files import cache_root


@functools.cache
def _litert_c_api():
    """LiteRT's C library from the `ai_edge_litert` wheel, for `LiteRtGetTensorBufferHostMemory`
    (the Python `TensorBuffer` only copies a whole buffer in or out)."""
    path = os.path.join(os.path.dirname(ai_edge_litert.__file__), "libLiteRt.so")
    try:
        library = ctypes.CDLL(path)
        host_memory = library.LiteRtGetTensorBufferHostMemory
    except (OSError, AttributeError) as error:
        raise RuntimeError(f"This ai_edge_litert build has no usable {path}: {error}") from error
    host_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    host_memory.restype = ctypes.c_int
    # Prototypes of our own: `ctypes.pythonapi`'s shared function objects are left as they are.
    capsule_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(
        ("PyCapsule_GetName", ctypes.pythonapi))
    capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi))
    return library, capsule_name, capsule_pointer


def host_view(buffer, shape):
    """A float32 NumPy array `shape` over a host-memory LiteRT `TensorBuffer`: what is written
    to it is what the model reads, with no copy. It does not keep `buffer` alive: the caller
    holds both. Raises `RuntimeError` when the buffer has no host memory, or when a value
    written through the array does not read back through the buffer (a LiteRT build whose C
    library does not match its Python one); `ValueError` when `shape` is larger than it."""
    count, held = int(np.prod(shape)), buffer.get_tensor_details()["shape"]
    if count > int(np.prod(held)):
        raise ValueError(f"A view of shape {tuple(shape)} is larger than the buffer {held}.")
    library, capsule_name, capsule_pointer = _litert_c_api()
    capsule = buffer.capsule
    address = ctypes.c_void_p()
    status = library.LiteRtGetTensorBufferHostMemory(
        capsule_pointer(capsule, capsule_name(capsule)), ctypes.byref(address))
    if status != 0 or not address.value:
        raise RuntimeError(f"This LiteRT tensor buffer has no host memory (status {status}).")
    view = np.ctypeslib.as_array((ctypes.c_float * count).from_address(address.value))
    kept = view[0]
    view[0] = probe = 2.0 if kept == 1.0 else 1.0
    read_back = buffer.read(1, np.float32)[0]
    view[0] = kept
    if read_back != probe:
        raise RuntimeError("A LiteRT tensor buffer's host memory does not read back through "
                           "the buffer: this ai_edge_litert build is not supported.")
    return view.reshape(shape)


def default_weight_cache(model_path):
    """`$ALGPT2_CACHE/xnnpack/<digest of the path, size and mtime>.cache`."""
    stat = os.stat(model_path)
    key = f"{os.path.abspath(model_path)}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return os.path.join(cache_root(), "xnnpack", f"{digest}.cache")


class LiteRTDecoder(Steps):
    """A model's `prefill_N`/`decode_N` steps through LiteRT's `CompiledModel` (`Steps`).

    Args:
        model_path: an exported `model.tflite`.
        weight_cache_path: XNNPACK's packed-weight cache file (created on
            first use); default `default_weight_cache(model_path)`.
        num_threads: CPU threads (default: all).
        prepare: make every cache length's caches and step buffers and run each
            decode step once now, as servers allocate their KV cache at start,
            instead of at the first request that reaches the length.
            Random-weight int8 builds of 256 slots, a 2-token warm-up then a 16-token
            prompt and 128 greedy tokens, fresh processes, 3 alternating rounds (AMD
            EPYC Zen 4, 2026-12-05), tokens/s without -> with: `algpt2` batch 1 559
            -> 606, 586 -> 647, 597 -> 663; `gpt2` batch 8 658 -> 724, 659 -> 705,
            651 -> 717. Loading takes 35 ms more (`algpt2`, batch 1).

    Example (exports a small random model first):
    >>> import tempfile
    >>> from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel
    >>> from algpt2_tf.export import export_model
    >>> model = ALGPT2LMHeadModel(ALGPT2Config(max_positions=64, hidden_size=32, num_layers=2,
    ...                                        num_heads=2, intermediate_size=64, embedding_size=16))
    >>> folder = tempfile.mkdtemp()
    >>> model.save(f"{folder}/m.keras")
    >>> report = export_model(f"{folder}/m.keras", "tflite", f"{folder}/lite", max_length=32,
    ...                       log=lambda *_: None)
    >>> decoder = LiteRTDecoder(report.path, weight_cache_path=f"{folder}/weights.cache")
    >>> decoder.greedy([464, 3290], steps=8) == model.generate(
    ...     [[464, 3290]], max_new_tokens=8, stop_ids=[]).new_ids[0]
    True
    """

    def __init__(self, model_path, weight_cache_path=None, num_threads=None, prepare=True):
        self.weight_cache_path = weight_cache_path or default_weight_cache(model_path)
        os.makedirs(os.path.dirname(self.weight_cache_path) or ".", exist_ok=True)
        options = Options(cpu_options=CpuOptions(
            num_threads=num_threads or os.cpu_count(),
            xnnpack_weight_cache_path=self.weight_cache_path))
        self.model = CompiledModel.from_file(model_path, options=options)
        self.signatures = self.model.get_signature_list()
        decode = next(name for name in self.signatures if name.startswith("decode_"))
        self._start(self.signatures, self.model.get_input_tensor_details(decode))
        self._decode_buffers = {}  # decode_N's buffer lists (fixed shapes): made once
        self._cache_buffers = {}  # (length, name): the buffer under each cache's view
        if prepare:
            for length in self.lengths:
                self._caches(length)
                self._run(f"decode_{length}", length, {
                    "input_id": np.zeros([self.batch, 1], np.int32),
                    "position": np.zeros([self.batch], np.int32)})  # its outputs are dropped

    def _new_cache(self, name, length):
        # One buffer per cache, an input of the decode steps of its length, written through
        # a NumPy view of its memory (`host_view`): a step copies nothing. Caches the steps
        # returned written by a DYNAMIC_UPDATE_SLICE copied every cache once per step (an
        # input and an output bound to one buffer did not make it in place).
        buffer = self.model.create_input_buffer_by_name(f"decode_{length}", name)
        self._cache_buffers[length, name] = buffer
        return host_view(buffer, self._cache_shape(name, length))

    def _buffers(self, signature, length):
        """What a run of `signature` (with the caches of `length`) needs, made once: its
        index, input and output buffer lists, its other inputs by name (written each run),
        the logits buffer with its shape and size, and a view of its new keys and values."""
        names = self.signatures[signature]
        inputs = [self._cache_buffers[length, name] if is_cache(name)
                  else self.model.create_input_buffer_by_name(signature, name)
                  for name in names["inputs"]]
        fed = {name: buffer for name, buffer in zip(names["inputs"], inputs)
               if not is_cache(name)}
        outputs = [self.model.create_output_buffer_by_name(signature, name)
                   for name in names["outputs"]]
        details = self.model.get_output_tensor_details(signature)
        shape = list(details["logits"]["shape"])
        logits = outputs[names["outputs"].index("logits")], shape, int(np.prod(shape))
        # Read where the step wrote it: `Steps._store` copies it into the caches at once.
        new = host_view(outputs[names["outputs"].index("new_keys_values")],
                        details["new_keys_values"]["shape"])
        return self.model.get_signature_index(signature), inputs, outputs, fed, logits, new

    def _run(self, signature, length, feeds):
        """Writes `feeds` into the step's input buffers and runs it (`Steps`)."""
        if length is None:  # the prefill: the prompt length varies, so resize, fresh buffers
            for name, value in feeds.items():
                self.model.resize_input_tensor_by_name(signature, name, value.shape)
            # Held until the next prefill: the `new_keys_values` returned is a view of one.
            self._prefill_buffers = step = self._buffers(signature, length)
        else:
            if signature not in self._decode_buffers:
                self._decode_buffers[signature] = self._buffers(signature, length)
            step = self._decode_buffers[signature]
        index, inputs, outputs, fed, (logits, shape, count), new = step
        for name, value in feeds.items():
            fed[name].write(value)
        self.model.run_by_index(index, inputs, outputs)
        return logits.read(count, np.float32).reshape(shape), new
