"""A TF Serving REST server (FastAPI + uvicorn) for exported SavedModels.

It serves artifacts only, exactly as TensorFlow Serving would: nothing here
imports the model code, so what works here works under the real TF Serving,
and clients written for TF Serving work against either.

Protocol (https://www.tensorflow.org/tfx/serving/api_rest):
    GET  /v1/models/{name}[/versions/{v}]            version status
    GET  /v1/models/{name}[/versions/{v}]/metadata   signature defs
    POST /v1/models/{name}[/versions/{v}]:predict    row ("instances") or
         columnar ("inputs") requests; "predictions" / "outputs" responses
Errors are `{"error": "..."}` with TF Serving's status codes (400, 404),
plus 401 without the API key (when one is set), 408 for a body that does not
arrive in time, 413 for a request over the size limit or asking for a
response over the response limit, and 504 past the time limit (the
computation is cancelled then, not left running).

Like TF Serving's default version policy, the newest version directory under
the base path is served; a new one is picked up without a restart, and
requests already running finish on the version they started with.
"""

import asyncio
import base64
import json
import logging
import os
import threading

import numpy as np
import orjson
import tensorflow as tf
import tensorflow_text  # noqa: F401  (ops used by the generate signature)
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from algpt2_tf.serving.request_body import (BodyTimeout, BodyTooLarge, RequireAPIKey, check_binding,
                                            read_limited, run_app)

log = logging.getLogger("algpt2.serve")

JSON_BYTES_PER_NUMBER = 16
"""What one number of a response costs as JSON, at most about (orjson writes a float32
logit in 10-14 characters and a comma): the response-size check's estimate."""

DTYPE_NAMES = {tf.int32: "DT_INT32", tf.int64: "DT_INT64", tf.float32: "DT_FLOAT",
               tf.float64: "DT_DOUBLE", tf.string: "DT_STRING", tf.bool: "DT_BOOL"}


