"""Exports: `.keras`, a TF Serving SavedModel and TFLite, verified before they land (see `api.py`).

`api.export_model(path, ...)` exports a model file; `api.export(model, tokenizer, ...)` an
in-memory one (the LiteRT engine builds through it).
"""

from algpt2_tf.export.api import (FORMATS, PROBE_TEXT, ExportReport, ExportVerificationError,
                                  export, export_model, probe_batch, tflite_greedy)

__all__ = ["FORMATS", "PROBE_TEXT", "ExportReport", "ExportVerificationError", "export",
           "export_model", "probe_batch", "tflite_greedy"]
