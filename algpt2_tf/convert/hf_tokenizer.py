"""Tokenizer files between a Hugging Face folder and ours (`vocab.json` + `merges.txt`).

Ours is always a byte-level BPE given as `vocab.json` + `merges.txt` (see
`tokenizer.py`). A Hugging Face folder has those, or only a `tokenizer.json`,
whose BPE vocabulary and merges are the same two things in one file.
"""

import json
import os
import shutil

from algpt2_tf.tokenizer import EOS_TOKEN, GPT2Tokenizer


def _is_byte_level(pre_tokenizer):
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "ByteLevel":
        return True
    return any(_is_byte_level(p) for p in pre_tokenizer.get("pretokenizers", []) or [])


def has_tokenizer(directory):
    """Whether `directory` holds tokenizer files we can read."""
    pair = all(os.path.isfile(os.path.join(directory, n)) for n in ("vocab.json", "merges.txt"))
    return pair or os.path.isfile(os.path.join(directory, "tokenizer.json"))


def import_tokenizer(directory, out):
    """Writes our tokenizer files for the Hugging Face tokenizer in `directory`
    to `out`; returns the `GPT2Tokenizer`, or `None` when there are no files.

    Raises:
        ValueError: a `tokenizer.json` that is not a byte-level BPE, or a
            vocabulary without `<|endoftext|>`.
    """
    vocab_path = os.path.join(directory, "vocab.json")
    merges_path = os.path.join(directory, "merges.txt")
    json_path = os.path.join(directory, "tokenizer.json")
    os.makedirs(out, exist_ok=True)
    if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
        shutil.copyfile(vocab_path, os.path.join(out, "vocab.json"))
        shutil.copyfile(merges_path, os.path.join(out, "merges.txt"))
    elif os.path.isfile(json_path):
        with open(json_path, encoding="utf-8") as f:
            spec = json.load(f)
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or not _is_byte_level(spec.get("pre_tokenizer")):
            raise ValueError(f"{json_path} is not a byte-level BPE tokenizer (GPT-2 style); "
                             f"model type {model.get('type')!r}.")
        vocab = dict(model.get("vocab") or {})
        for token in spec.get("added_tokens") or []:
            vocab.setdefault(token["content"], token["id"])
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    else:
        return None
    try:
        tokenizer = GPT2Tokenizer(out)
    except ValueError as e:
        raise ValueError(f"The tokenizer in {directory}: {e}") from None
    tokenizer.save(out)
    return tokenizer


def export_tokenizer(tokenizer, out, max_length):
    """Writes `tokenizer` in the layout `transformers.AutoTokenizer` loads:
    `vocab.json`, `merges.txt`, `tokenizer.json` and `tokenizer_config.json`."""
    tokenizer.save(out)
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length,
              "add_prefix_space": False, "bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN,
              "unk_token": EOS_TOKEN}
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
