"""Text generation: a KV cache per virtual layer, samplers, and a compiled decode loop.

The shared block is one set of weights, but each of the `num_layers`
applications attends over its own keys and values, so there is one cache per
virtual layer: keys and values of `[batch, heads, slots, head_size]`. A step
attends over every slot of its cache, so the decode loop starts with a short
cache and pads it as the text grows (see `cache_lengths`).

Prompts are left-padded to a common length bucket; a prefill pass writes the
prompt into cache slots `0..T-1`; each decode step writes one slot. Positions
count real tokens only, so padding does not shift them. The whole loop (prefill,
sampling, decode steps, early stop) is one `tf.function(jit_compile=True)` per
`max_length` bucket, traced once; XLA compiles once per (batch, prompt bucket).

Samplers (all in-graph, usable from a SavedModel):
  greedy  the most likely token (also: `temperature=0` or `top_k=1`);
  sample  plain sampling at `temperature`;
  top_k   sampling among the `top_k` most likely tokens;
  top_p   nucleus sampling: the smallest set whose probability reaches `top_p`.
A `repetition_penalty` > 1 divides positive (multiplies negative) logits of
tokens already in the sequence (CTRL). Tokens are picked by `token_choice.choose_tokens`,
the one sampler of every path: seeded and stateless, row `r` of a batch seeded `s` draws
as a request seeded `s + r` would alone, on this loop, the serving engine, the host loop
and the LiteRT engine.
"""

import weakref
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from algpt2_tf.generation.decode_tricks import DecodePlan, DecodeTricks
from algpt2_tf.generation.host_loop import HostLoopGenerator
from algpt2_tf.generation.prompts import (GenerationOutput, check_fits,  # noqa: F401
                                          check_max_new_tokens, check_prompts, left_pad)
from algpt2_tf.generation.sampling import (SAMPLERS, SamplingParams,  # noqa: F401 (the API)
                                           row_seed, sampling_params)
from algpt2_tf.generation.token_choice import choose_tokens
from algpt2_tf.model import position_ids_from_mask
from algpt2_tf.runtime import backend
from algpt2_tf.tokenizer import GPT2Tokenizer

PROMPT_BUCKET = 16
LENGTH_BUCKET = 64
CACHE_SEGMENT = 64  # the first cache length of the decode loop (see cache_lengths)


def mark_seen(seen, ids, weights):
    """Sets `seen[b, ids[b, t]] = max(seen, weights[b, t])`."""
    batch = tf.shape(ids)[0]
    rows = tf.broadcast_to(tf.range(batch)[:, None], tf.shape(ids))
    index = tf.stack([tf.reshape(rows, [-1]), tf.reshape(ids, [-1])], axis=1)
    return tf.tensor_scatter_nd_max(seen, index, tf.reshape(tf.cast(weights, seen.dtype), [-1]))


# -------------------------------------------------------------- decode loop
def cache_lengths(max_length, first=CACHE_SEGMENT):
    """The cache lengths `decode` grows through: `first` (64), 128, 256, ... then
    `max_length` (the TFLite export's steps start at 32).

    A decode step attends over its whole cache, so a cache sized for the
    longest request would make every early step read mostly empty slots. The
    decode loop instead starts with a short cache and pads it between loops:
    each length is one loop in the compiled function, so doubling keeps their
    number logarithmic while a step reads at most twice the slots it needs.
    """
    lengths, length = [], first
    while length < max_length:
        lengths.append(length)
        length *= 2
    return lengths + [max_length]


def grow_caches(caches, key_mask, length):
    """Pads the caches' slot axis and `key_mask` to `length` slots."""
    extra = length - tf.shape(key_mask)[1]
    key_mask = tf.pad(key_mask, [[0, 0], [0, extra]])
    caches = [tuple(tf.pad(c, [[0, 0], [0, 0], [0, extra], [0, 0]]) for c in pair)
              for pair in caches]
    return caches, key_mask


