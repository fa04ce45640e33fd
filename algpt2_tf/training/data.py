"""tf.data pipelines: text files -> token ids (cached on disk) -> packed LM blocks or SOP pairs.

The token stream of a corpus is its documents' ids, each followed by
`<|endoftext|>`. `prepare_corpus` writes it once to `CACHE/train.npy` (and
`valid.npy`) with the document offsets, so later runs never re-tokenize.

Both pipelines are pure functions of `(seed, step)`: batch `s` is the same
whatever happened before, so a resumed run continues with exactly the batch
an uninterrupted run would have seen (`start_step`).

Sentence-order prediction (SOP): an example is two consecutive segments A, B
of one document, each `seq_len / 2` tokens, kept as `A B` (label 0) or
swapped to `B A` (label 1) with probability 0.5. On a swapped example the LM
loss covers only the first segment (B predicting B): every target that
follows the swap point would teach the model to predict text in the wrong
order, so those labels are `IGNORE_INDEX`.
"""

import hashlib
import json
import os

import numpy as np
import tensorflow as tf

from algpt2_tf.losses import IGNORE_INDEX
from algpt2_tf.runtime.files import (atomic_path, atomic_write_json, cache_root, expand_files,
                                     read_documents)

CACHE_VERSION = 1


# ------------------------------------------------------------------- caching
def _files_signature(paths):
    return [{"path": os.path.abspath(p), "size": os.path.getsize(p),
             "mtime_ns": os.stat(p).st_mtime_ns} for p in paths]


