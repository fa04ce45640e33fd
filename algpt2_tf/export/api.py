"""Exports a trained model as `.keras`, a TF Serving SavedModel or TFLite, verified before it lands.

Every format is written in TF Serving's layout, `OUT/VERSION/`, VERSION
defaulting to the next integer. The export goes to a temporary folder inside
OUT, is loaded and run there and compared with the Keras model, and only then
renamed into place: an existing version is never replaced without
`overwrite=True`, and a failed export leaves nothing behind.
"""

import dataclasses
import os
import shutil
import tempfile
from typing import Optional

import numpy as np

from algpt2_tf.export.formats import FORMATS, QUANTIZATIONS
from algpt2_tf.export.steps import InterpreterSteps
from algpt2_tf.generation.prompts import left_pad
from algpt2_tf.generation.sampling import SamplingParams, host_decode
from algpt2_tf.runtime.files import staging_directory
from algpt2_tf.saving import load_model, load_tokenizer_for

PROBE_TEXT = ["The quick brown fox jumps over the lazy dog.", "Hello"]
GREEDY_TOKENS = 32


@dataclasses.dataclass
class ExportReport:
    format: str
    path: str
    version: int
    size_bytes: int
    max_abs_diff: float
    quantize: str = "none"
    greedy_agreement: Optional[float] = None
    notes: str = ""

    def summary(self):
        line = (f"Wrote {self.format} ({self.quantize}) to {self.path}: "
                f"{self.size_bytes / 1e6:.2f} MB, max |logits - keras| = {self.max_abs_diff:.2e}")
        if self.greedy_agreement is not None:
            line += f", greedy tokens identical to Keras: {self.greedy_agreement:.0%}"
        return line + (f" ({self.notes})" if self.notes else "")


def directory_size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
               for f in files)


def next_version(out):
    versions = [int(d) for d in os.listdir(out) if d.isdigit()] if os.path.isdir(out) else []
    return max(versions, default=0) + 1


def probe_batch(tokenizer):
    """A left-padded batch of two texts: ids, mask."""
    return left_pad([tokenizer.encode(t) for t in PROBE_TEXT])


def export_model(model_path, format, out, version=None, quantize="none", max_length=None,
                 overwrite=False, log=print, batch=1):
    """Loads the model at `model_path` (a `.keras` file, a training run directory or a
    pretrained name) with its tokenizer and `export`s it; returns the `ExportReport`."""
    from algpt2_tf.model import ALGPT2Backbone  # Keras: imported when a model is exported

    _check_options(format, quantize, version, batch)
    return export(load_model(model_path, ALGPT2Backbone), load_tokenizer_for(model_path), format,
                  out, version, quantize, max_length, overwrite, log, source=model_path,
                  batch=batch)


def _check_options(format, quantize, version, batch=1):
    if format not in FORMATS:
        raise ValueError(f"Unknown format {format!r}; choose one of {', '.join(FORMATS)}.")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}.")
    if quantize in ("fp16", "int4") and format != "tflite":
        raise ValueError(f"--quantize {quantize} applies to the tflite format only.")
    if version is not None and (not isinstance(version, int) or version < 1):
        raise ValueError(f"version must be a positive integer, got {version!r}.")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}.")
    if batch != 1 and format != "tflite":
        raise ValueError("batch applies to the tflite format only (the others take any batch).")


