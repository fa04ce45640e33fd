"""Exports: `.keras`, a TF Serving SavedModel and TFLite, verified before they land (see `api.py`)."""

from algpt2_tf.export.api import (FORMATS, PROBE_TEXT, ExportReport, ExportVerificationError,
                                  export_model, probe_batch, tflite_greedy)

__all__ = ["FORMATS", "PROBE_TEXT", "ExportReport", "ExportVerificationError", "export_model",
           "probe_batch", "tflite_greedy"]