def prepare_corpus(patterns, cache_dir, tokenizer, valid_fraction=0.0, text_key="text"):
    """Tokenizes the files once and caches the ids; returns the cache metadata.

    A cache whose files, tokenizer and split match is reused as it is.

    Args:
        patterns: glob(s) of `.txt` / `.jsonl` files.
        cache_dir: where `train.npy`, `train_docs.npy`, `valid.npy` and
            `meta.json` go.
        tokenizer: a `GPT2Tokenizer`.
        valid_fraction: the share of the token stream (its tail) held out
            for validation, in [0, 0.5].
    """
    if not 0.0 <= valid_fraction <= 0.5:
        raise ValueError(f"valid_fraction must be in [0, 0.5], got {valid_fraction}.")
    paths = expand_files(patterns, "training files")
    wanted = {"version": CACHE_VERSION, "files": _files_signature(paths),
              "tokenizer": tokenizer.fingerprint, "valid_fraction": valid_fraction,
              "text_key": text_key}
    meta_path = os.path.join(cache_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if {k: meta.get(k) for k in wanted} == wanted:
            return meta
    documents = list(read_documents(paths, text_key))
    if not documents:
        raise ValueError(f"The corpus is empty: no text in {', '.join(paths)}.")
    encoded = tokenizer.encode_batch(documents)
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
    lengths = np.array([len(ids) + 1 for ids in encoded], np.int64)
    stream = np.empty(int(lengths.sum()), dtype)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for start, ids in zip(offsets, encoded):
        stream[start:start + len(ids)] = ids
        stream[start + len(ids)] = tokenizer.eos_id
    split = len(stream) - int(round(len(stream) * valid_fraction))
    os.makedirs(cache_dir, exist_ok=True)
    _atomic_save(os.path.join(cache_dir, "train.npy"), stream[:split])
    _atomic_save(os.path.join(cache_dir, "train_docs.npy"), offsets[offsets < split])
    _atomic_save(os.path.join(cache_dir, "valid.npy"), stream[split:])
    meta = dict(wanted, train_tokens=int(split), valid_tokens=int(len(stream) - split),
                documents=len(documents), characters=sum(len(d) for d in documents))
    atomic_write_json(meta_path, meta)
    return meta


def _atomic_save(path, array):
    with atomic_path(path, ".npy") as tmp:
        np.save(tmp, array)


def load_split(cache_dir, split="train"):
    """The cached token stream of `split` ("train" or "valid") as int32."""
    return np.load(os.path.join(cache_dir, f"{split}.npy")).astype(np.int32)


def load_document_offsets(cache_dir):
    return np.load(os.path.join(cache_dir, "train_docs.npy"))


def default_cache_dir(patterns, tokenizer, valid_fraction=None):
    """The token cache of a file set: a folder under `cache_root()` named by
    the absolute globs, the validation share and the tokenizer."""
    keys = [os.path.abspath(os.path.expanduser(p)) for p in patterns]
    if valid_fraction is not None:
        keys.append(f"valid={valid_fraction}")
    keys = sorted(keys)
    key = hashlib.sha256(json.dumps([keys, tokenizer.fingerprint]).encode()).hexdigest()
    return os.path.join(cache_root(), key[:16])


# ------------------------------------------------------------------ pipelines
def _epoch_batch_indices(step, batch_size, num_items, seed):
    """Indices of the items in batch `step`: epoch `e` visits the items in a
    stateless permutation seeded by `(seed, e)`; a partial last batch of an
    epoch is dropped."""
    batches_per_epoch = num_items // batch_size
    epoch = step // batches_per_epoch
    within = step % batches_per_epoch
    order = tf.random.experimental.stateless_shuffle(
        tf.range(num_items, dtype=tf.int64), seed=tf.stack([tf.cast(seed, tf.int64), epoch]))
    return order[within * batch_size:(within + 1) * batch_size]


def count_examples(num_tokens, seq_len, document_offsets=None):
    """`(count, name)` of the examples a stream of `num_tokens` yields: packed
    blocks, or SOP pairs when `document_offsets` is given."""
    if document_offsets is None:
        return num_blocks(num_tokens, seq_len), _examples_name(seq_len, sop=False)
    starts = sop_pair_starts(np.asarray(document_offsets), num_tokens, seq_len)
    return len(starts), _examples_name(seq_len, sop=True)


def _examples_name(seq_len, sop):
    return f"SOP pairs of {seq_len} tokens inside one document" if sop else f"blocks of {seq_len} tokens"


def check_enough(num_items, batch_size, what):
    if num_items < batch_size:
        raise ValueError(
            f"The corpus holds {num_items} {what}, fewer than one batch ({batch_size}). "
            "Use more text, a shorter --seq-len or a smaller --batch-size.")


def num_blocks(num_tokens, seq_len):
    return int(num_tokens) // int(seq_len)


def lm_dataset(tokens, seq_len, batch_size, seed=0, start_step=0, num_steps=None, shuffle=True):
    """Packed causal-LM batches `{"input_ids", "attention_mask"}` of `[batch, seq_len]`.

    The stream is cut into `len // seq_len` non-overlapping blocks; batch
    `s` is a pure function of `(seed, s)`.

    Args:
        tokens: int array, the token stream.
        seq_len: block length.
        batch_size: blocks per batch.
        seed: shuffling seed.
        start_step: the first batch to produce (to resume).
        num_steps: how many batches (`None`: endless).
        shuffle: `False` keeps the stream order (one pass, for evaluation).
    """
    count = num_blocks(len(tokens), seq_len)
    check_enough(count, batch_size, _examples_name(seq_len, sop=False))
    blocks = tf.constant(np.asarray(tokens[:count * seq_len], np.int32).reshape(count, seq_len))

    def make_batch(step):
        if shuffle:
            index = _epoch_batch_indices(step, batch_size, count, seed)
        else:
            index = tf.range(step * batch_size, (step + 1) * batch_size, dtype=tf.int64) % count
        ids = tf.gather(blocks, index)
        return {"input_ids": ids, "attention_mask": tf.ones_like(ids)}

    return _steps(start_step, num_steps).map(make_batch, num_parallel_calls=tf.data.AUTOTUNE,
                                              deterministic=True).prefetch(tf.data.AUTOTUNE)


def _steps(start_step, num_steps):
    end = np.iinfo(np.int64).max if num_steps is None else start_step + num_steps
    return tf.data.Dataset.range(start_step, end)


def sop_pair_starts(document_offsets, stream_length, seq_len):
    """Start offsets of non-overlapping `seq_len` windows lying inside one document."""
    ends = np.append(document_offsets[1:], stream_length)
    starts = [np.arange(s, e - seq_len + 1, seq_len) for s, e in zip(document_offsets, ends)]
    return np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64)


