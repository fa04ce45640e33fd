"""Finding and loading a trained model and the tokenizer that goes with it.

Finding a model file and its tokenizer needs no Keras (the LiteRT engine runs
without it); only `load_model` imports it.
"""

import os

from algpt2_tf.pretrained import list_pretrained, pretrained_dir
from algpt2_tf.tokenizer import GPT2Tokenizer


def resolve_model_path(path):
    """`path` itself if it is a `.keras` file; `path/model.keras` for a run directory;
    a shipped pretrained model's file for its name (`algpt2_tf.pretrained`)."""
    if not os.path.exists(path) and path in list_pretrained():
        path = pretrained_dir(path)
    if os.path.isdir(path):
        path = os.path.join(path, "model.keras")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model at {path}.")
    if not path.endswith(".keras"):
        raise ValueError(f"{path} is not a .keras model file.")
    return path


MODEL_NAMES = ("algpt2_tf>ALGPT2LMHeadModel", "algpt2_tf>ALGPT2Backbone")
"""The registered names a `.keras` file of ours holds its model under (the task class's, or
the backbone's when a bare backbone was saved): either loads as the class asked for."""


def load_model(path, cls):
    """Loads a `.keras` file, a run directory or a pretrained name as `cls`.

    Args:
        path: the model (see `resolve_model_path`).
        cls: `causal_lm.ALGPT2LMHeadModel` (the task: `generate`, `from_preset`),
            or `model.ALGPT2Backbone` for the network alone (what export and the
            LiteRT build need). The loader picks the class, as keras-hub's
            `from_preset` on a backbone or a task does.
    """
    import keras  # with the model: TensorFlow, imported when a model is loaded

    path = resolve_model_path(path)
    try:
        # A scope, not `custom_objects=`: Keras looks registered names up before those.
        with keras.saving.custom_object_scope({name: cls for name in MODEL_NAMES}):
            model = keras.models.load_model(path, compile=False)
    except Exception as e:  # a zip that is not a Keras model, a truncated file...
        raise ValueError(f"Could not load {path}: {e}") from None
    if not isinstance(model, cls):
        raise ValueError(f"{path} holds a {type(model).__name__}, not an ALGPT2 model.")
    return model


def load_tokenizer_for(path):
    """The tokenizer saved beside a model (`tokenizer/` next to model.keras),
    else the shipped GPT-2 tokenizer."""
    model_dir = os.path.dirname(resolve_model_path(path))
    directory = os.path.join(model_dir, "tokenizer")
    return GPT2Tokenizer(directory if os.path.isdir(directory) else None)
