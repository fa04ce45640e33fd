"""Files: finding and reading inputs, the cache folder, and writing that a kill never tears.

Every file this package writes goes through `atomic_path` (or the helpers on
top of it): the content is written to a temporary path beside the target and
renamed onto it, so a reader sees the old file or the new one, never half.
"""

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile


def file_digest(path):
    """The SHA-256 of a file's bytes (hex), read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root():
    """`$ALGPT2_CACHE` or `~/.cache/algpt2`."""
    return os.path.expanduser(os.environ.get("ALGPT2_CACHE", "~/.cache/algpt2"))


def expand_files(patterns, what="files"):
    """Sorted, de-duplicated paths matching the globs; an error naming any glob that matches nothing."""
    if isinstance(patterns, str):
        patterns = [patterns]
    paths = []
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                         if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"No {what} match {pattern!r}.")
        paths.extend(m for m in matches if m not in paths)
    return paths


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yields a temporary path beside `path` (ending in `suffix`, for writers
    that insist on an extension); when the block succeeds it is renamed onto
    `path`, when it fails it is removed.

    Example:
    >>> import tempfile
    >>> target = os.path.join(tempfile.mkdtemp(), "numbers.txt")
    >>> with atomic_path(target) as tmp:
    ...     with open(tmp, "w") as f:
    ...         _ = f.write("1 2 3")
    >>> open(target).read()
    '1 2 3'
    """
    tmp = f"{path}.tmp{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise


def require_new_directory(path):
    """Raises `FileExistsError` unless `path` is absent or an empty folder (the
    check `new_directory` makes; callers with long work ahead make it first)."""
    if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise FileExistsError(f"{path} already exists; choose a new folder or remove it first.")


def staging_directory(prefix, parent):
    """A new uniquely named folder in `parent` with the permissions of any folder made
    under the current umask: `tempfile.mkdtemp` makes it private (0700), and a folder
    renamed into place from it would stay unreadable to other users (TF Serving running
    as another user, say)."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


@contextlib.contextmanager
def new_directory(path):
    """Yields a temporary folder beside `path`, renamed to `path` when the
    block succeeds and removed when it fails: a folder appears whole or not at
    all. `path` must not exist yet (or be an empty folder).

    Raises:
        FileExistsError: `path` exists and is not an empty folder.
    """
    require_new_directory(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = staging_directory(f".{os.path.basename(os.path.abspath(path))}.tmp-", parent)
    try:
        yield tmp
        if os.path.isdir(path):
            os.rmdir(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path, text):
    """Writes `text` (UTF-8) to `path` through `atomic_path`."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def atomic_write_json(path, value):
    """Writes `value` as indented JSON through `atomic_path`."""
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _decode(path, data):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 4]!r}). "
            "Convert the file to UTF-8 first; algpt2 does not guess or replace characters.") from None


def read_documents(paths, text_key="text"):
    """Yields the documents of text files: a `.txt` file is one document, a
    `.jsonl` file one document per line (its `text_key` field). Invalid
    UTF-8 is an error that names the file and byte, never silently replaced."""
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        text = _decode(path, data)
        if path.endswith(".jsonl"):
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: invalid JSON ({e.msg}).") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                    raise ValueError(f"{path}:{number}: no string field {text_key!r}.")
                if record[text_key].strip():
                    yield record[text_key]
        elif text.strip():
            yield text