class ServingError(Exception):
    """An error answered as `{"error": message}` with an HTTP status."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


# ------------------------------------------------------------------ servables
class Servable:
    """One loaded SavedModel version."""

    def __init__(self, name, version, path):
        self.name = name
        self.version = version
        self.path = path
        self.loaded = tf.saved_model.load(path)
        self.signatures = dict(self.loaded.signatures)
        if not self.signatures:
            raise ValueError(f"{path} has no serving signatures.")

    def signature(self, name):
        name = name or "serving_default"
        if name not in self.signatures:
            raise ServingError(404, f"Serving signature name: \"{name}\" not found in signature def")
        return self.signatures[name]

    def input_specs(self, signature):
        return signature.structured_input_signature[1]

    def metadata(self):
        defs = {}
        for sig_name, fn in self.signatures.items():
            inputs = {k: _tensor_info(f"{sig_name}_{k}:0", spec)
                      for k, spec in self.input_specs(fn).items()}
            outputs = {k: _tensor_info(f"StatefulPartitionedCall:{i}", spec) for i, (k, spec)
                       in enumerate(sorted(fn.structured_outputs.items()))}
            defs[sig_name] = {"inputs": inputs, "outputs": outputs,
                              "method_name": "tensorflow/serving/predict"}
        return {"model_spec": {"name": self.name, "signature_name": "", "version": str(self.version)},
                "metadata": {"signature_def": {"signature_def": defs}}}


def _tensor_info(name, spec):
    dims = None if spec.shape.rank is None else [
        {"size": str(-1 if d is None else d), "name": ""} for d in spec.shape.as_list()]
    shape = {"unknown_rank": True} if dims is None else {"dim": dims, "unknown_rank": False}
    return {"dtype": DTYPE_NAMES.get(spec.dtype, spec.dtype.name), "tensor_shape": shape,
            "name": name}


def is_version(text):
    """Whether `text` names a version: ASCII digits only ("²" is a digit to Python's
    `isdigit`, not to `int`)."""
    return text.isascii() and text.isdigit()


def version_dirs(base_path):
    """`{version: path}` of the complete SavedModel versions under `base_path`."""
    found = {}
    if os.path.isdir(base_path):
        for entry in os.listdir(base_path):
            path = os.path.join(base_path, entry)
            if is_version(entry) and os.path.exists(os.path.join(path, "saved_model.pb")):
                found[int(entry)] = path
    return found


class ModelManager:
    """Serves the newest version of one model and reloads when a newer one appears."""

    def __init__(self, name, base_path, poll_seconds=1.0):
        self.name = name
        self.base_path = base_path
        self.poll_seconds = poll_seconds
        self.current = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds!r}.")
        if not version_dirs(base_path):
            raise FileNotFoundError(f"No SavedModel version (a numbered folder with "
                                    f"saved_model.pb) under {base_path}.")
        self.load_error = None
        self.refresh()
        if self.current is None:
            raise ValueError(f"No SavedModel version under {base_path} could be loaded: "
                             f"{self.load_error}")
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def refresh(self):
        versions = version_dirs(self.base_path)
        if not versions:
            return
        newest = max(versions)
        if self.current is not None and self.current.version >= newest:
            return
        try:
            servable = Servable(self.name, newest, versions[newest])
        except Exception as e:  # keep serving the old version
            self.load_error = f"version {newest}: {type(e).__name__}: {e}"
            log.error("Could not load %s version %s: %s", self.name, newest, e)
            return
        with self._lock:
            self.current = servable  # in-flight requests keep their reference to the old one
        log.info("Serving %s version %s from %s", self.name, newest, versions[newest])

    def _watch(self):
        while not self._stop.wait(self.poll_seconds):
            self.refresh()

    def stop(self):
        self._stop.set()

    def get(self, name, version=None):
        if name != self.name:
            raise ServingError(404, f"Servable not found for request: Latest({name})")
        with self._lock:
            servable = self.current
        if version is not None and (not is_version(version) or int(version) != servable.version):
            raise ServingError(404, f"Servable not found for request: Specific({name}, {version})")
        return servable


# ------------------------------------------------------------------ tensors
def _decode_strings(value):
    if isinstance(value, dict):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise ServingError(400, "A binary value must be an object {\"b64\": \"...\"}.")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except ValueError:
            raise ServingError(400, "Invalid base64 in a {\"b64\": ...} value.") from None
    if isinstance(value, list):
        return [_decode_strings(v) for v in value]
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, e.g. "\ud800" in the JSON
            raise ServingError(400, f"A string is not valid Unicode: {e.reason} at character "
                                    f"{e.start}.") from None
    raise ServingError(400, f"Expected a string, got {type(value).__name__}.")


def _check_numbers(value, dtype, name):
    if isinstance(value, list):
        for v in value:
            _check_numbers(v, dtype, name)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ServingError(400, f"Input '{name}': expected {dtype.name} values, got "
                                f"{type(value).__name__}.")
    if dtype.is_integer and isinstance(value, float) and not value.is_integer():
        raise ServingError(400, f"Input '{name}': expected {dtype.name}, got a fraction {value}.")
    if dtype.is_integer and not dtype.min <= value <= dtype.max:  # a cast would wrap it
        raise ServingError(400, f"Input '{name}': {value} is outside {dtype.name}'s range "
                                f"[{dtype.min}, {dtype.max}].")


def to_tensor(name, value, spec):
    """A JSON value as a tensor of the signature's dtype and shape (or a 400)."""
    if spec.dtype == tf.string:
        array = np.array(_decode_strings(value), dtype=object)
    else:
        _check_numbers(value, spec.dtype, name)
        try:
            array = np.array(value, dtype=spec.dtype.as_numpy_dtype)
        except (ValueError, OverflowError):
            raise ServingError(400, f"Input '{name}' is not a rectangular {spec.dtype.name} "
                                    "array.") from None
    if array.dtype == object and spec.dtype != tf.string:
        raise ServingError(400, f"Input '{name}' is not a rectangular array.")
    if spec.dtype == tf.string and any(not isinstance(x, bytes) for x in np.ravel(array)):
        raise ServingError(400, f"Input '{name}' is not a rectangular array of strings.")
    if spec.dtype.is_integer:
        info = np.iinfo(spec.dtype.as_numpy_dtype)
        if array.size and (np.min(array) < info.min or np.max(array) > info.max):
            raise ServingError(400, f"Input '{name}' is out of range for {spec.dtype.name}.")
    if not spec.shape.is_compatible_with(array.shape):
        raise ServingError(400, f"Input '{name}' has shape {list(array.shape)}; the signature "
                                f"expects {spec.shape.as_list()}.")
    if array.size == 0 and array.ndim and spec.shape.rank:
        raise ServingError(400, f"Input '{name}' is empty.")
    return tf.constant(array, dtype=spec.dtype)


