"""algpt2_tf: an ALBERT-style GPT-2 (ALGPT2) for TensorFlow / Keras 3.

`import algpt2_tf` registers the model and its layers with Keras (so that
`keras.models.load_model` reads our `.keras` files), which imports TensorFlow.
The `algpt2` command defers that (`ALGPT2_DEFER_TENSORFLOW=1`, set by
`algpt2_command.py` while it imports the command line): `--help` and `info`
answer without TensorFlow, and each command imports what it uses.
"""

import os

from algpt2_tf import tf_startup  # noqa: F401  (reads the user's TF_CPP_MIN_LOG_LEVEL first)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from algpt2_tf.config import ALGPT2Config, list_presets  # noqa: E402
from algpt2_tf.pretrained import list_pretrained  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ALGPT2Config", "ALGPT2LMHeadModel", "list_presets", "list_pretrained", "__version__"]

if os.environ.get("ALGPT2_DEFER_TENSORFLOW") != "1":
    from algpt2_tf.model import ALGPT2LMHeadModel  # noqa: E402
else:
    def __getattr__(name):
        if name == "ALGPT2LMHeadModel":
            from algpt2_tf.model import ALGPT2LMHeadModel

            return ALGPT2LMHeadModel
        raise AttributeError(f"module 'algpt2_tf' has no attribute {name!r}")