# The decode step API: every compiled loop (`decode`, `Generator.stream`, the serving engine's
# steps and joins) is made of these, each given the loop's `DecodePlan`.
def prefill(model, prompt_ids, prompt_mask, cache_length, plan):
    """Runs left-padded prompts `[batch, T]` into fresh caches of `cache_length` slots.

    Returns `(last logits [batch, vocab], caches, key_mask [batch, cache_length],
    lengths [batch], seen [batch, vocab])`: what `sample_and_advance` continues from.
    """
    batch, prompt_len = tf.shape(prompt_ids)[0], tf.shape(prompt_ids)[1]
    mask = tf.cast(prompt_mask, tf.int32)
    caches = model.empty_caches(batch, cache_length, model.embedding.compute_dtype)
    key_mask = tf.concat([mask, tf.zeros([batch, cache_length - prompt_len], tf.int32)], axis=1)
    positions = position_ids_from_mask(mask)
    logits, caches = model.forward_with_cache(prompt_ids, positions, key_mask, caches, 0,
                                              last_logits_only=plan.tricks.last_position_head,
                                              plan=plan)
    lengths = tf.reduce_sum(mask, axis=1)
    seen = mark_seen(tf.zeros([batch, model.config.vocab_size]), prompt_ids, mask)
    return logits[:, -1], caches, key_mask, lengths, seen


def advance(model, tokens, slot, lengths, key_mask, caches, plan):
    """Writes `tokens` `[batch]` at cache slot `slot`; returns the next logits."""
    batch = tf.shape(tokens)[0]
    key_mask = tf.tensor_scatter_nd_update(
        key_mask, tf.stack([tf.range(batch), tf.fill([batch], slot)], axis=1),
        tf.ones([batch], tf.int32))
    logits, caches = model.forward_with_cache(tokens[:, None], lengths[:, None], key_mask,
                                              caches, slot, plan=plan)
    return logits[:, 0], key_mask, caches


def sample_and_advance(model, logits, seen, params, seeds, steps, slot, lengths, key_mask, caches,
                       plan):
    """One decode step: pick the next tokens (`choose_tokens` with per-row `params` and
    `seeds`, at per-row `steps`, or scalars for every row), mark them seen, run them through
    the model at cache slot `slot`. Returns `(tokens, seen, logits, key_mask, caches)`."""
    tokens = choose_tokens(logits, seen, *params, seeds=seeds, steps=steps, argmax=plan.argmax())
    seen = mark_seen(seen, tokens[:, None], tf.ones_like(tokens)[:, None])
    logits, key_mask, caches = advance(model, tokens, slot, lengths, key_mask, caches, plan)
    return tokens, seen, logits, key_mask, caches


def decode(model, prompt_ids, prompt_mask, max_new_tokens, params, seed, stop_ids, max_length,
           plan):
    """The whole generation as TF ops (for `tf.function`/XLA and SavedModels).

    Args:
        model: an `ALGPT2LMHeadModel`.
        prompt_ids: int32 `[batch, T]`, left-padded.
        prompt_mask: int32 `[batch, T]`.
        max_new_tokens: int32 scalar; at most `max_length - T`.
        params: `(temperature, top_k, top_p, repetition_penalty)` scalar tensors.
        seed: int32 scalar.
        stop_ids: int32 `[n]`; a row stops after emitting one of them.
        max_length: Python int, the cache length.
        plan: the `DecodePlan` of the traced function.
    Returns:
        `(new_ids [batch, max_length - T], num_new [batch])`: tokens after a
        row's stop token are undefined; `num_new` counts a row's tokens,
        its stop token included.
    """
    prompt_len = tf.shape(prompt_ids)[1]
    batch = tf.shape(prompt_ids)[0]
    capacity = max_length - prompt_len
    steps = tf.minimum(tf.cast(max_new_tokens, tf.int32), capacity)
    # Every cache holds at least the prompt; each loop below runs the steps
    # whose slot fits in its cache, then the next one pads it.
    sizes = cache_lengths(max_length) if plan.tricks.growing_cache else [max_length]
    cache_sizes = [tf.maximum(size, prompt_len) for size in sizes]
    logits, caches, key_mask, lengths, seen = prefill(model, prompt_ids, prompt_mask,
                                                      cache_sizes[0], plan)
    seeds = tf.cast(seed, tf.int32) + tf.range(batch)  # row r draws as seed + r alone would
    stop_ids = tf.cast(stop_ids, tf.int32)

    def body(state):
        tokens, seen, logits, key_mask, caches = sample_and_advance(
            model, state.logits, state.seen, params, seeds, state.step, prompt_len + state.step,
            state.lengths, state.key_mask, state.caches, plan)
        # Rows that already stopped emit 0s (not counted in num_new).
        tokens = tf.where(state.finished, tf.zeros_like(tokens), tokens)
        out = tf.tensor_scatter_nd_update(
            state.out, tf.stack([tf.range(batch), tf.fill([batch], state.step)], axis=1), tokens)
        stopped = tf.reduce_any(tf.equal(tokens[:, None], stop_ids[None, :]), axis=1)
        return DecodeState(
            step=state.step + 1, finished=tf.logical_or(state.finished, stopped),
            num_new=state.num_new + tf.cast(tf.logical_not(state.finished), tf.int32), out=out,
            logits=logits, caches=caches, key_mask=key_mask, lengths=state.lengths + 1, seen=seen)

    state = DecodeState(step=tf.constant(0), finished=tf.zeros([batch], tf.bool),
                        num_new=tf.zeros([batch], tf.int32), out=tf.zeros([batch, capacity], tf.int32),
                        logits=logits, caches=caches, key_mask=key_mask, lengths=lengths, seen=seen)
    for length in cache_sizes:
        def fits(state, length=length):  # running, and the step's slot is inside this cache
            return tf.logical_and(
                tf.logical_and(state.step < steps, tf.logical_not(tf.reduce_all(state.finished))),
                prompt_len + state.step < length)

        caches, key_mask = grow_caches(state.caches, state.key_mask, length)
        state = tf.while_loop(fits, lambda s: (body(s),),
                              (state._replace(caches=caches, key_mask=key_mask),))[0]
    return state.out, state.num_new