def parse_request(body, specs):
    """Returns `(inputs dict of tensors, row_format)` for a predict body."""
    if not isinstance(body, dict):
        raise ServingError(400, "The request body must be a JSON object.")
    if "instances" in body and "inputs" in body:
        raise ServingError(400, "Request has both 'instances' (row format) and 'inputs' "
                                "(columnar format); use one.")
    if "instances" in body:
        columns = _rows_to_columns(body["instances"], specs)
        row_format = True
    elif "inputs" in body:
        columns = body["inputs"]
        if not isinstance(columns, dict):
            if len(specs) != 1:
                raise ServingError(400, "'inputs' must be an object naming each input: "
                                        f"{sorted(specs)}.")
            columns = {next(iter(specs)): columns}
        row_format = False
    else:
        raise ServingError(400, "Missing 'instances' or 'inputs' in the request body.")
    unknown = sorted(set(columns) - set(specs))
    if unknown:
        raise ServingError(400, f"Unknown input(s) {unknown}; the signature takes {sorted(specs)}.")
    missing = sorted(set(specs) - set(columns))
    if missing:
        raise ServingError(400, f"Missing input(s) {missing}.")
    return {k: to_tensor(k, columns[k], specs[k]) for k in specs}, row_format


def _rows_to_columns(instances, specs):
    if not isinstance(instances, list) or not instances:
        raise ServingError(400, "'instances' must be a non-empty list.")
    if len(specs) == 1 and not all(isinstance(r, dict) for r in instances):
        return {next(iter(specs)): instances}
    if not all(isinstance(r, dict) for r in instances):
        raise ServingError(400, "Each instance must be an object naming the inputs "
                                f"{sorted(specs)}.")
    columns = {}
    for key in set().union(*instances):
        if any(key not in r for r in instances):
            raise ServingError(400, f"Input '{key}' is missing from some instances.")
        values = [r[key] for r in instances]
        spec = specs.get(key)
        if spec is not None and spec.shape.rank == 0:
            # A scalar input given per row must be the same in every row.
            if any(v != values[0] for v in values):
                raise ServingError(400, f"Scalar input '{key}' differs between instances.")
            values = values[0]
        columns[key] = values
    return columns


def _jsonable(array):
    """Strings as nested lists; numbers as contiguous NumPy arrays, which
    `orjson` writes directly (`json_response`)."""
    array = np.asarray(array)
    if array.dtype == object or array.dtype.kind == "S":
        return np.vectorize(lambda b: b.decode("utf-8", "replace"), otypes=[object])(array).tolist() \
            if array.size else array.tolist()
    if array.ndim == 0:
        return array.item()
    return np.ascontiguousarray(array)


def json_response(content):
    """`content` as JSON, NumPy arrays included, written by orjson: Python's `json` module
    through `tolist()` was the bottleneck of `predict` (~50 k floats per token of logits);
    `serving_default` answers 10.6x the requests/s (benchmarks/results/serve_orjson.json)."""
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json")


