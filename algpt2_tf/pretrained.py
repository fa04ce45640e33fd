"""The pretrained models that ship inside the package, found by name.

Each lives in `algpt2_tf/pretrained_models/NAME/`: `model.keras`, its
`tokenizer/`, `MODEL_CARD.md` and `evaluation.json` (the card's figures, and
the small held-out slice that `tests/test_pretrained.py` re-measures). They
are written by `tools/ship_pretrained.py` from a finished experiment run.

`ALGPT2LMHeadModel.from_preset(NAME)` and every CLI `--model NAME` resolve
a name here (a path that exists always wins).

Example:
>>> pretrained_dir("no-such-model")
Traceback (most recent call last):
ValueError: No pretrained model named 'no-such-model'; shipped: ...
"""

import json
import os

PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained_models")


def list_pretrained():
    """Names of the shipped pretrained models."""
    if not os.path.isdir(PRETRAINED_DIR):
        return []
    return sorted(name for name in os.listdir(PRETRAINED_DIR)
                  if os.path.isfile(os.path.join(PRETRAINED_DIR, name, "model.keras")))


def pretrained_dir(name):
    """The folder of the shipped model `name` (a `ValueError` naming the choices otherwise)."""
    if name not in list_pretrained():
        raise ValueError(f"No pretrained model named {name!r}; shipped: "
                         f"{', '.join(list_pretrained()) or 'none'}.")
    return os.path.join(PRETRAINED_DIR, name)


def evaluation(name):
    """The figures of `name`'s model card (`evaluation.json`)."""
    with open(os.path.join(pretrained_dir(name), "evaluation.json")) as f:
        return json.load(f)


def held_out_slice(texts, tokenizer, max_tokens):
    """The first `max_tokens` token ids of the concatenated held-out `texts`, decoded back
    to text: the slice a CI run can afford to evaluate (`evaluation.json` records its
    figures)."""
    ids = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        if len(ids) >= max_tokens:
            break
    return tokenizer.decode(ids[:max_tokens])
