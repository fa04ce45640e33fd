"""Our weights <-> the tensors of a Hugging Face `GPT2LMHeadModel`.

Import fills our GPT-2 mode (no factorization, one block per layer) one to
one: GPT-2's `Conv1D` weights are `[in, out]`, as our kernels are.

Export writes any of our models as a plain GPT-2, exactly. The algebra,
with `T` the `[V, E]` token table, `P` the `[N, E]` position table, and the
input projection `x @ W_in + b_in` (`[E, H]`, `[H]`):

- Embedding: `(T[t] + P[p]) @ W_in + b_in = (T @ W_in)[t] + (P @ W_in + b_in)[p]`,
  so `wte = T @ W_in` and `wpe = P @ W_in + b_in` (the bias folds into the
  position table: every token gets exactly one position row).
- Layers: virtual layer `i` is written as `h.i` with the weights of the
  block it runs (`config.block_of_layer(i)`), so a shared block is written
  `num_layers` times. Its own LayerNorms (`per_layer_norms`) replace the
  block's, and its low-rank deltas merge into the kernels: `W + A @ B`.
- Head: our logits are `(LN_f(h) @ W_out + b_out) @ T^T`, with `W_out =
  W_in^T` and `b_out` the head's `projection_bias` under `tie_projection`.
  That is an untied `lm_head = T @ W_out^T` (`[V, H]`) plus a per-token bias
  `T @ b_out`, and GPT-2's `lm_head` has no bias. But `LN_f` ends with `+
  beta`, and `beta` reaches the logits only through `lm_head`: adding `d`
  with `W_out^T @ d = b_out` to `ln_f.bias` adds exactly `T @ b_out`. Such a
  `d` exists when `W_out` has rank E (E <= H); the minimum-norm one is
  solved in float64, and the logit error it leaves after rounding to
  float32 (`max |T @ (W_out^T @ d - b_out)|`) is measured and reported.
- The SOP head has no GPT-2 counterpart and is dropped.

Our GPT-2 mode exports with `tie_word_embeddings=true` (no `lm_head`
tensor), so a Hugging Face checkpoint round-trips to identical tensors.
"""

import dataclasses

import numpy as np

from algpt2_tf.layers.adapter import KERNELS

# GPT-2 tensor suffix of a layer -> (our module path in a DecoderBlock, the
# LayerNorm/Linear attribute), and the low-rank delta that merges into it.
LAYER_TENSORS = {
    "ln_1.weight": ("attention_norm", "gamma"),
    "ln_1.bias": ("attention_norm", "beta"),
    "attn.c_attn.weight": ("attention.qkv", "kernel"),
    "attn.c_attn.bias": ("attention.qkv", "bias"),
    "attn.c_proj.weight": ("attention.output_dense", "kernel"),
    "attn.c_proj.bias": ("attention.output_dense", "bias"),
    "ln_2.weight": ("mlp_norm", "gamma"),
    "ln_2.bias": ("mlp_norm", "beta"),
    "mlp.c_fc.weight": ("mlp_in", "kernel"),
    "mlp.c_fc.bias": ("mlp_in", "bias"),
    "mlp.c_proj.weight": ("mlp_out", "kernel"),
    "mlp.c_proj.bias": ("mlp_out", "bias"),
}
DELTA_OF = dict(zip(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                      "mlp.c_proj.weight"), KERNELS))
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
"""Old causal-mask buffers some checkpoints carry: not weights."""


def resolve(owner, dotted):
    """The attribute at a dotted path: `resolve(block, "attention.qkv")` is `block.attention.qkv`."""
    for name in dotted.split("."):
        owner = getattr(owner, name)
    return owner


def _layer_variable(model, layer, suffix):
    """Our variable that GPT-2 tensor `h.{layer}.{suffix}` reads from (before any delta)."""
    path, attribute = LAYER_TENSORS[suffix]
    owner = model.block_for_layer(layer)
    if path.endswith("_norm") and model.config.per_layer_norms:
        owner = model.adapters[layer]
    return getattr(resolve(owner, path), attribute)


def gpt2_shapes(config):
    """`{tensor name (no "transformer." prefix): shape}` of a GPT-2 with `config`'s sizes."""
    h, i, c = config.hidden_size, config.intermediate_size, config
    layer = {"ln_1.weight": (h,), "ln_1.bias": (h,), "attn.c_attn.weight": (h, 3 * h),
             "attn.c_attn.bias": (3 * h,), "attn.c_proj.weight": (h, h), "attn.c_proj.bias": (h,),
             "ln_2.weight": (h,), "ln_2.bias": (h,), "mlp.c_fc.weight": (h, i),
             "mlp.c_fc.bias": (i,), "mlp.c_proj.weight": (i, h), "mlp.c_proj.bias": (h,)}
    shapes = {"wte.weight": (c.vocab_size, h), "wpe.weight": (c.max_positions, h),
              "ln_f.weight": (h,), "ln_f.bias": (h,)}
    for n in range(c.num_layers):
        shapes.update({f"h.{n}.{suffix}": shape for suffix, shape in layer.items()})
    return shapes


def normalize_names(tensors, source="the checkpoint"):
    """Strips the `transformer.` prefix, drops the mask buffers and checks a
    stored `lm_head.weight` is the token table (our head is tied)."""
    out = {}
    for name, value in tensors.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        out[name[len("transformer."):] if name.startswith("transformer.") else name] = value
    head = out.pop("lm_head.weight", None)
    if head is not None and "wte.weight" in out and not np.array_equal(head, out["wte.weight"]):
        raise ValueError(f"{source}: lm_head.weight differs from wte.weight (an untied head); "
                         f"only GPT-2's tied head is supported.")
    return out