def export(model, tokenizer, format, out, version=None, quantize="none", max_length=None,
           overwrite=False, log=print, source="the model", batch=1):
    """Exports an in-memory model, verifies it and moves it into `out/VERSION/`; returns an
    `ExportReport`. A Keras int8 export (`quantize="int8"`, keras or savedmodel) quantizes
    `model` in place; every other export leaves it as it was.

    Args:
        model: an `ALGPT2Backbone` or `ALGPT2LMHeadModel`.
        tokenizer: its `GPT2Tokenizer` (saved with the export; the probes use it).
        format: "keras", "savedmodel" or "tflite".
        out: the model's folder, e.g. `saved_models/algpt2`.
        version: the version number (default: the next one).
        quantize: "none", "fp16" (TFLite only) or "int8" (TFLite's own int8;
            for `.keras` and SavedModel, the Keras int8 of
            `ALGPT2Backbone.quantize`).
        max_length: the cache length of `generate` / TFLite decoding
            (default: min(256, max_positions)).
        overwrite: replace an existing version.
        log: where progress lines go.
        source: what the model is, for error messages.
        batch: the rows a TFLite export's steps decode together (1 to `batch` rows run;
            the other formats take any batch).
    """
    _check_options(format, quantize, version, batch)
    if model.quantization is not None and (format == "tflite" or quantize != "none"):
        raise ValueError(f"{source} is already quantized ({model.quantization}); export it "
                         f"as it is (keras or savedmodel), or export the float32 model to tflite "
                         f"with --quantize int8.")
    limit = model.config.max_positions
    max_length = max_length or min(256, limit)
    if not 2 <= max_length <= limit:
        raise ValueError(f"max_length {max_length} must be in [2, the model's max_positions={limit}].")
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"{out} exists and is not a directory.")
    version = version or next_version(out)
    final = os.path.join(out, str(version))
    if os.path.exists(final) and not overwrite:
        raise FileExistsError(f"{final} already exists; pass --overwrite to replace it, "
                              "or choose another --version.")
    created_out = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    staging = staging_directory(f".export-{version}-", out)
    try:
        keras_int8 = quantize == "int8" and format != "tflite"
        if keras_int8:
            float_logits, float_tokens = _reference(model, tokenizer, max_length)
            model.quantize("int8")
        options = {"batch": batch} if format == "tflite" else {}
        report = _EXPORTERS[format](model, tokenizer, staging, quantize, max_length, log,
                                    **options)
        if keras_int8:
            logits, tokens = _reference(model, tokenizer, max_length)
            report.quantize = "int8"
            report.greedy_agreement = float(np.mean(np.equal(tokens, float_tokens)))
            report.notes = (f"Keras int8: max |logits - float32| = "
                            f"{np.abs(logits - float_logits).max():.2e}, greedy agreement "
                            f"is with the float32 model")
        report.version = version
        report.path = os.path.normpath(os.path.join(final, os.path.relpath(report.path, staging)))
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".replaced-{version}-", dir=out)
            os.replace(final, os.path.join(old, "v"))
            os.replace(staging, final)
            shutil.rmtree(old)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_out:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return report


class ExportVerificationError(ValueError):
    """The exported artifact does not reproduce the Keras model."""


def _keras_logits(model, ids, mask):
    return model({"input_ids": ids, "attention_mask": mask})["logits"].numpy()


def _last_logits(model):
    """`row [1, T] -> the next-token logits [1, vocab]` of the Keras model at any length T,
    the whole row through the model: traced once on TensorFlow (a tiny model's greedy
    references for two prompts of 32 steps: 4.5 s eagerly, 1.2 s traced, Zen 4), eager on
    the other backends."""
    import keras  # deferred: imports Keras

    def run(row):
        inputs = {"input_ids": row, "attention_mask": keras.ops.ones_like(row)}
        return model(inputs)["logits"][:, -1]

    if keras.backend.backend() != "tensorflow":
        return lambda row: keras.ops.convert_to_numpy(run(row))
    import tensorflow as tf  # deferred: the TensorFlow backend's tracing

    traced = tf.function(run, input_signature=[tf.TensorSpec([1, None], tf.int32)],
                         autograph=False)
    return lambda row: traced(row).numpy()


def _greedy_ids(last_logits, prompt, steps, stop_ids=()):
    """A model's greedy continuation of `prompt`, `steps` tokens (fewer after a stop id,
    which ends it), `last_logits` (`_last_logits(model)`) running the whole sequence at every
    step, in the one NumPy decode loop. No KV cache and no compiled decode loop, so it checks
    an export's own cached steps against the plain model."""
    ids = [int(t) for t in prompt]

    def next_logits(tokens=(), step=None):
        ids.extend(int(t) for t in tokens)
        return last_logits(np.asarray([ids], np.int32))

    logits = next_logits()
    return [int(tokens[0]) for tokens, _, _ in host_decode(
        logits, np.zeros(logits.shape, bool), SamplingParams(top_k=1), [0], steps, stop_ids,
        next_logits)]


def _greedy_probe(model, tokenizer, max_length):
    """The first probe text's ids and the Keras model's greedy continuation of it
    (`GREEDY_TOKENS`, or what `max_length` leaves)."""
    prompt = tokenizer.encode(PROBE_TEXT[0])
    return prompt, _greedy_ids(_last_logits(model), prompt,
                               min(GREEDY_TOKENS, max_length - len(prompt)))


def _reference(model, tokenizer, max_length):
    """The probe batch's logits (real positions) and the first probe's greedy tokens."""
    ids, mask = probe_batch(tokenizer)
    return (_keras_logits(model, ids, mask)[mask.astype(bool)],
            _greedy_probe(model, tokenizer, max_length)[1])


