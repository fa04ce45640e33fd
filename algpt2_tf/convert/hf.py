"""Hugging Face GPT-2 checkpoints in and out: the conversions `algpt2_tf.convert` exports.

Every conversion runs the converted tensors through an independent NumPy GPT-2
(`numpy_gpt2.py`), compares the logits with our Keras model, and writes its
folder only when they agree: a failed conversion leaves nothing.
"""

import dataclasses
import json
import os
import tempfile
import warnings

import numpy as np

from algpt2_tf.convert import gpt2_weights, hf_config, hf_tokenizer, safetensors_io
from algpt2_tf.convert.numpy_gpt2 import gpt2_logits
from algpt2_tf.runtime.files import atomic_write_json, new_directory, require_new_directory
from algpt2_tf.saving import load_model, resolve_model_path
from algpt2_tf.tokenizer import GPT2Tokenizer


class ConversionWarning(UserWarning):
    """Something of the model that the converted format cannot hold (it is left out)."""


PROBE_LENGTH = 12
"""Tokens in the sequence each conversion checks its logits on."""


def _probe_ids(config):
    length = min(PROBE_LENGTH, config.max_positions)
    return [(7919 * i + 13) % config.vocab_size for i in range(length)]


def _check_against_reference(model, tensors, values, what):
    """Max |our logits - the NumPy GPT-2's| on a probe sequence; raises when they disagree."""
    ids = _probe_ids(model.config)
    ours = np.asarray(model({"input_ids": np.asarray([ids])})["logits"][0], dtype="float64")
    reference = gpt2_logits(tensors, values, ids)
    diff = float(np.max(np.abs(ours - reference)))
    tolerance = 1e-4 * max(1.0, float(np.max(np.abs(reference))))
    if not diff <= tolerance:
        raise ValueError(f"{what}: the converted model's logits differ from the reference by "
                         f"{diff:.3g} (tolerance {tolerance:.3g}); nothing was written.")
    return diff


def is_hf_folder(path):
    """Whether `path` looks like a Hugging Face model folder (has a `config.json` with a `model_type`)."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    try:
        with open(config, encoding="utf-8") as f:
            return "model_type" in json.load(f)
    except (ValueError, OSError):
        return False


def _read_checkpoint(path):
    """`(our config, GPT-2 tensors, HF config dict)` of a checked Hugging Face folder."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No Hugging Face model folder at {path}.")
    values = hf_config.read_hf_config(path)
    config = hf_config.config_from_hf(values)
    tensors = gpt2_weights.normalize_names(safetensors_io.read_folder(path), source=path)
    return config, tensors, {**hf_config.GPT2_DEFAULTS, **values}


def _load_checked(path, cls=None):
    """`(model, HF config dict, max |logits - reference|)` of a Hugging Face folder:
    read, checked, built as `cls` (default `ALGPT2Backbone`), and compared with the NumPy
    GPT-2."""
    from algpt2_tf.model import ALGPT2Backbone  # Keras: imported when a model is converted

    config, tensors, values = _read_checkpoint(path)
    gpt2_weights.check_gpt2_tensors(config, tensors, source=path)  # before allocating anything
    model = (cls or ALGPT2Backbone)(config)
    gpt2_weights.load_gpt2_tensors(model, tensors, source=path)
    return model, values, _check_against_reference(model, tensors, values, path)


def from_hf(path, cls=None):
    """Loads a Hugging Face GPT-2 folder as `(model, tokenizer)`.

    `tokenizer` is a `GPT2Tokenizer`, or `None` when the folder has no
    tokenizer files (`vocab.json` + `merges.txt`, or `tokenizer.json`).

    Args:
        path: the folder.
        cls: the model's class: `ALGPT2LMHeadModel` (with `generate`; what its
            `from_preset` passes) or the default `ALGPT2Backbone`, the network alone.

    Raises:
        FileNotFoundError: no folder, no `config.json`, or no safetensors
            weights (a `.bin` is refused: it is a pickle).
        ValueError: not a GPT-2, an unsupported field, a missing or
            unexpected tensor, a tensor of the wrong shape (each named).

    Example:
    >>> import tempfile
    >>> from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel
    >>> folder = tempfile.mkdtemp() + "/gpt2-tiny"
    >>> report = to_hf(ALGPT2LMHeadModel(ALGPT2Config.from_preset("gpt2-tiny")), folder)
    >>> model, tokenizer = from_hf(folder, ALGPT2LMHeadModel)
    >>> model.config.embedding_size is None, tokenizer.vocab_size
    (True, 50257)
    """
    model, _, _ = _load_checked(path, cls)
    tokenizer = None
    if hf_tokenizer.has_tokenizer(path):
        tokenizer = hf_tokenizer.import_tokenizer(path, tempfile.mkdtemp(prefix="algpt2-tokenizer-"))
    return model, tokenizer


@dataclasses.dataclass
class ImportReport:
    """What `import_hf` wrote."""

    path: str
    parameters: int
    layers: int
    hidden_size: int
    tokenizer: bool
    max_abs_diff: float

    def summary(self):
        return (f"Imported a {self.layers}-layer, {self.hidden_size}-wide GPT-2 "
                f"({self.parameters:,} parameters) into {self.path} "
                f"(model.keras, config.json{', tokenizer/' if self.tokenizer else ''}); "
                f"max |logits - NumPy GPT-2| = {self.max_abs_diff:.2e}")


