"""Writing files so that a kill never leaves a torn one: write a temporary file, then rename."""

import json
import os


def atomic_write_text(path, text):
    """Writes `text` to `path` through `path.tmp` and an atomic rename."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_write_json(path, value):
    """Writes `value` as indented JSON (see `atomic_write_text`)."""
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)
