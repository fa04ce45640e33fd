"""Compression: a trained GPT-2 (or any model of ours) turned into an ALGPT2 that starts from what it knows.

After Relaxed Recursive Transformers (Bae et al., 2024). The teacher is
first read as plain GPT-2 tensors (`convert.gpt2_weights.export_tensors`,
exact for any of our models), then:

- Shared blocks: block g starts from the teacher layers it serves (student
  layer i stands for teacher layer i): their mean (`average`) or the first
  of them (`stepwise`). With `per_layer_norms`, each virtual layer keeps its
  teacher layer's LayerNorms.
- Low-rank deltas (`lora_rank` r): each virtual layer's `A @ B` starts as
  the rank-r truncated SVD of (its teacher kernel - the shared kernel), the
  best rank-r approximation: at full rank every layer's kernels are the
  teacher's exactly. (Biases stay shared.)
- Factorized embedding: the truncated SVD `wte ~ U S V^T` with E components
  gives the token table `U S` and the projection `V^T` (E -> hidden); the
  positions map into E-space as `wpe @ V`, and the projection's bias takes
  the mean of what that leaves out. With E = hidden the embedding is the
  teacher's exactly.
- Head: the student's logits are `(LN_f(h) @ W_out + b_out) @ T^T`; the
  teacher's `LN_f(h) @ L^T` (L = its `lm_head`, or `wte` when tied). `W_out
  = (pinv(T) @ L)^T`, `b_out = 0` is the least-squares match (`V` itself
  for a tied teacher); with `tie_projection` the head reuses `V^T`.
  `LN_f` is the teacher's.
"""

import dataclasses
import os
import shutil
import warnings

import numpy as np

from algpt2_tf.config import ALGPT2Config
from algpt2_tf.runtime.files import atomic_write_json, new_directory, require_new_directory
from algpt2_tf.saving import load_model, load_tokenizer_for, resolve_model_path

INITS = ("average", "stepwise")

SHARING_FIELDS = ("embedding_size", "num_layer_groups", "group_order", "tie_projection",
                  "per_layer_norms", "lora_rank", "sop_head", "sop_loss_weight")
"""What a student takes from its preset; the shape fields come from the teacher."""
SHAPE_FIELDS = ("vocab_size", "max_positions", "hidden_size", "num_heads", "intermediate_size",
                "layer_norm_epsilon", "activation")
"""Fields a compressed student shares with its teacher (the init copies weights of these shapes)."""


def student_config(teacher_config, preset="algpt2", overrides=None, lora_rank=None):
    """The student's config: the teacher's shape and depth, the preset's sharing, then `overrides`.

    Raises:
        ValueError: an override that changes a shape field, or a student
            deeper than the teacher (layer i starts from teacher layer i).
    """
    values = {f: getattr(teacher_config, f) for f in SHAPE_FIELDS}
    values["num_layers"] = teacher_config.num_layers
    values.update({f: getattr(teacher_config, f) for f in ("embedding_dropout",
                                                         "attention_dropout", "residual_dropout",
                                                         "initializer_range")})
    if preset is not None:
        shared = ALGPT2Config.from_preset(preset)
        values.update({f: getattr(shared, f) for f in SHARING_FIELDS})
    values.update(overrides or {})
    if lora_rank is not None:
        values["lora_rank"] = lora_rank
    config = ALGPT2Config.from_dict(values)
    for field in SHAPE_FIELDS:
        if getattr(config, field) != getattr(teacher_config, field):
            raise ValueError(f"The student's {field} ({getattr(config, field)}) differs from the "
                             f"teacher's ({getattr(teacher_config, field)}): compression keeps "
                             f"the teacher's shape.")
    if config.embedding_size is not None and config.embedding_size > config.hidden_size:
        raise ValueError(f"The student's embedding_size ({config.embedding_size}) exceeds the "
                         f"hidden size ({config.hidden_size}): the SVD of the teacher's token "
                         f"table has at most that many components.")
    if config.num_layers > teacher_config.num_layers:
        raise ValueError(f"The student has {config.num_layers} layers but the teacher only "
                         f"{teacher_config.num_layers}: student layer i starts from teacher "
                         f"layer i.")
    if config.num_layers % config.num_layer_groups:
        raise ValueError(f"num_layers ({config.num_layers}) must be divisible by "
                         f"num_layer_groups ({config.num_layer_groups}).")
    return config


