"""The export formats and weight quantizations, named once for the exporters and the CLI."""

FORMATS = ("keras", "savedmodel", "tflite")
QUANTIZATIONS = ("none", "fp16", "int8", "int4")
"""Weight formats. TFLite: all four (`tflite.convert`; int4: `int4.py`). `.keras` and
SavedModel: "int8" is Keras' own `model.quantize("int8")` (weight-only)."""