def _export_keras(model, tokenizer, staging, quantize, max_length, log):
    import keras  # deferred: imports Keras

    path = os.path.join(staging, "model.keras")
    model.save(path)
    tokenizer.save(os.path.join(staging, "tokenizer"))
    ids, mask = probe_batch(tokenizer)
    diff = float(np.abs(_keras_logits(keras.models.load_model(path), ids, mask)
                        - _keras_logits(model, ids, mask)).max())
    if diff > 1e-5:
        raise ExportVerificationError(f"The reloaded .keras model differs by {diff:.2e}.")
    return ExportReport("keras", path, 0, directory_size(staging), diff)


def _greedy_text(model, tokenizer, prompts, steps):
    """Each prompt and the Keras model's greedy continuation of it (`_greedy_ids`), as text
    (the `<|endoftext|>` that ends one left out)."""
    texts, last_logits = [], _last_logits(model)
    for prompt in prompts:
        new = _greedy_ids(last_logits, tokenizer.encode(prompt), steps, (tokenizer.eos_id,))
        texts.append(prompt + tokenizer.decode([t for t in new if t != tokenizer.eos_id]))
    return texts


def _export_savedmodel(model, tokenizer, staging, quantize, max_length, log):
    import tensorflow as tf  # deferred: imports TensorFlow
    import tensorflow_text  # noqa: F401  (registers the ops the SavedModel uses)

    from algpt2_tf.export import savedmodel  # TensorFlow: imported when this format is asked for

    savedmodel.save(model, tokenizer, staging, max_length)
    loaded = tf.saved_model.load(staging)
    ids, mask = probe_batch(tokenizer)
    logits = loaded.signatures["serving_default"](input_ids=tf.constant(ids),
                                                  attention_mask=tf.constant(mask))["logits"]
    real = mask.astype(bool)
    diff = float(np.abs(logits.numpy()[real] - _keras_logits(model, ids, mask)[real]).max())
    steps = min(GREEDY_TOKENS, max_length - ids.shape[1])
    served = loaded.signatures["generate"](
        prompts=tf.constant(PROBE_TEXT), max_new_tokens=tf.constant(steps, tf.int32),
        temperature=tf.constant(1.0), top_k=tf.constant(1), top_p=tf.constant(1.0),
        seed=tf.constant(0))
    texts = [t.decode("utf-8", "replace") for t in served["text"].numpy()]  # as the tokenizer decodes
    expected = _greedy_text(model, tokenizer, PROBE_TEXT, steps)
    if diff > 1e-4 or texts != expected:
        raise ExportVerificationError(
            f"The SavedModel does not reproduce the Keras model (logits differ by {diff:.2e}; "
            f"generate gave {texts!r}, Keras {expected!r}).")
    return ExportReport("savedmodel", staging, 0, directory_size(staging), diff,
                        greedy_agreement=1.0)


def tflite_greedy(interpreter, prompt_ids, steps):
    """Greedy continuation through an `Interpreter`'s `prefill_N`/`decode_N` steps."""
    return InterpreterSteps(interpreter).greedy(prompt_ids, steps)


def _export_tflite(model, tokenizer, staging, quantize, max_length, log, batch=1):
    from ai_edge_litert.interpreter import Interpreter  # deferred: imports LiteRT

    from algpt2_tf.export import tflite  # TensorFlow: imported when this format is asked for

    path = os.path.join(staging, "model.tflite")
    with open(path, "wb") as f:
        f.write(tflite.convert(model, max_length, quantize, batch))
    tokenizer.save(os.path.join(staging, "tokenizer"))
    interpreter = Interpreter(model_path=path)
    prompt, keras_tokens = _greedy_probe(model, tokenizer, max_length)
    ids = np.asarray([prompt], np.int32)
    rows = np.repeat(ids, batch, axis=0)  # the build's batch: the first row is compared
    lite = interpreter.get_signature_runner("logits")(
        input_ids=rows, attention_mask=np.ones_like(rows))["logits"][:1]
    diff = float(np.abs(lite - _keras_logits(model, ids, np.ones_like(ids))).max())
    lite_tokens = tflite_greedy(interpreter, prompt, len(keras_tokens))
    agreement = float(np.mean(np.equal(lite_tokens, keras_tokens)))
    if quantize == "none" and (diff > 1e-4 or agreement < 1.0):
        raise ExportVerificationError(
            f"The float32 TFLite model does not reproduce the Keras model (logits differ by "
            f"{diff:.2e}, greedy agreement {agreement:.0%}).")
    if not np.isfinite(lite).all():
        raise ExportVerificationError("The TFLite model outputs NaN/inf.")
    notes = "" if quantize == "none" else "quantized: differences are expected"
    return ExportReport("tflite", path, 0, directory_size(path), diff, quantize=quantize,
                        greedy_agreement=agreement, notes=notes)


_EXPORTERS = {"keras": _export_keras, "savedmodel": _export_savedmodel, "tflite": _export_tflite}
