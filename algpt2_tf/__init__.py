"""algpt2_tf: an ALBERT-style GPT-2 (ALGPT2) for TensorFlow / Keras 3.

`import algpt2_tf` imports neither TensorFlow nor Keras, and reads or changes
no environment variable: the configs, presets and the pretrained registry
are plain Python. `from algpt2_tf import ALGPT2LMHeadModel` (or
`algpt2_tf.ALGPT2LMHeadModel`) imports the model (the task class of
`causal_lm.py` over the backbone of `model.py`), which imports Keras and
registers the model and its layers with it, so that `keras.models.load_model`
reads our `.keras` files after it.
"""

from algpt2_tf.config import ALGPT2Config, list_presets
from algpt2_tf.pretrained import list_pretrained

__version__ = "0.1.0"
__all__ = ["ALGPT2Backbone", "ALGPT2Config", "ALGPT2LMHeadModel", "list_presets",
           "list_pretrained", "__version__"]


def __getattr__(name):
    # PEP 562: the model (and so Keras and its backend) is imported on first use only.
    if name == "ALGPT2LMHeadModel":
        from algpt2_tf.causal_lm import ALGPT2LMHeadModel  # deferred: imports TensorFlow, Keras

        return ALGPT2LMHeadModel
    if name == "ALGPT2Backbone":
        from algpt2_tf.model import ALGPT2Backbone  # deferred: imports Keras

        return ALGPT2Backbone
    raise AttributeError(f"module 'algpt2_tf' has no attribute {name!r}")
