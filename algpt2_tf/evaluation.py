"""Perplexity evaluation: token perplexity, bits per byte and word-level perplexity.

Sliding windows of `seq_len` tokens advance by `stride`; each window scores
only the tokens the previous window did not, so every token after the first
of a file is scored exactly once, with at least `seq_len - stride` tokens of
context (the protocol of Hugging Face's perplexity guide). Word-level perplexity
divides the total NLL by the number of whitespace-separated words, as
WikiText papers report it.
"""

import math

import keras
import numpy as np

from algpt2_tf.losses import IGNORE_INDEX, token_nll
from algpt2_tf.runtime import backend


def sliding_windows(ids, seq_len, stride):
    """`(inputs, labels)` windows over one token sequence; labels are aligned
    with the logits and `IGNORE_INDEX` where a token is not scored here.

    The first window scores its tokens 1..seq_len-1; each next window ends
    `stride` tokens later (at most `seq_len - 1`, so the token before its
    first target is still inside) and scores only the new tokens.
    """
    if stride <= 0 or stride > seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}.")
    ids = np.asarray(ids, np.int32)
    step = min(stride, seq_len - 1)
    windows = []
    scored_until, end = 1, min(seq_len, len(ids))  # token 0 has no context: never scored
    while scored_until < len(ids):
        begin = max(0, end - seq_len)
        window = ids[begin:end]
        labels = np.full(len(window), IGNORE_INDEX, np.int32)
        # logits at window position i predict token begin + i + 1
        labels[scored_until - begin - 1:end - begin - 1] = ids[scored_until:end]
        windows.append((window, labels))
        scored_until, end = end, min(end + step, len(ids))
    return windows


def evaluate_texts(model, tokenizer, texts, seq_len=None, stride=None, batch_size=8, verbose=1):
    """Scores texts with `model`; returns the metrics dict.

    Args:
        model: an `ALGPT2Backbone` (or the task, `ALGPT2LMHeadModel`).
        tokenizer: its `GPT2Tokenizer`.
        texts: strings, each scored as its own sequence.
        seq_len: window length (default: the model's `max_positions`).
        stride: window step (default: `seq_len // 2`).
        batch_size: windows per forward pass.
        verbose: show a progress bar.
    """
    seq_len = seq_len or model.config.max_positions
    if seq_len > model.config.max_positions:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_positions "
                         f"({model.config.max_positions}).")
    stride = stride or max(1, seq_len // 2)
    texts = list(texts)  # read twice: the windows, then `nll_metrics`' byte and word counts
    windows = []
    for text in texts:
        windows.extend(sliding_windows(tokenizer.encode(text), seq_len, stride))
    if not windows:
        raise ValueError("Nothing to evaluate: the text is empty or a single token.")

    @backend.traced
    def batch_nll(ids, mask, labels):
        logits = model({"input_ids": ids, "attention_mask": mask}, training=False)["logits"]
        nll, weight = token_nll(labels, logits)
        return keras.ops.sum(nll), keras.ops.sum(weight)

    total_nll = 0.0
    total_tokens = 0.0
    bar = keras.utils.Progbar(len(windows), unit_name="window") if verbose else None
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        ids = np.zeros((len(chunk), seq_len), np.int32)
        mask = np.zeros_like(ids)
        labels = np.full_like(ids, IGNORE_INDEX)
        for row, (w, lab) in enumerate(chunk):
            ids[row, :len(w)], mask[row, :len(w)], labels[row, :len(w)] = w, 1, lab
        nll, count = batch_nll(ids, mask, labels)
        total_nll += float(keras.ops.convert_to_numpy(nll))
        total_tokens += float(keras.ops.convert_to_numpy(count))
        if bar:
            bar.add(len(chunk))
    return dict(nll_metrics(total_nll, total_tokens, texts), seq_len=seq_len, stride=stride)


def nll_metrics(total_nll, total_tokens, texts):
    """Token and word perplexity and bits per byte of `texts` (strings; words split on
    whitespace, bytes in UTF-8) whose `total_tokens` scored tokens sum to `total_nll` (nats)."""
    byte_count = sum(len(text.encode("utf-8")) for text in texts)
    word_count = sum(len(text.split()) for text in texts)
    return {
        "token_perplexity": math.exp(total_nll / total_tokens),
        "bits_per_byte": total_nll / math.log(2) / max(byte_count, 1),
        "word_perplexity": math.exp(total_nll / max(word_count, 1)),
        "tokens": int(total_tokens),
        "words": word_count,
        "bytes": byte_count,
        "nll": total_nll,
    }
