"""Hugging Face GPT-2 checkpoints in and out (the conversions live in `hf.py`).

- `from_hf(path, cls)`: a Hugging Face GPT-2 folder (`config.json` +
  `model.safetensors`, any size) as our GPT-2-mode model (+ its tokenizer);
  `ALGPT2LMHeadModel.from_preset(path)` calls it with its own class.
- `import_hf(path, out)`: the same, written as a run folder (`model.keras`,
  `config.json`, `tokenizer/`), so `generate`, `evaluate`, `export` and
  `serve` work on it.
- `to_hf(model, out, tokenizer)` / `export_hf(model_path, out)`: any of our
  models (ALGPT2 included, exactly; see `gpt2_weights.py` for the algebra) as
  a folder `transformers.GPT2LMHeadModel.from_pretrained` loads.

Every conversion runs the converted tensors through an independent NumPy
GPT-2 (`numpy_gpt2.py`), compares the logits with our Keras model, and
writes its folder only when they agree: a failed conversion leaves nothing.
"""

from algpt2_tf.convert.hf import (ConversionWarning, HFExportReport, ImportReport, export_hf,
                                  from_hf, import_hf, is_hf_folder, to_hf)

__all__ = ["ConversionWarning", "HFExportReport", "ImportReport", "export_hf", "from_hf",
           "import_hf", "is_hf_folder", "to_hf"]
