"""Serving exported SavedModels over TF Serving's REST protocol; imports no model code."""
