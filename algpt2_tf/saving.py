"""Finding and loading a trained model and the tokenizer that goes with it.

Finding a model file and its tokenizer needs no Keras (the LiteRT engine runs
without it); only `load_model` imports it.
"""

import os


def resolve_model_path(path):
    """`path` itself if it is a `.keras` file; `path/model.keras` for a run directory;
    a shipped pretrained model's file for its name (`algpt2_tf.pretrained`)."""
    from algpt2_tf.pretrained import list_pretrained, pretrained_dir

    if not os.path.exists(path) and path in list_pretrained():
        path = pretrained_dir(path)
    if os.path.isdir(path):
        path = os.path.join(path, "model.keras")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model at {path}.")
    if not path.endswith(".keras"):
        raise ValueError(f"{path} is not a .keras model file.")
    return path


def load_model(path):
    """Loads an `ALGPT2LMHeadModel` from a `.keras` file or a run directory."""
    import keras  # with the model: TensorFlow, imported when a model is loaded

    from algpt2_tf.model import ALGPT2LMHeadModel

    path = resolve_model_path(path)
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as e:  # a zip that is not a Keras model, a truncated file...
        raise ValueError(f"Could not load {path}: {e}") from None
    if not isinstance(model, ALGPT2LMHeadModel):
        raise ValueError(f"{path} holds a {type(model).__name__}, not an ALGPT2LMHeadModel.")
    return model


def load_tokenizer_for(path):
    """The tokenizer saved beside a model (`tokenizer/` next to model.keras),
    else the shipped GPT-2 tokenizer."""
    from algpt2_tf.tokenizer import GPT2Tokenizer

    model_dir = os.path.dirname(resolve_model_path(path))
    directory = os.path.join(model_dir, "tokenizer")
    return GPT2Tokenizer(directory if os.path.isdir(directory) else None)
