"""XLA's compiled programs kept on disk across processes, trusted only where they check out.

TensorFlow can keep every program XLA compiles in a folder
(`TF_XLA_FLAGS=--tf_xla_persistent_cache_directory=DIR`) and read it back in the next
process instead of compiling again: the second `algpt2 serve` of a model skips the
compilation of its batch shapes, the second `algpt2 generate` that of its decode loop.
TensorFlow trusts what it finds there: a damaged entry (a process killed while writing
it, a truncated file) fails every later call that would use it with a `DataLossError`.

So the folder holds a manifest of the entries written by processes that finished their
work (`record`), each with its SHA-256, and `prepare` removes every other file before
TensorFlow may read one: a damaged or unknown entry is compiled again, never trusted.
A changed model compiles to other programs under other names, so no entry is stale.

`use` is a process setting, like the other XLA flags (`xla_flags`): call it before the
first XLA compilation (the `algpt2` command does for `generate` and `serve`). One folder
per user (`$ALGPT2_CACHE/xla`); processes that share it each record only entries that
check out.

Example:
>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> with open(os.path.join(folder, "xla_compile_cache__1__2__XLA_CPU_JIT.pb"), "wb") as f:
...     _ = f.write(b"a program")
>>> record(folder)
1
>>> with open(os.path.join(folder, "xla_compile_cache__1__2__XLA_CPU_JIT.pb"), "ab") as f:
...     _ = f.write(b" cut off")  # damaged since it was recorded
>>> prepare(folder), sorted(os.listdir(folder))
(0, ['manifest.json'])
"""

import glob
import json
import os

from algpt2_tf.runtime.files import atomic_write_json, cache_root, file_digest

FLAG = "--tf_xla_persistent_cache_directory="
MANIFEST = "manifest.json"
ENTRY_PATTERN = "xla_compile_cache__*.pb"
MAX_BYTES = 512 << 20
"""The most the entries may hold after `record` (oldest written go first): `prepare` hashes
every entry at each start, about 0.3 s for 512 MB (an `algpt2` serve's batch shapes are 14 MB)."""


def default_folder():
    """`$ALGPT2_CACHE/xla` (default `~/.cache/algpt2/xla`)."""
    return os.path.join(cache_root(), "xla")


def _manifest(folder):
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            entries = json.load(f)
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        return {}  # none, or damaged: nothing is trusted


def prepare(folder):
    """Removes every entry of `folder` that the manifest does not list with its current
    digest; returns how many are kept."""
    manifest = _manifest(folder)
    kept = {}
    for path in glob.glob(os.path.join(folder, ENTRY_PATTERN)):
        name = os.path.basename(path)
        if manifest.get(name) == file_digest(path):
            kept[name] = manifest[name]
            continue
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    if kept != manifest:
        atomic_write_json(os.path.join(folder, MANIFEST), kept)
    return len(kept)


def record(folder, max_bytes=MAX_BYTES):
    """Adds `folder`'s entries that the manifest lacks (this process's, now complete) with
    their digests, then removes the least recently written ones while the entries hold more
    than `max_bytes` (so `prepare`, which reads every entry, stays fast); returns how many
    entries the manifest lists."""
    manifest = _manifest(folder)
    entries = []
    for path in glob.glob(os.path.join(folder, ENTRY_PATTERN)):
        name = os.path.basename(path)
        try:
            stat = os.stat(path)
        except FileNotFoundError:  # removed by another process meanwhile
            manifest.pop(name, None)
            continue
        if name not in manifest:
            manifest[name] = file_digest(path)
        entries.append((stat.st_mtime_ns, stat.st_size, name, path))
    total = sum(size for _, size, _, _ in entries)
    for _, size, name, path in sorted(entries):
        if total <= max_bytes:
            break
        manifest.pop(name, None)
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        total -= size
    atomic_write_json(os.path.join(folder, MANIFEST), manifest)
    return len(manifest)


def use(folder=None):
    """Process setting: TensorFlow keeps XLA's compiled programs in `folder` (default
    `default_folder()`), after `prepare` has removed what does not check out. Returns the
    folder, or None when the user's own `TF_XLA_FLAGS` already names one (theirs wins)."""
    flags = os.environ.get("TF_XLA_FLAGS", "").split()
    if any(f.startswith(FLAG) for f in flags):
        return None
    folder = folder or default_folder()
    os.makedirs(folder, exist_ok=True)
    prepare(folder)
    os.environ["TF_XLA_FLAGS"] = " ".join(flags + [FLAG + folder])
    return folder
