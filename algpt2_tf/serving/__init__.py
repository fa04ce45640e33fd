"""Serving: TF Serving's REST protocol over exported SavedModels (`server.py`, importing no
model code), and the OpenAI-compatible API over a Keras model (`openai_api.py` over the
batching engine of `batching.py`)."""