def check_gpt2_tensors(config, tensors, source="the checkpoint"):
    """Checks that `tensors` are exactly a GPT-2 of `config`'s sizes (every name, every
    shape) before anything is built from the config; returns `gpt2_shapes(config)`.

    Raises:
        ValueError: a missing, unexpected or wrongly shaped tensor (named).
    """
    expected = gpt2_shapes(config)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ValueError(f"{source} is missing tensor {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + ".")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{source} has tensor(s) a GPT-2 of this config does not: "
                         f"{', '.join(unexpected[:5])}.")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                             f"expected {shape} from config.json.")
    return expected


def load_gpt2_tensors(model, tensors, source="the checkpoint"):
    """Assigns GPT-2 tensors (names as `normalize_names` leaves them) to our
    GPT-2-mode `model`, after checking every name and shape.

    Raises:
        ValueError: a missing, unexpected or wrongly shaped tensor (named).
    """
    c = model.config
    if c.factorized or c.num_layer_groups != c.num_layers or c.has_layer_adapters:
        raise ValueError("load_gpt2_tensors needs a GPT-2-mode model (no factorization, sharing "
                         "or adapters).")
    check_gpt2_tensors(c, tensors, source)
    targets = {"wte.weight": model.embedding.token_embeddings,
               "wpe.weight": model.embedding.position_embeddings,
               "ln_f.weight": model.lm_head.final_norm.gamma,
               "ln_f.bias": model.lm_head.final_norm.beta}
    for n in range(c.num_layers):
        targets.update({f"h.{n}.{s}": _layer_variable(model, n, s) for s in LAYER_TENSORS})
    for name, variable in targets.items():
        variable.assign(np.asarray(tensors[name], dtype="float32"))


@dataclasses.dataclass
class ExpandedGPT2:
    """What `export_tensors` produced.

    Attributes:
        tensors: `{name: float32 array}`; body names without a prefix, plus
            `lm_head.weight` when the head is untied.
        tied: the head is the token table (`tie_word_embeddings`).
        head_bias_error: the largest logit error of folding the output
            projection's bias into `ln_f.bias` (0 when there is none).
        dropped: parts of our model the GPT-2 cannot hold (`sop_head`).
    """

    tensors: dict
    tied: bool
    head_bias_error: float = 0.0
    dropped: tuple = ()

    @property
    def num_parameters(self):
        return int(sum(v.size for v in self.tensors.values()))


def _value(variable):
    """A weight in float64, for the products of the algebra."""
    return np.asarray(variable.numpy(), dtype="float64")


def export_tensors(model):
    """Our model (any mode) as the exact tensors of a GPT-2; see the module docstring.

    Products and sums are computed in float64 and each tensor rounded once to
    float32 (one tensor at a time: a 1.5B model stays within memory).

    Raises:
        ValueError: a factorized head whose bias cannot fold (E > hidden).
    """
    if model.quantization is not None:
        raise ValueError(f"This model is quantized ({model.quantization}): convert or compress "
                         f"its float32 model.")
    c = model.config
    embedding, head = model.embedding, model.lm_head
    tensors = {}

    def put(name, value):
        tensors[name] = np.asarray(value, dtype="float32")

    beta = _value(head.final_norm.beta)
    head_bias_error = 0.0
    if c.factorized:
        token_table = _value(embedding.token_embeddings)
        w_in, b_in = _value(embedding.projection.kernel), _value(embedding.projection.bias)
        put("wte.weight", token_table @ w_in)
        put("wpe.weight", _value(embedding.position_embeddings) @ w_in + b_in)
        if c.tie_projection:
            w_out, b_out = w_in.T, _value(head.projection_bias)
        else:
            w_out, b_out = _value(head.projection.kernel), _value(head.projection.bias)
        put("lm_head.weight", token_table @ w_out.T)
        if np.any(b_out):
            if c.embedding_size > c.hidden_size:
                raise ValueError(
                    f"The output projection's bias cannot fold into a GPT-2 head when "
                    f"embedding_size ({c.embedding_size}) > hidden_size ({c.hidden_size}).")
            d = np.linalg.lstsq(w_out.T, b_out, rcond=None)[0]
            beta = beta + d
            folded = (beta.astype("float32").astype("float64") - _value(head.final_norm.beta))
            head_bias_error = float(np.max(np.abs(token_table @ (w_out.T @ folded - b_out))))
    else:
        put("wte.weight", embedding.token_embeddings.numpy())
        put("wpe.weight", embedding.position_embeddings.numpy())
    put("ln_f.weight", head.final_norm.gamma.numpy())
    put("ln_f.bias", beta)
    for n in range(c.num_layers):
        adapter = model.adapters[n] if model.adapters else None
        for suffix in LAYER_TENSORS:
            variable = _layer_variable(model, n, suffix)
            delta = DELTA_OF.get(suffix)
            if adapter is not None and adapter.lora_rank and delta:
                put(f"h.{n}.{suffix}", _value(variable)
                    + _value(adapter.lora_a[delta]) @ _value(adapter.lora_b[delta]))
            else:
                put(f"h.{n}.{suffix}", variable.numpy())
    return ExpandedGPT2(tensors=tensors, tied=not c.factorized, head_bias_error=head_bias_error,
                        dropped=("sop_head",) if model.sop_head is not None else ())