def sop_dataset(tokens, document_offsets, seq_len, batch_size, seed=0, start_step=0,
                num_steps=None):
    """SOP batches: `input_ids`, `attention_mask`, `labels` (LM targets) and `sop_labels`.

    See the module docstring for how swapped pairs are built and what their
    LM labels are.
    """
    if seq_len % 2:
        raise ValueError(f"SOP needs an even seq_len, got {seq_len}.")
    starts = sop_pair_starts(np.asarray(document_offsets), len(tokens), seq_len)
    check_enough(len(starts), batch_size, _examples_name(seq_len, sop=True))
    stream = tf.constant(np.asarray(tokens, np.int32))
    starts_t = tf.constant(starts)
    half = seq_len // 2
    window = tf.range(seq_len, dtype=tf.int64)

    def make_batch(step):
        index = _epoch_batch_indices(step, batch_size, len(starts), seed)
        ids = tf.gather(stream, tf.gather(starts_t, index)[:, None] + window[None, :])
        swap = tf.random.stateless_uniform(
            [batch_size], seed=tf.stack([tf.cast(seed, tf.int64) + 1, step])) < 0.5
        swapped = tf.concat([ids[:, half:], ids[:, :half]], axis=1)
        ids = tf.where(swap[:, None], swapped, ids)
        next_ids = tf.concat([ids[:, 1:], tf.fill([batch_size, 1], IGNORE_INDEX)], axis=1)
        position = tf.range(seq_len)[None, :]
        # A swapped pair trains the LM on its first segment only.
        keep = tf.logical_or(~swap[:, None], position < half - 1)
        labels = tf.where(keep, next_ids, IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": tf.ones_like(ids), "labels": labels,
                "sop_labels": tf.cast(swap, tf.int32)}

    return _steps(start_step, num_steps).map(make_batch, num_parallel_calls=tf.data.AUTOTUNE,
                                              deterministic=True).prefetch(tf.data.AUTOTUNE)


# ------------------------------------------------------------- entry point
class TrainingData:
    """The token streams of a training run and the datasets made from them.

    `training_data(options, tokenizer)` builds it; `train` asks it for the
    number of batches in an epoch, the training batches from a step on, and
    the validation batches.
    """

    def __init__(self, tokens, valid_tokens, document_offsets, meta, seq_len, batch_size, seed):
        self.tokens = tokens
        self.valid_tokens = valid_tokens
        self.document_offsets = document_offsets  # set for SOP
        self.meta = meta
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        items, what = count_examples(len(tokens), seq_len, document_offsets)
        check_enough(items, batch_size, what)
        self.batches_per_epoch = items // batch_size

    def train_dataset(self, start_step, num_steps):
        """Batches `start_step .. start_step + num_steps - 1` (LM blocks, or SOP pairs)."""
        if self.document_offsets is not None:
            return sop_dataset(self.tokens, self.document_offsets, self.seq_len, self.batch_size,
                               seed=self.seed, start_step=start_step, num_steps=num_steps)
        return lm_dataset(self.tokens, self.seq_len, self.batch_size, seed=self.seed,
                          start_step=start_step, num_steps=num_steps)

    def valid_dataset(self):
        """One ordered pass over the validation text, or `None` without one."""
        if self.valid_tokens is None:
            return None
        steps = num_blocks(len(self.valid_tokens), self.seq_len) // self.batch_size
        if steps == 0:
            raise ValueError(f"The validation text ({len(self.valid_tokens)} tokens) holds less "
                             f"than one batch of {self.batch_size} x {self.seq_len} tokens.")
        return lm_dataset(self.valid_tokens, self.seq_len, self.batch_size, shuffle=False,
                          num_steps=steps)


def training_data(options, tokenizer, default_files):
    """Tokenizes and caches (once) the files a `TrainOptions` names; returns `TrainingData`.

    Args:
        options: a `TrainOptions` (train/valid files, split, cache, shape, SOP, seed).
        tokenizer: the `GPT2Tokenizer` of the run.
        default_files: the training files when the options name none.
    """
    train_files = options.train_files or default_files
    cache_dir = options.cache_dir or default_cache_dir(train_files, tokenizer,
                                                       options.valid_fraction)
    meta = prepare_corpus(train_files, cache_dir, tokenizer, options.valid_fraction)
    valid_tokens = None
    if options.valid_files:
        valid_cache = default_cache_dir(options.valid_files, tokenizer)
        prepare_corpus(options.valid_files, valid_cache, tokenizer)
        valid_tokens = load_split(valid_cache, "train")
    elif options.valid_fraction:
        valid_tokens = load_split(cache_dir, "valid")
    offsets = load_document_offsets(cache_dir) if options.sop else None
    return TrainingData(load_split(cache_dir, "train"), valid_tokens, offsets, meta,
                        options.seq_len, options.batch_size, options.seed)