def format_response(outputs, row_format):
    outputs = {k: np.asarray(v) for k, v in outputs.items()}
    if not row_format:
        if len(outputs) == 1:
            return {"outputs": _jsonable(next(iter(outputs.values())))}
        return {"outputs": {k: _jsonable(v) for k, v in outputs.items()}}
    batch = {len(v) for v in outputs.values() if v.ndim}
    if len(outputs) == 1:
        return {"predictions": _jsonable(next(iter(outputs.values())))}
    rows = batch.pop() if len(batch) == 1 else 0
    return {"predictions": [{k: _jsonable(v[i]) for k, v in outputs.items()} for i in range(rows)]}


def error_summary(message):
    """The informative line of a TF error ("assertion failed: [...]" when there is one)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("assertion failed:"):
            return line.split("[{{node")[0].strip()
    meaningful = [line for line in lines if not line.startswith(("Graph execution error",
                                                                   "Detected at node", "<stack"))]
    return (meaningful or lines or ["Invalid argument"])[0]


def response_bytes_estimate(signature, inputs):
    """About how many bytes of JSON the numbers of `signature`'s outputs take for these
    inputs, known before computing them: an output's unknown dimension `i` is taken as the
    largest dimension `i` among the inputs of at least that rank (`[batch, seq]` ids give
    `[batch, seq, vocab]` logits). String outputs and dimensions no input gives are not
    counted (the serialized response is checked too, `check_response_size`)."""
    total = 0
    for spec in tf.nest.flatten(signature.structured_outputs):
        if spec.dtype == tf.string or spec.shape.rank is None:
            continue
        size = 1
        for i, dim in enumerate(spec.shape.as_list()):
            if dim is None:
                dim = max((int(t.shape[i]) for t in inputs.values() if t.shape.rank > i),
                          default=1)
            size *= dim
        total += size * JSON_BYTES_PER_NUMBER
    return total


def check_response_size(size, limit, known_before=False):
    if size > limit:
        when = "would be" if known_before else "is"
        raise ServingError(413, f"The response {when} about {size:,} bytes, over the limit of "
                                f"{limit:,} bytes (--max-response-bytes); ask for fewer or "
                                "shorter rows.")


def run_cancelable(signature, inputs, cancel):
    """Runs `signature(**inputs)` so that `cancel.start_cancel()` from another thread stops
    it between kernels (its decode loop included) with `tf.errors.CancelledError`.
    TensorFlow's `CancellationManager` is not in its public API; without it the call runs
    to the end."""
    if cancel is None:
        return signature(**inputs)
    return cancel.get_cancelable_function(signature)(**inputs)


def _cancellation_manager():
    try:
        # Deferred: imports TensorFlow.
        from tensorflow.python.eager.cancellation import CancellationManager
    except ImportError:  # a TensorFlow without it: timeouts answer 504, the work finishes
        return None
    return CancellationManager()


# --------------------------------------------------------------------- app
def create_app(manager, max_request_bytes=1 << 20, timeout_seconds=60.0, api_key=None,
               max_response_bytes=32 << 20):
    """The FastAPI application serving `manager`'s model.

    Args:
        manager: the `ModelManager`.
        max_request_bytes: the largest request body (413 above).
        timeout_seconds: the time a request may take, its body's arrival included (408 while
            reading it, 504 after; a computation past it is cancelled).
        api_key: when set, every request needs `Authorization: Bearer KEY` (401).
        max_response_bytes: the largest response, estimated from the request before any
            computation (413 above).
    """
    for name, value in (("max_request_bytes", max_request_bytes),
                        ("timeout_seconds", timeout_seconds),
                        ("max_response_bytes", max_response_bytes)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}.")
    app = FastAPI(title="algpt2 serve (TF Serving REST protocol)")
    if api_key:
        app.add_middleware(RequireAPIKey, api_key=api_key, reject=lambda: JSONResponse(
            {"error": "Invalid or missing API key: send 'Authorization: Bearer KEY'."},
            status_code=401))

    @app.exception_handler(ServingError)
    async def _serving_error(request, exc):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    def status(name, version=None):
        servable = manager.get(name, version)
        return {"model_version_status": [{
            "version": str(servable.version), "state": "AVAILABLE",
            "status": {"error_code": "OK", "error_message": ""}}]}

    @app.get("/v1/models/{name}")
    def model_status(name: str):
        return status(name)

    @app.get("/v1/models/{name}/versions/{version}")
    def version_status(name: str, version: str):
        return status(name, version)

    @app.get("/v1/models/{name}/metadata")
    def model_metadata(name: str):
        return manager.get(name).metadata()

    @app.get("/v1/models/{name}/versions/{version}/metadata")
    def version_metadata(name: str, version: str):
        return manager.get(name, version).metadata()

    async def predict(request, name, version):
        try:
            raw = await read_limited(request, max_request_bytes, timeout_seconds)
        except BodyTooLarge:
            raise ServingError(413, f"Request body over the limit of {max_request_bytes} bytes.") \
                from None
        except BodyTimeout as e:
            raise ServingError(408, str(e)) from None
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ServingError(400, f"Malformed JSON request: {e}") from None
        servable = manager.get(name, version)  # held for the whole request
        if isinstance(body, dict) and not isinstance(body.get("signature_name", ""), str):
            raise ServingError(400, "'signature_name' must be a string.")
        signature = servable.signature(body.get("signature_name") if isinstance(body, dict) else None)
        inputs, row_format = parse_request(body, servable.input_specs(signature))
        check_response_size(response_bytes_estimate(signature, inputs), max_response_bytes,
                            known_before=True)
        cancel = _cancellation_manager()

        def run():
            try:
                return run_cancelable(signature, inputs, cancel)
            except tf.errors.InvalidArgumentError as e:
                raise ServingError(400, error_summary(e.message)) from None

        work = asyncio.ensure_future(asyncio.to_thread(run))
        try:
            outputs = await asyncio.wait_for(asyncio.shield(work), timeout_seconds)
        except asyncio.TimeoutError:
            if cancel is not None:
                cancel.start_cancel()  # the thread's computation stops at its next kernel
            work.add_done_callback(lambda done: done.exception())  # retrieved: not logged
            raise ServingError(504, f"Request took longer than {timeout_seconds} s.") from None
        response = json_response(format_response(outputs, row_format))
        check_response_size(len(response.body), max_response_bytes)
        return response

    @app.post("/v1/models/{name}:predict")
    async def model_predict(name: str, request: Request):
        return await predict(request, name, None)

    @app.post("/v1/models/{name}/versions/{version}:predict")
    async def version_predict(name: str, version: str, request: Request):
        return await predict(request, name, version)

    @app.exception_handler(404)
    async def _not_found(request, exc):
        return JSONResponse({"error": "Not found: " + request.url.path}, status_code=404)

    @app.exception_handler(405)
    async def _method(request, exc):
        return JSONResponse({"error": "Method not allowed"}, status_code=405)

    return app


def serve(model_base_path, model_name, host="127.0.0.1", port=8501, max_request_bytes=1 << 20,
          timeout_seconds=60.0, poll_seconds=1.0, api_key=None, max_response_bytes=32 << 20,
          insecure_no_auth=False):
    """Runs the server until interrupted (see `create_app` for the limits; beyond loopback
    only with `api_key` or `insecure_no_auth`, `request_body.check_binding`)."""
    warning = check_binding(host, api_key, insecure_no_auth)
    manager = ModelManager(model_name, model_base_path, poll_seconds)
    run_app(lambda: create_app(manager, max_request_bytes, timeout_seconds, api_key,
                               max_response_bytes), manager.stop, host, port,
            f"Serving {model_name} version {manager.current.version} on http://{host}:{port} "
            f"(REST: /v1/models/{model_name})", warning)