class DecodeState(NamedTuple):
    """What `decode`'s loop carries from one step to the next."""

    step: Any  # int32 scalar: tokens generated so far (the same for every row)
    finished: Any  # bool [batch]: the row emitted a stop token
    num_new: Any  # int32 [batch]: tokens of each row, its stop token included
    out: Any  # int32 [batch, capacity]: the new tokens
    logits: Any  # float32 [batch, vocab]: the next-token logits
    caches: Any  # one (keys, values) pair per virtual layer
    key_mask: Any  # int32 [batch, slots]: 1 on written cache slots
    lengths: Any  # int32 [batch]: real tokens of each row (the next position)
    seen: Any  # float32 [batch, vocab]: tokens in the row so far (repetition penalty)


# ------------------------------------------------------------------ Python API
def round_up(value, multiple):
    return -(-value // multiple) * multiple


class Generator:
    """Compiled generation for one model: one traced function per `max_length`
    bucket (XLA compiles once per batch and prompt-length bucket).

    Args:
        model: an `ALGPT2LMHeadModel`.
        jit_compile: compile the loop with XLA (default True).
        tricks: the decode speed tricks to use (`decode_tricks.DecodeTricks`;
            default: this CPU's, `DecodeTricks.for_cpu()`). Its `wide_vectors`
            is a process setting the Generator does not apply itself: call
            `xla_flags.prefer_wide_vectors()` before the first XLA compilation
            (the `algpt2` command does, at start-up).

    Example:
    >>> from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel
    >>> model = ALGPT2LMHeadModel(ALGPT2Config.from_preset("algpt2-tiny"))
    >>> generator = Generator(model)
    >>> [len(ids) for ids in generator.generate([[464, 3290], [40]], max_new_tokens=8).new_ids]
    [8, 8]
    """

    def __init__(self, model, jit_compile=True, tricks=None):
        self.tricks = tricks or DecodeTricks.for_cpu()
        self.model = model
        self.jit_compile = jit_compile
        self._functions = {}
        self.trace_count = 0

    def _function(self, max_length, one_row):
        """The traced loop for a `max_length` bucket; `one_row`: for batch 1 only,
        where the row-major copies pay (made for larger batches, they cost up to 12%
        at batch 8 and serve no product: `benchmarks/results/decode_tricks_*.md`)."""
        key = (max_length, one_row)
        if key not in self._functions:
            model = self.model

            def run(prompt_ids, prompt_mask, max_new_tokens, temperature, top_k, top_p,
                    repetition_penalty, seed, stop_ids):
                self.trace_count += 1
                plan = DecodePlan(model, self.tricks, one_row=self.jit_compile and one_row)
                return decode(model, prompt_ids, prompt_mask, max_new_tokens,
                              (temperature, top_k, top_p, repetition_penalty), seed,
                              stop_ids, max_length, plan)

            batch = 1 if one_row else None
            signature = [tf.TensorSpec([batch, None], tf.int32), tf.TensorSpec([batch, None], tf.int32),
                         tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.float32),
                         tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.float32),
                         tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.int32),
                         tf.TensorSpec([None], tf.int32)]
            # autograph=False: the decode loop is an explicit `tf.while_loop`; skipping AutoGraph's
            # source conversion saves about 1 s of tracing per process (as in serving/batching.py).
            self._functions[key] = tf.function(
                run, input_signature=signature, jit_compile=self.jit_compile, autograph=False)
        return self._functions[key]

    def buckets(self, prompt_len, max_new_tokens):
        """`(padded prompt length, cache length)` for a request."""
        limit = self.model.config.max_positions
        check_fits(prompt_len, max_new_tokens, limit)
        padded = min(round_up(prompt_len, PROMPT_BUCKET), limit - max_new_tokens)
        max_length = min(round_up(padded + max_new_tokens, LENGTH_BUCKET), limit)
        return padded, max_length

    def generate(self, prompt_ids, max_new_tokens=32, params=None, seed=0, stop_ids=(),
                 pad_id=0):
        """Generates from token-id prompts (a list of lists, or an int array
        `[batch, len]` with no padding); returns a `GenerationOutput` without text."""
        prompts = self._checked(prompt_ids, max_new_tokens)
        params = params or SamplingParams(top_k=1)
        padded, max_length = self.buckets(max(len(p) for p in prompts), max_new_tokens)
        ids, mask = left_pad(prompts, padded, pad_id)
        new, counts = self._function(max_length, one_row=len(prompts) == 1)(
            ids, mask, np.int32(max_new_tokens), np.float32(params.temperature),
            np.int32(params.top_k), np.float32(params.top_p),
            np.float32(params.repetition_penalty), np.int32(seed or 0),
            np.asarray(list(stop_ids), np.int32).reshape(-1))
        new, counts = new.numpy(), counts.numpy()
        new_ids = [new[row, :counts[row]].tolist() for row in range(len(prompts))]
        return GenerationOutput(ids=[p + n for p, n in zip(prompts, new_ids)], new_ids=new_ids)

    def _checked(self, prompt_ids, max_new_tokens):
        prompts = check_prompts(prompt_ids, self.model.config.vocab_size)
        check_max_new_tokens(max_new_tokens)
        return prompts

    def stream(self, prompt_ids, max_new_tokens=32, params=None, seed=0, stop_ids=()):
        """Yields new token ids one by one for a single prompt (for terminals).

        Same tokens as `generate`; each step is a compiled call, so the cache
        crosses the Python boundary per token (slower than `generate`).
        """
        [prompt] = self._checked([prompt_ids], max_new_tokens)
        params = params or SamplingParams(top_k=1)
        padded, max_length = self.buckets(len(prompt), max_new_tokens)
        ids, mask = left_pad([prompt], padded)
        prefill, step = self._stream_functions(max_length)
        state = prefill(ids, mask)
        values = (np.float32(params.temperature), np.int32(params.top_k), np.float32(params.top_p),
                  np.float32(params.repetition_penalty))
        for i in range(max_new_tokens):
            token, state = step(np.int32(i), np.int32(padded + i), np.int32(seed or 0), values, state)
            token = int(token.numpy()[0])
            yield token
            if token in stop_ids:
                return

    def _stream_functions(self, max_length):
        key = ("stream", max_length)
        if key not in self._functions:
            model = self.model

            tricks = self.tricks  # no row-major copies: a copy per step costs more than it saves

            def first(ids, mask):
                return prefill(model, ids, mask, max_length, DecodePlan(model, tricks))

            def step(i, slot, seed, params, state):
                logits, caches, key_mask, lengths, seen = state
                tokens, seen, logits, key_mask, caches = sample_and_advance(
                    model, logits, seen, params, seed, i, slot, lengths, key_mask, caches,
                    DecodePlan(model, tricks))
                return tokens, (logits, caches, key_mask, lengths + 1, seen)

            self._functions[key] = (
                tf.function(first, jit_compile=self.jit_compile, autograph=False),
                tf.function(step, jit_compile=self.jit_compile, autograph=False))
        return self._functions[key]