def import_hf(path, out):
    """Converts the Hugging Face GPT-2 folder `path` into the run folder `out`.

    `out` gets `model.keras`, `config.json` (ours), `converted_from.json` (the
    source and its `config.json`) and, when the source has tokenizer files,
    `tokenizer/`. Everything is checked before `out` appears, and `out` must
    not exist yet (or be empty).

    Raises:
        As `from_hf`, and `FileExistsError` for an existing, non-empty `out`.
    """
    require_new_directory(out)
    model, values, diff = _load_checked(path)
    config = model.config
    with new_directory(out) as tmp:
        tokenizer = None
        if hf_tokenizer.has_tokenizer(path):
            tokenizer = hf_tokenizer.import_tokenizer(path, os.path.join(tmp, "tokenizer"))
            if tokenizer.vocab_size > config.vocab_size:
                raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} ids but the "
                                 f"model only {config.vocab_size} (vocab_size).")
        elif config.vocab_size < 50257:
            warnings.warn(f"{path} has no tokenizer files and a vocabulary of "
                          f"{config.vocab_size} ids: the default GPT-2 tokenizer will not fit it; "
                          f"copy its tokenizer into {out}/tokenizer/.", ConversionWarning,
                          stacklevel=2)
        config.to_json_file(os.path.join(tmp, "config.json"))
        atomic_write_json(os.path.join(tmp, "converted_from.json"),
                          {"source": os.path.abspath(path), "config": values})
        model.save(os.path.join(tmp, "model.keras"))
    return ImportReport(out, model.count_params(), config.num_layers, config.hidden_size,
                        tokenizer is not None, diff)


@dataclasses.dataclass
class HFExportReport:
    """What `to_hf` wrote.

    Attributes:
        path: the folder.
        parameters: parameters of the written GPT-2 (expanded).
        source_parameters: parameters of our model.
        size_bytes: size of `model.safetensors`.
        tied: `tie_word_embeddings` of the written config.
        max_abs_diff: max |logits of the written tensors (NumPy GPT-2) - ours|.
        head_bias_error: logit error of folding the output projection's bias.
        dropped: parts of our model a GPT-2 cannot hold (with a warning).
    """

    path: str
    parameters: int
    source_parameters: int
    size_bytes: int
    tied: bool
    max_abs_diff: float
    head_bias_error: float
    dropped: tuple

    def summary(self):
        line = (f"Wrote a GPT-2 checkpoint to {self.path}: {self.parameters:,} parameters "
                f"({self.parameters / self.source_parameters:.2f}x our {self.source_parameters:,}), "
                f"model.safetensors {self.size_bytes / 1e6:.1f} MB, "
                f"{'tied' if self.tied else 'untied'} lm_head, "
                f"max |logits - ours| = {self.max_abs_diff:.2e}")
        if self.dropped:
            line += f"; dropped: {', '.join(self.dropped)}"
        return line


def to_hf(model, out, tokenizer=None):
    """Writes `model` as a Hugging Face GPT-2 folder `out`.

    `out` gets `config.json`, `model.safetensors`, `generation_config.json`
    and, with a tokenizer, `vocab.json`, `merges.txt`, `tokenizer.json`,
    `tokenizer_config.json`. An ALGPT2 is expanded exactly (see
    `gpt2_weights.py`); its SOP head is dropped with a warning.

    Args:
        model: an `ALGPT2LMHeadModel` or `ALGPT2Backbone` (any mode).
        out: a folder that does not exist yet (or is empty).
        tokenizer: a `GPT2Tokenizer`, default the shipped GPT-2 one when the
            model's vocabulary can hold it, else none.

    Returns:
        An `HFExportReport`.
    """
    require_new_directory(out)
    config = model.config
    if tokenizer is None and config.vocab_size >= 50257:
        tokenizer = GPT2Tokenizer()
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"The tokenizer has {tokenizer.vocab_size} ids but the model only "
                         f"{config.vocab_size} (vocab_size).")
    expanded = gpt2_weights.export_tensors(model)
    eos = tokenizer.eos_id if tokenizer is not None else None
    values = hf_config.hf_config_from(config, expanded.tied, eos_id=eos)
    diff = _check_against_reference(model, expanded.tensors, values, "to_hf")
    if expanded.dropped:
        warnings.warn(f"A GPT-2 checkpoint has no {', '.join(expanded.dropped)}: it is not "
                      f"exported (the language model is, exactly).", ConversionWarning,
                      stacklevel=2)
    tensors = {(name if name.startswith("lm_head.") else f"transformer.{name}"): value
               for name, value in expanded.tensors.items()}
    with new_directory(out) as tmp:
        weights_path = os.path.join(tmp, safetensors_io.SINGLE_FILE)
        safetensors_io.write_file(weights_path, tensors, metadata={"format": "pt"})
        _write_json(os.path.join(tmp, "config.json"), values)
        _write_json(os.path.join(tmp, "generation_config.json"),
                    {"bos_token_id": eos, "eos_token_id": eos})
        if tokenizer is not None:
            hf_tokenizer.export_tokenizer(tokenizer, tmp, config.max_positions)
        size = os.path.getsize(weights_path)
    return HFExportReport(out, expanded.num_parameters, model.count_params(), size, expanded.tied,
                          diff, expanded.head_bias_error, expanded.dropped)


def export_hf(model_path, out):
    """`to_hf` for a saved model (`model.keras` or a run folder) and the tokenizer saved beside it."""
    from algpt2_tf.model import ALGPT2Backbone  # Keras: imported when a model is converted

    model = load_model(model_path, ALGPT2Backbone)
    directory = os.path.join(os.path.dirname(resolve_model_path(model_path)), "tokenizer")
    return to_hf(model, out, GPT2Tokenizer(directory) if os.path.isdir(directory) else None)


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


__all__ = ["from_hf", "import_hf", "to_hf", "export_hf", "is_hf_folder", "ImportReport",
           "HFExportReport", "ConversionWarning"]