def truncated_svd(matrix, rank):
    """`(left [m, r], right [r, n])` with `left @ right` the best rank-r approximation,
    the singular values split evenly (square roots) between the two."""
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def _teacher_tensors(teacher):
    from algpt2_tf.convert.gpt2_weights import export_tensors  # deferred: imports Keras

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the teacher's SOP head is not needed
        expanded = export_tensors(teacher)
    tensors = {k: v.astype("float64") for k, v in expanded.tensors.items()}
    tensors.setdefault("lm_head.weight", tensors["wte.weight"])
    return tensors


def compress(teacher, config, init="average"):
    """A student `ALGPT2LMHeadModel(config)` initialized from `teacher` (see the module docstring).

    Args:
        teacher: any `ALGPT2LMHeadModel` with `config`'s shape.
        config: the student's config (see `student_config`).
        init: `average` or `stepwise` (the first layer of each block's group).
    """
    from algpt2_tf.causal_lm import ALGPT2LMHeadModel  # deferred: imports TensorFlow, Keras
    # Deferred: imports Keras.
    from algpt2_tf.convert.gpt2_weights import DELTA_OF, LAYER_TENSORS, resolve

    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}.")
    t = _teacher_tensors(teacher)
    student = ALGPT2LMHeadModel(config)
    c = config

    # Embedding and head.
    emb, head = student.embedding, student.lm_head
    wte, wpe, lm_head = t["wte.weight"], t["wpe.weight"], t["lm_head.weight"]
    if c.factorized:
        u, s, vt = np.linalg.svd(wte, full_matrices=False)
        e = c.embedding_size
        table, basis = u[:, :e] * s[:e], vt[:e]  # [V, E], [E, H]
        positions = wpe @ basis.T
        emb.token_embeddings.assign(table)
        emb.position_embeddings.assign(positions)
        emb.projection.kernel.assign(basis)
        emb.projection.bias.assign((wpe - positions @ basis).mean(axis=0))
        if c.tie_projection:
            head.projection_bias.assign(np.zeros(e))
        else:
            head.projection.kernel.assign((np.linalg.pinv(table) @ lm_head).T)
            head.projection.bias.assign(np.zeros(e))
    else:
        emb.token_embeddings.assign(wte)
        emb.position_embeddings.assign(wpe)
        if not np.array_equal(lm_head, wte):
            raise ValueError("The teacher's head is untied; a student without a factorized "
                             "embedding (embedding_size=None) cannot hold it.")
    head.final_norm.gamma.assign(t["ln_f.weight"])
    head.final_norm.beta.assign(t["ln_f.bias"])

    # Shared blocks, then what each virtual layer owns.
    layers_of = {g: [i for i in range(c.num_layers) if c.block_of_layer(i) == g]
                 for g in range(c.num_layer_groups)}
    shared = {}
    for g, layers in layers_of.items():
        chosen = layers if init == "average" else layers[:1]
        for suffix, (path, attribute) in LAYER_TENSORS.items():
            value = np.mean([t[f"h.{i}.{suffix}"] for i in chosen], axis=0)
            shared[g, suffix] = value
            if path.endswith("_norm") and c.per_layer_norms:
                continue
            getattr(resolve(student.blocks[g], path), attribute).assign(value)
    for i, adapter in enumerate(student.adapters):
        if c.per_layer_norms:
            for suffix, (path, attribute) in LAYER_TENSORS.items():
                if path.endswith("_norm"):
                    getattr(getattr(adapter, path), attribute).assign(t[f"h.{i}.{suffix}"])
        if c.lora_rank:
            for suffix, kernel in DELTA_OF.items():
                residual = t[f"h.{i}.{suffix}"] - shared[c.block_of_layer(i), suffix]
                a, b = truncated_svd(residual, c.lora_rank)
                rank = a.shape[1]  # min(rank, the kernel's smaller side)
                adapter.lora_a[kernel].assign(np.pad(a, ((0, 0), (0, c.lora_rank - rank))))
                adapter.lora_b[kernel].assign(np.pad(b, ((0, c.lora_rank - rank), (0, 0))))
    return student


