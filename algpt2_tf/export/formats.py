"""The export formats and weight quantizations, named once for the exporters and the CLI."""

FORMATS = ("keras", "savedmodel", "tflite")
QUANTIZATIONS = ("none", "fp16", "int8", "int4")
"""Weight formats. TFLite: all four (`tflite.convert`; int4: `int4.py`). `.keras` and
SavedModel: "int8" is Keras' own `model.quantize("int8")` (weight-only)."""
ENGINE_QUANTIZATIONS = ("none", "int8", "int4")
"""The weights of a LiteRT engine build (`litert_engine`, `--engine litert --quantize`): "none" is
float32, whose greedy text is the Keras model's."""
