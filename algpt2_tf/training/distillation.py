"""Knowledge distillation: a frozen teacher's next-token distribution as a second target.

`ALGPT2LMHeadModel.set_teacher(teacher, weight, temperature)` makes the
training loss

    LM loss + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))

averaged over the tokens the LM loss counts (Hinton et al., 2015; the T^2
keeps the gradient scale independent of T). The teacher runs in the same
step, in inference mode, and gets no gradient; `fit` logs the KL part as
`distill_loss` beside `lm_loss`. `algpt2 train --teacher MODEL` wires it up. The
loss term is `losses.kl_to_teacher` (the model core computes it); this module loads and
checks the teacher.
"""

import json
import os

from algpt2_tf.saving import load_model, load_tokenizer_for

PRECISIONS = ("float32", "bf16")
"""How the teacher computes: float32, or bfloat16 weights and activations (logits stay float32)."""


def _vocabulary(tokenizer):
    with open(tokenizer.vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(tokenizer.merges_path, encoding="utf-8") as f:
        merges = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#version")]
    return vocab, merges


def load_teacher(path, vocab_size, tokenizer, precision="float32"):
    """Loads a frozen teacher for a student of `vocab_size` ids trained with `tokenizer`.

    The teacher may be any model this project loads (a run folder or
    `.keras` file: our GPT-2 mode, an imported Hugging Face checkpoint, a
    larger ALGPT2).

    Raises:
        FileNotFoundError: no model at `path`.
        ValueError: a different vocabulary size, or a tokenizer whose
            vocabulary or merges differ from `tokenizer`'s.
    """
    from algpt2_tf.causal_lm import ALGPT2LMHeadModel  # deferred: imports TensorFlow, Keras

    if precision not in PRECISIONS:
        raise ValueError(f"--teacher-precision must be one of {PRECISIONS}, got {precision!r}.")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No teacher model at {path}.")
    teacher = load_model(path, ALGPT2LMHeadModel)
    if teacher.config.vocab_size != vocab_size:
        raise ValueError(f"The teacher {path} has vocab_size {teacher.config.vocab_size}, the "
                         f"student {vocab_size}: distillation needs the same vocabulary.")
    if _vocabulary(load_tokenizer_for(path)) != _vocabulary(tokenizer):
        raise ValueError(f"The teacher {path} was trained with another tokenizer than the "
                         f"student's ({tokenizer.directory}): distillation needs the same vocabulary.")
    if precision == "bf16":
        weights = teacher.get_weights()
        teacher = ALGPT2LMHeadModel(teacher.config, dtype="mixed_bfloat16")
        teacher.set_weights(weights)
    teacher.trainable = False
    return teacher
