"""Generation through a cached LiteRT build of a model: no TensorFlow at run time.

`cached_build(model_path)` finds (or makes, with `build=True`) a TFLite export
of a `.keras` model in the cache folder,
`$ALGPT2_CACHE/litert/<key>/{model.tflite, meta.json}`. The key is a digest of
the model file's bytes, the quantization, the cache length and
`BUILD_VERSION`: a model whose weights change gets a new build, never a stale
one. An entry is used only when its `meta.json` (written last) names the same
key and its `model.tflite` has the size recorded there; anything else (a build
cut off, a damaged file) is removed and built again.

`LiteRTGenerator` decodes with the build's `prefill_N`/`decode_N` steps
(`litert.LiteRTDecoder`: LiteRT's `CompiledModel`, XNNPACK's weight cache kept
in the entry) in `sampling.host_decode`, the NumPy decode loop, whose `pick_tokens` is the
twin of the sampler of every path: the same seed gives the XLA path's tokens. Only the build imports
TensorFlow.

Example (builds a small model's entry, then decodes without TensorFlow):

>>> import tempfile
>>> from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel
>>> model = ALGPT2LMHeadModel(ALGPT2Config(max_positions=32, hidden_size=32, num_layers=2,
...                                        num_heads=2, intermediate_size=64, embedding_size=16))
>>> folder = tempfile.mkdtemp()
>>> model.save(f"{folder}/m.keras")
>>> build = cached_build(f"{folder}/m.keras", cache=f"{folder}/cache", log=lambda *_: None)
>>> LiteRTGenerator(build).generate([464, 3290], 8) == model.generate(
...     [[464, 3290]], max_new_tokens=8, stop_ids=[]).new_ids[0]
True
"""

import dataclasses
import gc
import hashlib
import json
import os
import shutil
import sys
import weakref

import numpy as np

from algpt2_tf.export.api import export
from algpt2_tf.export.formats import ENGINE_QUANTIZATIONS
from algpt2_tf.generation.prompts import GenerationOutput, check_prompts
from algpt2_tf.generation.sampling import SamplingParams, host_decode, row_seed
from algpt2_tf.runtime.files import cache_root, file_digest, new_directory
from algpt2_tf.saving import load_model, load_tokenizer_for, resolve_model_path
from algpt2_tf.tokenizer import GPT2Tokenizer

BUILD_VERSION = 6
"""Bumped when the export changes what a build holds: older entries are not used."""


@dataclasses.dataclass
class LiteRTBuild:
    """A current cache entry: `folder/model.tflite` and what it was built with."""

    folder: str
    key: str
    quantize: str
    max_length: int
    vocab_size: int
    batch: int = 1

    @property
    def model_path(self):
        return os.path.join(self.folder, "model.tflite")


def _key(digest, quantize, max_length, batch=1):
    if quantize not in ENGINE_QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(ENGINE_QUANTIZATIONS)}, "
                         f"got {quantize!r}.")
    wanted = json.dumps([BUILD_VERSION, digest, quantize, max_length, batch])
    return hashlib.sha256(wanted.encode()).hexdigest()[:32]


def build_key(model_path, quantize="none", max_length=None, batch=1):
    """The cache key of a `.keras` file's build (its bytes, not its name or date)."""
    return _key(file_digest(model_path), quantize, max_length, batch)


