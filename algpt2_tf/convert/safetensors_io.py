"""Reading and writing `.safetensors` files as NumPy arrays (never a pickle).

`safetensors.numpy` cannot hand out bfloat16 tensors (NumPy has no such
type), and Hugging Face checkpoints are often stored in it, so the reader
here parses the format itself: an 8-byte little-endian header length, a JSON
header `{name: {dtype, shape, data_offsets}}`, then the raw bytes. bfloat16
comes from `ml_dtypes` (a TensorFlow dependency). A sharded checkpoint
(`model.safetensors.index.json` + its shards) reads as one dict.
"""

import json
import os
import struct

import numpy as np

_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
           "BOOL": "bool"}
_MAX_HEADER = 100 * 1024 * 1024

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _numpy_dtype(name, path):
    if name not in _DTYPES:
        raise ValueError(f"{path}: unsupported safetensors dtype {name!r}.")
    if name == "BF16":
        import ml_dtypes  # deferred: imports ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_DTYPES[name])


def read_file(path):
    """`{name: np.ndarray}` of one `.safetensors` file (bfloat16 included).

    Raises:
        ValueError: the file is not a valid safetensors file (the message
            names the file and what is wrong).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its header).")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path} is not a safetensors file (bad header length).")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path} is not a safetensors file (unreadable header).") from None
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        tensors = {}
        if not header:
            return tensors
        for name, entry in header.items():
            dtype = _numpy_dtype(entry.get("dtype"), path)
            shape = tuple(entry.get("shape", ()))
            begin, end = entry.get("data_offsets", (0, -1))
            count = int(np.prod(shape, dtype=np.int64))
            if end - begin != count * dtype.itemsize or data_start + end > size:
                raise ValueError(f"{path}: tensor {name!r} has inconsistent offsets.")
            array = np.empty(count, dtype=dtype)
            f.seek(data_start + begin)
            if f.readinto(array.view(np.uint8)) != end - begin:
                raise ValueError(f"{path}: tensor {name!r} is truncated.")
            tensors[name] = array.reshape(shape)
    return tensors


def read_folder(directory):
    """Every tensor of the checkpoint in `directory`: `model.safetensors`, or the
    shards listed by `model.safetensors.index.json`.

    Raises:
        FileNotFoundError: no safetensors weights (a `pytorch_model.bin` alone
            is refused by name: reading it would unpickle untrusted code).
    """
    single = os.path.join(directory, SINGLE_FILE)
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(single):
        return read_file(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_file(os.path.join(directory, shard)))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"{index} lists tensors that no shard holds: {', '.join(missing[:5])}.")
        return tensors
    pickles = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
               if os.path.isfile(os.path.join(directory, n))]
    if pickles:
        raise FileNotFoundError(
            f"{directory} has {pickles[0]} but no model.safetensors. Only safetensors weights are "
            f"read (a .bin is a pickle, which can run code when loaded); convert it first, e.g. "
            f"with transformers: GPT2LMHeadModel.from_pretrained(DIR).save_pretrained(OUT).")
    raise FileNotFoundError(f"{directory} has no {SINGLE_FILE} (nor {INDEX_FILE}).")


def write_file(path, tensors, metadata=None):
    """Writes `{name: array}` as one safetensors file (`metadata`: str -> str)."""
    from safetensors.numpy import save_file  # deferred: imports safetensors

    save_file({name: np.ascontiguousarray(value) for name, value in tensors.items()}, path,
              metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors writes it private
