"""A plain NumPy GPT-2 forward pass over Hugging Face tensor names: the
independent reference each conversion checks itself against.

It shares no code with our Keras model, needs no PyTorch, and reads the
exact tensors that land in `model.safetensors`, so a conversion that got a
transpose, a fold or a layer order wrong is caught before anything is
written. (The tests also compare with `transformers` itself.)
"""

import math

import numpy as np


def _layer_norm(x, weight, bias, epsilon):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + epsilon) * weight + bias


def _activation(name):
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if name == "gelu":
        erf = np.vectorize(math.erf)
        return lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2)))
    if name == "relu":
        return lambda x: np.maximum(x, 0)
    raise ValueError(f"Unknown activation_function {name!r}.")


def gpt2_logits(tensors, hf_config, ids):
    """Logits `[len(ids), vocab]` (float64) of one unpadded sequence.

    Args:
        tensors: `{name: array}` with GPT-2 names, no `transformer.` prefix;
            `lm_head.weight` when the head is untied.
        hf_config: the `config.json` dict (`n_layer`, `n_head`, ...).
        ids: a list of token ids.
    """
    def t(name):  # float64 one tensor at a time (a 1.5B model would not fit otherwise)
        return np.asarray(tensors[name], dtype="float64")

    eps = hf_config["layer_norm_epsilon"]
    heads = hf_config["n_head"]
    act = _activation(hf_config["activation_function"])
    ids = np.asarray(ids)
    seq = len(ids)
    x = (np.asarray(tensors["wte.weight"][ids], dtype="float64")
         + np.asarray(tensors["wpe.weight"][:seq], dtype="float64"))
    hidden = x.shape[-1]
    size = hidden // heads
    hidden_mask = np.triu(np.ones((seq, seq), bool), k=1)
    for n in range(hf_config["n_layer"]):
        p = lambda name: t(f"h.{n}.{name}")  # noqa: E731
        h = _layer_norm(x, p("ln_1.weight"), p("ln_1.bias"), eps)
        qkv = h @ p("attn.c_attn.weight") + p("attn.c_attn.bias")
        q, k, v = (a.reshape(seq, heads, size).transpose(1, 0, 2) for a in np.split(qkv, 3, -1))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(size)
        scores = np.where(hidden_mask, -np.inf, scores)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attended = (probs @ v).transpose(1, 0, 2).reshape(seq, hidden)
        x = x + attended @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
        h = _layer_norm(x, p("ln_2.weight"), p("ln_2.bias"), eps)
        h = act(h @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias"))
        x = x + h @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
    x = _layer_norm(x, t("ln_f.weight"), t("ln_f.bias"), eps)
    return x @ t("lm_head.weight" if "lm_head.weight" in tensors else "wte.weight").T