_GENERATORS = weakref.WeakKeyDictionary()
"""model -> ((its `quantization` when compiled, the tricks), its generator): compiled
functions live as long as their model, and a model quantized since gets a new generator. The generator holds a
weak proxy of the model, so the entry never keeps its own key (and the model's weights and
compiled loops) alive."""


def generator_for(model, tricks=None):
    """The model's generator, created on first use and reused while the model's weights keep
    their form and the same `tricks` are asked for (`DecodeTricks`, default this CPU's): a
    `Generator` on TensorFlow, a `HostLoopGenerator` on torch and JAX
    (`host_loop_generation`)."""
    tricks = tricks or DecodeTricks.for_cpu()
    found = _GENERATORS.get(model)
    if found is None or found[0] != (model.quantization, tricks):
        if backend.is_tensorflow():
            generator = Generator(weakref.proxy(model), tricks=tricks)
        else:
            generator = HostLoopGenerator(weakref.proxy(model))
        found = _GENERATORS[model] = ((model.quantization, tricks), generator)
    return found[1]


def generate(model, prompts, max_new_tokens=32, sampler="greedy", seed=None, tokenizer=None,
             temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0, stop_ids=None,
             tricks=None, decoder=None):
    """Generates continuations of string or token-id prompts.

    Args:
        model: an `ALGPT2LMHeadModel` (or `ALGPT2Backbone`).
        prompts: a string, a list of strings, or token ids (a list of lists
            or an int array `[batch, len]`).
        max_new_tokens: the most tokens to add per prompt.
        sampler: "greedy", "sample", "top_k" or "top_p".
        seed: sampling seed (same seed, same text).
        tokenizer: a `GPT2Tokenizer` for string prompts (default: GPT-2's).
        temperature, top_k, top_p, repetition_penalty: see the module docstring.
        stop_ids: token ids that end a row (default: `<|endoftext|>`).
        tricks: the XLA loop's speed tricks (`decode_tricks.DecodeTricks`, default this
            CPU's; every exact trick gives the same tokens).
        decoder: what turns token ids into new ids: anything with `Generator`'s
            `generate(ids, max_new_tokens, params, seed, stop_ids)` (default: the model's
            compiled loop, `generator_for(model, tricks)`; `ALGPT2LMHeadModel.generate`
            passes the LiteRT engine's for `engine="litert"`).

    Returns:
        A `GenerationOutput` (with `text` when the prompts were strings).

    Example:
    >>> from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel
    >>> model = ALGPT2LMHeadModel(ALGPT2Config.from_preset("algpt2-tiny"))
    >>> out = model.generate("The meaning of life is", max_new_tokens=20, sampler="top_p", seed=1)
    >>> out.text[0].startswith("The meaning of life is"), len(out.new_ids[0]) <= 20
    (True, True)
    >>> model.generate("The meaning of life is", max_new_tokens=20, sampler="top_p", seed=1).text == out.text
    True
    """
    params = sampling_params(sampler, temperature, top_k, top_p, repetition_penalty)
    is_text = isinstance(prompts, str) or (
        isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts))
    if isinstance(prompts, str):
        prompts = [prompts]
    if is_text or stop_ids is None:
        tokenizer = tokenizer or getattr(model, "tokenizer", None) or GPT2Tokenizer()
    if stop_ids is None:
        stop_ids = [tokenizer.eos_id]
    if is_text:
        ids = [tokenizer.encode(p) or [tokenizer.eos_id] for p in prompts]
    else:
        ids = np.asarray(prompts).tolist() if isinstance(prompts, np.ndarray) else list(prompts)
    decoder = decoder or generator_for(model, tricks)
    out = decoder.generate(ids, max_new_tokens, params, seed, stop_ids)
    if is_text:
        out.text = [p + tokenizer.decode([t for t in new if t not in stop_ids])
                    for p, new in zip(prompts, out.new_ids)]
    return out
