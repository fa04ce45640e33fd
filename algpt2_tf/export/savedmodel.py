"""SavedModel export for TF Serving: `serving_default` (ids -> logits) and `generate` (text -> text).

`generate` tokenizes in the graph with keras-hub's `BytePairTokenizer` (the
tf-text path, the same ids as `GPT2Tokenizer`), left-pads the batch, runs the
KV-cache decode loop of `algpt2_tf.generation.generator` as plain TensorFlow ops (no
XLA, so any TF Serving build runs it) and detokenizes in the graph. Loading
needs `import tensorflow_text` first (for its ops), not `algpt2_tf`.

Signatures:
    serving_default(input_ids int32 [-1, -1], attention_mask int32 [-1, -1])
        -> logits float32 [-1, -1, vocab]
    generate(prompts string [-1], max_new_tokens int32 [], temperature float32 [],
             top_k int32 [], top_p float32 [], seed int32 [])
        -> text string [-1] (prompt + continuation),
           token_ids int32 [-1, -1] (prompt + new ids, right-padded with -1)
    `top_k=1` (or `temperature=0`) is greedy.
"""

import tensorflow as tf

from algpt2_tf.generation.decode_tricks import DecodePlan, DecodeTricks
from algpt2_tf.generation.generator import decode
from algpt2_tf.tokenizer import EOS_TOKEN

PAD_ID = -1


def left_align_to_right(values, lengths):
    """Moves each row's first `lengths[b]` entries of a right-padded
    `[batch, T]` tensor to the row's end (left padding with the pad values)."""
    width = tf.shape(values)[1]
    shift = width - lengths
    index = tf.math.floormod(tf.range(width)[None, :] - shift[:, None], width)
    return tf.gather(values, index, batch_dims=1)


class ServingModule(tf.Module):
    """The exported object; its two functions are the SavedModel's signatures."""

    def __init__(self, model, tokenizer, max_length):
        super().__init__()
        self.model = model
        self.text_tokenizer = tokenizer.in_graph()
        self.eos_id = tokenizer.eos_id
        self.max_length = max_length
        # autograph=False: no Python control flow on tensors to convert; skipping AutoGraph's
        # source conversion took a small model's SavedModel export from 31.6 to 23.5 s
        # (AMD EPYC Zen 4, 2026-12-05).
        self.serving_default = tf.function(self._logits, autograph=False, input_signature=[
            tf.TensorSpec([None, None], tf.int32, name="input_ids"),
            tf.TensorSpec([None, None], tf.int32, name="attention_mask")])
        self.generate = tf.function(self._generate, autograph=False, input_signature=[
            tf.TensorSpec([None], tf.string, name="prompts"),
            tf.TensorSpec([], tf.int32, name="max_new_tokens"),
            tf.TensorSpec([], tf.float32, name="temperature"),
            tf.TensorSpec([], tf.int32, name="top_k"),
            tf.TensorSpec([], tf.float32, name="top_p"),
            tf.TensorSpec([], tf.int32, name="seed")])

    def _logits(self, input_ids, attention_mask):
        outputs = self.model({"input_ids": input_ids, "attention_mask": attention_mask})
        return {"logits": outputs["logits"]}

    def _generate(self, prompts, max_new_tokens, temperature, top_k, top_p, seed):
        # An empty prompt starts from <|endoftext|>, GPT-2's document start.
        sources = tf.where(tf.equal(tf.strings.length(prompts), 0), EOS_TOKEN, prompts)
        ragged = tf.cast(self.text_tokenizer(sources), tf.int32)
        lengths = tf.cast(ragged.row_lengths(), tf.int32)
        prompt_len = tf.reduce_max(lengths)
        checks = [
            tf.debugging.assert_positive(
                max_new_tokens, message="max_new_tokens must be positive"),
            tf.debugging.assert_less_equal(
                prompt_len + max_new_tokens, self.max_length,
                message=f"prompt tokens + max_new_tokens exceed the exported max_length "
                        f"({self.max_length})"),
            # Comparisons with NaN are false: a NaN fails these too.
            tf.debugging.assert_equal(
                tf.logical_and(temperature >= 0.0, tf.math.is_finite(temperature)), True,
                message="temperature must be a finite number >= 0 (0 = greedy)"),
            tf.debugging.assert_non_negative(top_k, message="top_k must be >= 0 (0 = off)"),
            tf.debugging.assert_equal(tf.logical_and(top_p > 0.0, top_p <= 1.0), True,
                                      message="top_p must be in (0, 1]"),
        ]
        with tf.control_dependencies(checks):
            right = ragged.to_tensor(default_value=0)
        ids = left_align_to_right(right, lengths)
        mask = left_align_to_right(tf.sequence_mask(lengths, prompt_len, dtype=tf.int32), lengths)
        params = (temperature, top_k, top_p, tf.constant(1.0))
        # TF Serving runs plain TensorFlow: the exact tricks, without the row-major copies of
        # XLA's one-row products.
        plan = DecodePlan(self.model, DecodeTricks.for_cpu())
        new, counts = decode(self.model, ids, mask, max_new_tokens, params, seed,
                             tf.constant([self.eos_id]), self.max_length, plan)
        last = tf.gather(new, tf.maximum(counts - 1, 0), batch_dims=1)
        ended = tf.logical_and(counts > 0, tf.equal(last, self.eos_id))
        text_ids = tf.RaggedTensor.from_tensor(new, lengths=counts - tf.cast(ended, tf.int32))
        continuation = self.text_tokenizer.detokenize(text_ids)
        new_ragged = tf.RaggedTensor.from_tensor(new, lengths=counts)
        token_ids = tf.concat([ragged, new_ragged], axis=1).to_tensor(default_value=PAD_ID)
        return {"text": tf.strings.join([prompts, continuation]), "token_ids": token_ids}


def save(model, tokenizer, path, max_length):
    """Writes the SavedModel (both signatures) to `path`."""
    module = ServingModule(model, tokenizer, max_length)
    # The functions themselves, traced once inside the save: concrete functions traced
    # before it were traced again by it (its context is part of the trace key); a tiny
    # model's save took 7.1 s so, 4.6 s now (AMD EPYC Zen 4, 2026-12-06).
    tf.saved_model.save(module, path, signatures={
        "serving_default": module.serving_default, "generate": module.generate})