def _current(folder, key):
    """The entry in `folder` if it is whole and built for `key`, else None."""
    try:
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        if (meta.get("key") != key
                or os.path.getsize(os.path.join(folder, "model.tflite")) != meta["tflite_bytes"]):
            return None
        return LiteRTBuild(folder, key, meta["quantize"], int(meta["max_length"]),
                           int(meta["vocab_size"]), int(meta["batch"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _entry(key, cache, source, load, quantize, max_length, batch, build, log):
    """The current entry for `key`, else (with `build`) what `_build` makes of the model and
    tokenizer `load()` gives, after removing what a cut-off or damaged build left."""
    folder = os.path.join(cache or cache_root(), "litert", key)
    found = _current(folder, key)
    if found is not None or not build:
        return found
    if os.path.exists(folder):
        log(f"Removing an incomplete or damaged LiteRT build: {folder}")
        shutil.rmtree(folder)
    rows = "" if batch == 1 else f" ({batch} rows)"
    log(f"Building the LiteRT {'float32' if quantize == 'none' else quantize} engine{rows} of "
        f"{source} (once; cached in {folder})")
    model, tokenizer = load()
    _build(model, tokenizer, source, folder, key, quantize, max_length, batch, log)
    return _current(folder, key)


def cached_build(model_path, quantize="none", max_length=None, cache=None, build=True,
                 log=print, batch=1):
    """The current LiteRT build of the `.keras` file `model_path` (a run folder or a
    pretrained name works too), made first when missing, stale or damaged and `build`
    is true; None when it is missing and `build` is false.

    Args:
        model_path: the model.
        quantize: "none" (float32: the XLA path's greedy text), "int8" or "int4" (weights;
            int4: `int4.py`).
        max_length: the build's cache length (default: `min(256, max_positions)`);
            prompt plus new tokens must fit it.
        cache: the cache folder (default `$ALGPT2_CACHE` or `~/.cache/algpt2`).
        build: make the entry when there is no current one (imports TensorFlow).
        log: where progress lines go.
        batch: the most prompts its steps decode together (each batch is a build).
    """
    path = resolve_model_path(model_path)
    return _entry(build_key(path, quantize, max_length, batch), cache, os.path.abspath(path),
                  lambda: _loaded(path), quantize, max_length, batch, build, log)


def _loaded(path):
    """The network and tokenizer of a `.keras` file (imports Keras: only to build)."""
    from algpt2_tf.model import ALGPT2Backbone  # deferred: imports Keras

    return load_model(path, ALGPT2Backbone), load_tokenizer_for(path)


def weights_digest(model):
    """A digest of an in-memory model's config and every weight's values: any change to a
    weight gives another digest (so another build)."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for variable in model.weights:
        digest.update(variable.path.encode())
        digest.update(np.ascontiguousarray(np.asarray(variable)).tobytes())
    return digest.hexdigest()


def model_build(model, quantize="none", max_length=None, cache=None, log=print, batch=1,
                digest=None):
    """`cached_build` for an in-memory model (`model.generate(..., engine="litert")`):
    keyed by `weights_digest`, so a model changed since its last build is built again,
    never served stale. Its stop id is GPT-2's `<|endoftext|>` (the default tokenizer).
    `digest`: the model's `weights_digest` when the caller has just taken it."""
    if model.quantization is not None:
        raise ValueError(f"The LiteRT engine builds from a float32 model; this one is quantized "
                         f"({model.quantization}). Pass quantize='int8' to a float32 model.")
    digest = digest or weights_digest(model)
    return _entry(_key("model:" + digest, quantize, max_length, batch), cache,
                  "the in-memory model", lambda: (model, GPT2Tokenizer()), quantize, max_length,
                  batch, True, log)


def _build(model, tokenizer, source, folder, key, quantize, max_length, batch, log):
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with new_directory(folder) as tmp:
        report = export(model, tokenizer, "tflite", os.path.join(tmp, "export"),
                        quantize=quantize, max_length=max_length, log=log, batch=batch)
        os.replace(report.path, os.path.join(tmp, "model.tflite"))
        shutil.rmtree(os.path.join(tmp, "export"))
        config = model.config
        meta = {"key": key, "quantize": quantize,
                "max_length": max_length or min(256, config.max_positions),
                "vocab_size": config.vocab_size, "eos_id": tokenizer.eos_id, "batch": batch,
                "tflite_bytes": os.path.getsize(os.path.join(tmp, "model.tflite")),
                "source": source}
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)


class LiteRTGenerator:
    """Generation with a `LiteRTBuild`: one prompt, or 1 to `build.batch` prompts decoded
    together (left-padded, each at its own position: `steps.Steps`).

    Args:
        build: a `LiteRTBuild` (`cached_build`).
        num_threads: CPU threads (default: all).
    """

    def __init__(self, build, num_threads=None):
        from algpt2_tf.export.litert import LiteRTDecoder  # deferred: imports LiteRT

        self.build = build
        self.decoder = LiteRTDecoder(build.model_path,
                                     os.path.join(build.folder, "weights.cache"), num_threads)

    def check(self, prompt_ids, max_new_tokens):
        """A `ValueError` naming the limit when the request cannot run on this build."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        if not prompt_ids:
            raise ValueError("The prompt has no tokens.")
        if len(prompt_ids) + max_new_tokens > self.build.max_length:
            raise ValueError(f"The prompt ({len(prompt_ids)} tokens) plus max_new_tokens "
                             f"({max_new_tokens}) exceeds the LiteRT build's cache of "
                             f"{self.build.max_length} tokens.")
        if max(prompt_ids) >= self.build.vocab_size or min(prompt_ids) < 0:
            raise ValueError(f"Token ids must be in [0, {self.build.vocab_size}).")

    def rows(self, prompts, max_new_tokens, params=None, seeds=None, stop_ids=()):
        """Decodes 1 to `build.batch` prompts together; yields `host_decode`'s `(tokens
        [rows], logits [rows, vocab], running [rows])` at each step. Row `r` samples with
        `seeds[r]` (default 0)."""
        params = params or SamplingParams(top_k=1)
        for prompt in prompts:
            self.check(prompt, max_new_tokens)
        vocab = self.build.vocab_size
        seen = np.zeros((len(prompts), vocab), bool)
        for row, prompt in enumerate(prompts):
            seen[row, prompt] = True
        lengths = np.array([len(p) for p in prompts])
        logits = self.decoder.prefill_rows([list(p) for p in prompts])[:, :vocab]
        yield from host_decode(
            logits, seen, params, list(seeds or [0] * len(prompts)), max_new_tokens, stop_ids,
            lambda tokens, step: self.decoder.decode_rows(tokens, lengths + step)[:, :vocab])

    def generate_rows(self, prompts, max_new_tokens, params=None, seeds=None, stop_ids=()):
        """Each prompt's new tokens (`rows`; a stop id ends a row, and is its last token)."""
        new = [[] for _ in prompts]
        for tokens, _, running in self.rows(prompts, max_new_tokens, params, seeds, stop_ids):
            for row in np.flatnonzero(running):
                new[row].append(int(tokens[row]))
        return new

    def steps(self, prompt_ids, max_new_tokens, params=None, seed=0, stop_ids=()):
        """Yields `(token, logits)` for each new token of one prompt, `logits` the float32
        `[vocab]` row it was picked from (a stop id ends it, and is yielded)."""
        for tokens, logits, _ in self.rows([prompt_ids], max_new_tokens, params, [seed or 0],
                                           stop_ids):
            yield int(tokens[0]), logits[0]

    def stream(self, prompt_ids, max_new_tokens, params=None, seed=0, stop_ids=()):
        """Yields the new tokens one by one (a stop id ends it, and is yielded)."""
        for token, _ in self.steps(prompt_ids, max_new_tokens, params, seed, stop_ids):
            yield token

    def generate(self, prompt_ids, max_new_tokens, params=None, seed=0, stop_ids=()):
        """The new tokens, as a list."""
        return list(self.stream(prompt_ids, max_new_tokens, params, seed, stop_ids))

    def close(self):
        """Frees the LiteRT model and its buffers now (LiteRT logs as it tears them down)."""
        self.decoder = None
        gc.collect()


BATCHES = (1, 2, 4)
"""The batch sizes of the builds `model.generate(..., engine="litert")` makes: prompts go in
groups of up to 4, each on the build of the smallest batch that holds it. Measured with
random weights, int8, 16-token prompts and 128 new tokens, tokens/s of all rows at batch
1, 2, 4, 8 (AMD EPYC Zen 4, 2026-12-05, one round): `algpt2` 442, 459, 589, 559; `gpt2`
179, 308, 431, 453. Past 4 rows a step costs about as much per row (its caches are read
whole at every step), so 8 rows decode as two groups of 4."""


def batch_for(rows):
    """The build batch (`BATCHES`) a group of `rows` prompts decodes on."""
    return next((b for b in BATCHES if b >= rows), BATCHES[-1])


class ModelDecoder:
    """An in-memory model's LiteRT builds behind `generation.Generator.generate`'s batch
    signature, so `generation.generate` decodes through them: the prompts go in groups of
    up to `BATCHES[-1]`, each on the build of its size (`batch_for`; made on first use,
    made again when a weight has changed since: `model_build`), row `r` seeded
    `row_seed(seed, r)` as in a batch of the XLA loop.

    Args:
        model: a float32 `ALGPT2LMHeadModel` (or backbone).
        quantize: the builds' weights, "none", "int8" or "int4".
        cache: the cache folder (default `$ALGPT2_CACHE` or `~/.cache/algpt2`).
    """

    def __init__(self, model, quantize="none", cache=None):
        self.model, self.quantize, self.cache = model, quantize, cache

    def generator(self, batch, digest=None):
        """The `LiteRTGenerator` of the model's current build of `batch` rows (`digest`: the
        model's `weights_digest`, taken now when not given)."""
        build = model_build(self.model, self.quantize, cache=self.cache, batch=batch,
                            log=lambda line: print(line, file=sys.stderr), digest=digest)
        found = _MODEL_GENERATORS.setdefault(self.model, {})
        if batch not in found or found[batch].build.key != build.key:
            found[batch] = LiteRTGenerator(build)
        return found[batch]

    def generate(self, prompts, max_new_tokens, params, seed=0, stop_ids=()):
        """`GenerationOutput` (without text) of every row; every row is checked first."""
        prompts = check_prompts(prompts, self.model.config.vocab_size)
        size = BATCHES[-1]
        groups = [prompts[i:i + size] for i in range(0, len(prompts), size)]
        digest = weights_digest(self.model)  # once a call: it reads every weight
        generators = {b: self.generator(b, digest) for b in {batch_for(len(g)) for g in groups}}
        for prompt in prompts:
            next(iter(generators.values())).check(prompt, max_new_tokens)
        new_ids = []
        for group in groups:
            seeds = [row_seed(seed or 0, len(new_ids) + r) for r in range(len(group))]
            new_ids += generators[batch_for(len(group))].generate_rows(
                group, max_new_tokens, params, seeds, stop_ids)
        return GenerationOutput(ids=[p + n for p, n in zip(prompts, new_ids)], new_ids=new_ids)


_MODEL_GENERATORS = weakref.WeakKeyDictionary()
"""model -> {batch: its `LiteRTGenerator`} (of the builds made from its weights when last
used): a model's next `generate` reuses them."""
