"""algpt2_tf: an ALBERT-style GPT-2 (ALGPT2) for TensorFlow / Keras 3."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from algpt2_tf.config import ALGPT2Config, list_presets  # noqa: E402
from algpt2_tf.model import ALGPT2LMHeadModel  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ALGPT2Config", "ALGPT2LMHeadModel", "list_presets", "__version__"]
