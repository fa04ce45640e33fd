"""Hugging Face `GPT2Config` (`config.json`) <-> `ALGPT2Config`.

An imported checkpoint becomes our GPT-2 mode (`embedding_size=None`, one
block per layer). Fields that would change the computation in a way our
model cannot reproduce (`scale_attn_weights=false`, an untied `lm_head`,
cross-attention...) are refused by name rather than silently ignored.
"""

import json
import os

from algpt2_tf.config import ALGPT2Config

HF_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu",
                  "gelu": "gelu_exact", "relu": "relu"}
"""Hugging Face `activation_function` -> ours. All three tanh forms are one function."""

OUR_ACTIVATIONS = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}

GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
                 "n_head": 12, "n_inner": None, "activation_function": "gelu_new",
                 "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
                 "layer_norm_epsilon": 1e-5, "initializer_range": 0.02}
"""`GPT2Config`'s defaults, for `config.json` files that leave a field out."""

# Field -> the value our model needs (anything else changes the math).
_REQUIRED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
             "add_cross_attention": False, "tie_word_embeddings": True}


def read_hf_config(directory):
    """The `config.json` of a Hugging Face folder, checked to be a GPT-2 we can load.

    Raises:
        FileNotFoundError: no `config.json`.
        ValueError: not a GPT-2 (`model_type`), or a field we cannot honour.
    """
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no config.json (not a Hugging Face model folder).")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object.")
    model_type = values.get("model_type")
    if model_type != "gpt2":
        raise ValueError(f"{path}: model_type is {model_type!r}; only 'gpt2' checkpoints convert.")
    for field, needed in _REQUIRED.items():
        if values.get(field, needed) != needed:
            raise ValueError(f"{path}: {field}={json.dumps(values[field])} is not supported "
                             f"(our GPT-2 needs {json.dumps(needed)}).")
    activation = values.get("activation_function", GPT2_DEFAULTS["activation_function"])
    if activation not in HF_ACTIVATIONS:
        raise ValueError(f"{path}: activation_function {activation!r} is not supported; "
                         f"expected one of {', '.join(HF_ACTIVATIONS)}.")
    return values


def config_from_hf(values):
    """Our `ALGPT2Config` (GPT-2 mode) for a checked Hugging Face config dict."""
    get = lambda name: values.get(name, GPT2_DEFAULTS[name])  # noqa: E731
    layers = get("n_layer")
    try:
        return ALGPT2Config(
            vocab_size=get("vocab_size"), max_positions=get("n_positions"),
            hidden_size=get("n_embd"), num_layers=layers, num_heads=get("n_head"),
            intermediate_size=get("n_inner"), embedding_size=None, num_layer_groups=layers,
            embedding_dropout=float(get("embd_pdrop")), attention_dropout=float(get("attn_pdrop")),
            residual_dropout=float(get("resid_pdrop")),
            layer_norm_epsilon=float(get("layer_norm_epsilon")),
            activation=HF_ACTIVATIONS[get("activation_function")],
            initializer_range=float(get("initializer_range")), sop_head=False)
    except ValueError as e:
        raise ValueError(f"config.json: {e}") from None


def hf_config_from(config, tied, eos_id=None):
    """The `config.json` dict of the GPT-2 that `gpt2_weights.export_tensors` writes.

    Args:
        config: our `ALGPT2Config` (any mode: the export expands it).
        tied: whether the exported `lm_head` is the token table (our GPT-2
            mode) or a separate tensor (a factorized head).
        eos_id: the tokenizer's `<|endoftext|>` id (also used as BOS), if known.
    """
    c = config
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.max_positions,
        "n_ctx": c.max_positions,  # read by older runtimes; transformers accepts it
        "n_embd": c.hidden_size,
        "n_layer": c.num_layers,
        "n_head": c.num_heads,
        "n_inner": None if c.intermediate_size == 4 * c.hidden_size else c.intermediate_size,
        "activation_function": OUR_ACTIVATIONS[c.activation],
        "resid_pdrop": c.residual_dropout,
        "embd_pdrop": c.embedding_dropout,
        "attn_pdrop": c.attention_dropout,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "initializer_range": c.initializer_range,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": tied,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "dtype": "float32",
    }
