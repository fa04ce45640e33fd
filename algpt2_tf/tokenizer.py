"""GPT-2 byte-level BPE: fast encoding (`tokenizers`), training a new one, and the in-graph twin.

The original GPT-2 vocabulary ships in `algpt2_tf/assets/` (MIT, see
`assets/NOTICE.md`). Every tokenizer this module produces is a plain
`vocab.json` + `merges.txt` pair, so keras-hub's `BytePairTokenizer` can
load it and give the same ids inside a TensorFlow graph (used by the
SavedModel `generate` signature).
"""

import hashlib
import json
import os
import re
import shutil
from importlib import resources

EOS_TOKEN = "<|endoftext|>"

# Splitting a text before a newline that follows a non-space character never
# changes GPT-2's pre-tokenization (no pattern spans such a boundary), so long
# documents can be cut there and encoded in parallel with identical ids.
_SAFE_SPLIT = re.compile(r"(?<=\S)(?=\n)")
_CHUNK_CHARS = 1 << 16
# Byte-level images of " \n\t\r\v\f" (GPT-2's byte -> unicode map).
_BYTE_WHITESPACE = "".join(chr(0x100 + b) for b in b" \n\t\r\v\f")


def default_tokenizer_dir():
    """The directory holding the shipped GPT-2 `vocab.json` and `merges.txt`."""
    return str(resources.files("algpt2_tf").joinpath("assets"))


def split_for_encoding(text, chunk_chars=_CHUNK_CHARS):
    """Cuts `text` into pieces of about `chunk_chars` at boundaries where the
    concatenated encodings equal the encoding of the whole text."""
    if len(text) <= chunk_chars:
        return [text]
    pieces, current, size = [], [], 0
    for part in _SAFE_SPLIT.split(text):
        current.append(part)
        size += len(part)
        if size >= chunk_chars:
            pieces.append("".join(current))
            current, size = [], 0
    if current:
        pieces.append("".join(current))
    return pieces


class GPT2Tokenizer:
    """A byte-level BPE tokenizer backed by Hugging Face `tokenizers` (Rust).

    Args:
        directory: a folder with `vocab.json` and `merges.txt`; default: the
            shipped original GPT-2 vocabulary (50257 ids).

    Example:
    >>> tokenizer = GPT2Tokenizer()
    >>> tokenizer.encode("Hello world")
    [15496, 995]
    >>> tokenizer.decode([15496, 995])
    'Hello world'
    """

    def __init__(self, directory=None):
        # Deferred: imports tokenizers.
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        self.directory = os.path.abspath(directory or default_tokenizer_dir())
        self.vocab_path = os.path.join(self.directory, "vocab.json")
        self.merges_path = os.path.join(self.directory, "merges.txt")
        for path in (self.vocab_path, self.merges_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Tokenizer file not found: {path}")
        bpe = models.BPE.from_file(self.vocab_path, self.merges_path)
        self._tokenizer = Tokenizer(bpe)
        self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tokenizer.decoder = decoders.ByteLevel()
        with open(self.vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
        if EOS_TOKEN not in vocab:
            raise ValueError(f"{self.vocab_path} has no {EOS_TOKEN} token.")
        self._tokenizer.add_special_tokens([EOS_TOKEN])
        self.eos_id = vocab[EOS_TOKEN]
        self.vocab_size = len(vocab)

    @property
    def fingerprint(self):
        """sha256 of the vocabulary and merges: identifies the tokenizer in caches."""
        digest = hashlib.sha256()
        for path in (self.vocab_path, self.merges_path):
            with open(path, "rb") as f:
                digest.update(f.read())
        return digest.hexdigest()

    def encode(self, text):
        """Token ids of one string (`<|endoftext|>` in the text is the EOS id)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts):
        """Token ids of many strings, encoded in parallel; long strings are
        split at safe boundaries first, so the ids equal `encode` of each."""
        pieces, owners = [], []
        for i, text in enumerate(texts):
            for piece in split_for_encoding(text):
                pieces.append(piece)
                owners.append(i)
        out = [[] for _ in texts]
        for owner, encoding in zip(owners, self._tokenizer.encode_batch(pieces, add_special_tokens=False)):
            out[owner].extend(encoding.ids)
        return out

    def decode(self, ids):
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_token(self, token_id):
        return self._tokenizer.id_to_token(int(token_id))

    def in_graph(self, sequence_length=None):
        """The keras-hub `BytePairTokenizer` twin: same ids, runs in a TF graph."""
        import keras_hub  # deferred: imports keras-hub

        # `_allow_python_workflow=False`: always the tf-text path (the one a
        # SavedModel runs), never keras-hub's eager shortcut, whose Llama-3
        # split differs from GPT-2's on whitespace runs.
        return keras_hub.tokenizers.BytePairTokenizer(
            vocabulary=self.vocab_path, merges=self.merges_path,
            sequence_length=sequence_length, unsplittable_tokens=[EOS_TOKEN],
            _allow_python_workflow=False)

    def save(self, directory):
        """Writes `vocab.json`, `merges.txt` (and `tokenizer.json`) to `directory`."""
        os.makedirs(directory, exist_ok=True)
        for path in (self.vocab_path, self.merges_path):
            target = os.path.join(directory, os.path.basename(path))
            if os.path.abspath(target) != path:
                shutil.copyfile(path, target)
        self._tokenizer.save(os.path.join(directory, "tokenizer.json"))


def train_tokenizer(texts, vocab_size, out_dir, min_frequency=2):
    """Trains a new byte-level BPE on an iterable of strings.

    The result is written as `vocab.json`, `merges.txt` and `tokenizer.json`
    in `out_dir` and returned as a `GPT2Tokenizer`. `<|endoftext|>` is the last id.

    Args:
        texts: an iterable of training strings.
        vocab_size: the target vocabulary size, at least 257 (256 bytes + EOS).
        out_dir: output directory.
        min_frequency: the least count of a pair to be merged.
    """
    # Deferred: imports tokenizers.
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"vocab_size must be an integer >= 257 (256 bytes + {EOS_TOKEN}), "
                         f"got {vocab_size!r}.")
    tokenizer = Tokenizer(models.BPE())
    # GPT-2's split, then each whitespace character of a whitespace run on its
    # own: the vocabulary learns no whitespace-whitespace merges (GPT-2's own
    # has none that matter either), which is where keras-hub's in-graph split
    # and GPT-2's regex disagree. " word" merges are learned as usual.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        pre_tokenizers.Split(Regex(f"[{_BYTE_WHITESPACE}](?=[{_BYTE_WHITESPACE}]|$)"),
                             behavior="isolated"),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1, min_frequency=min_frequency, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(texts, trainer=trainer)
    model_json = json.loads(tokenizer.to_str())["model"]
    vocab = dict(model_json["vocab"])
    vocab[EOS_TOKEN] = len(vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_json["merges"]]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("".join(m + "\n" for m in merges))
    result = GPT2Tokenizer(out_dir)
    result.save(out_dir)
    return result