@dataclasses.dataclass
class CompressReport:
    """What `compress_to_run` wrote, and the held-out figures right after init."""

    path: str
    teacher_parameters: int
    student_parameters: int
    init: str
    evaluation: dict  # {"teacher"|"student"|"random_init": {set: metrics}}

    def summary(self):
        lines = [f"Wrote a compressed student ({self.student_parameters:,} parameters, "
                 f"{self.student_parameters / self.teacher_parameters:.1%} of the teacher's "
                 f"{self.teacher_parameters:,}; init {self.init}) to {self.path}"]
        if self.evaluation:
            lines.append("| model | parameters | word ppl | token ppl |")
            lines.append("|---|---:|---:|---:|")
            params = {"teacher": self.teacher_parameters, "student": self.student_parameters,
                      "random_init": self.student_parameters}
            for name, metrics in self.evaluation.items():
                lines.append(f"| {name} | {params[name]:,} | {metrics['word_perplexity']:.2f} | "
                             f"{metrics['token_perplexity']:.2f} |")
        return "\n".join(lines)


def compress_to_run(teacher_path, out, preset="algpt2", overrides=None, init="average",
                    lora_rank=None, eval_texts=None, seq_len=128, log=print):
    """`algpt2 compress`: writes the initialized student as a run folder `out`
    (`model.keras`, `config.json`, `compress.json`, the teacher's `tokenizer/`),
    ready for `algpt2 train --init-model out [--teacher teacher_path]`.

    With `eval_texts`, the teacher, the student and a randomly initialized
    student are evaluated on them first (held-out perplexity right after init).
    """
    from algpt2_tf.causal_lm import ALGPT2LMHeadModel  # deferred: imports TensorFlow, Keras

    require_new_directory(out)
    if not os.path.exists(teacher_path):
        raise FileNotFoundError(f"No teacher model at {teacher_path}.")
    teacher = load_model(teacher_path, ALGPT2LMHeadModel)
    config = student_config(teacher.config, preset, overrides, lora_rank)
    student = compress(teacher, config, init)
    evaluation = {}
    if eval_texts:
        from algpt2_tf.evaluation import evaluate_texts  # deferred: imports Keras

        tokenizer = load_tokenizer_for(teacher_path)
        length = min(seq_len, config.max_positions)
        for name, model in (("teacher", teacher), ("student", student),
                            ("random_init", ALGPT2LMHeadModel(config))):
            log(f"Evaluating the {name.replace('_', ' ')} ...")
            metrics = evaluate_texts(model, tokenizer, eval_texts, seq_len=length, verbose=0)
            evaluation[name] = {k: metrics[k] for k in ("word_perplexity", "token_perplexity",
                                                        "bits_per_byte", "tokens")}
    teacher_dir = os.path.dirname(resolve_model_path(teacher_path))
    with new_directory(out) as tmp:
        student.save(os.path.join(tmp, "model.keras"))
        config.to_json_file(os.path.join(tmp, "config.json"))
        if os.path.isdir(os.path.join(teacher_dir, "tokenizer")):
            shutil.copytree(os.path.join(teacher_dir, "tokenizer"), os.path.join(tmp, "tokenizer"))
        atomic_write_json(os.path.join(tmp, "compress.json"), {
            "teacher": os.path.abspath(teacher_path), "init": init, "preset": preset,
            "overrides": overrides or {}, "lora_rank": config.lora_rank,
            "teacher_parameters": teacher.count_params(),
            "student_parameters": student.count_params(), "evaluation": evaluation})
    return CompressReport(out, teacher.count_params(), student.count_params(), init, evaluation)
