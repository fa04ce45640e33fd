"""Batched generation for a server: concurrent requests share decode steps.

`BatchEngine` owns one model and one worker thread. Requests queue up; the
worker takes those that arrive within `window_s` of the first (at most
`max_batch`) and runs them as one batch: a prefill, then compiled calls of
`steps_per_call` decode steps for every row at once, handing each request
its tokens as they are made. A row stops at its own `max_new_tokens`, at one
of its stop ids, or when its client cancels, and its row is free again.

Continuous batching: between calls, waiting requests join the running batch
in free rows (all of them in one prefill call). Every row writes its next
token at the same cache slot, so a joining prompt is prefilled into its row
at the slots just before the current one (the rest of the row masked out);
positions count each row's own tokens, so from there the row computes what
a batch of its own would. A request joins when its padded prompt fits
before the current slot and its tokens after it (the cache grows, 64, 128,
256, ... slots, up to `max_positions`); otherwise it waits for the next
batch, first come first served. Before it would grow the cache (or wait),
the batch drops the leading slots that no running row uses any more and
shifts the rest left (compaction), so a busy batch keeps a short cache.

Each request keeps its own sampling settings and seed: `token_choice.choose_tokens`
(the one sampler of every path) picks a row's token from that row's logits, settings
and a uniform of `(seed, step)` alone, so a request gets the tokens it would get alone
with the same seed (tested), whatever else shares its batch, and the tokens
`model.generate` and `algpt2 generate` give with that seed.

A request may ask for log-probabilities (`Request.logprobs = k`, at most
`MAX_LOGPROBS`): each token then comes with its log-probability under the
model's own distribution (the log-softmax of the raw logits, before the
repetition penalty, temperature or top-k/top-p filtering, as vLLM's default)
and the `k` most likely tokens with theirs. The compiled steps compute them
only while a row in the batch asks; they never change which token is picked.
`prompt_logprobs` scores a prompt's own tokens the same way (for `echo`).

The queue is bounded (`QueueFull` when it is full: HTTP 429) and a request
can be cancelled at any time (a closed stream frees its row at the next step).
"""

import collections
import threading
import time

import numpy as np
import tensorflow as tf

from algpt2_tf.generation.decode_tricks import DecodePlan, DecodeTricks
from algpt2_tf.generation.generator import (PROMPT_BUCKET, cache_lengths, grow_caches, prefill,
                                            round_up, sample_and_advance)
from algpt2_tf.generation.prompts import check_fits, check_prompts, left_pad
from algpt2_tf.layers.attention import write_slots
from algpt2_tf.serving.requests import MAX_LOGPROBS, RequestQueue, TokenLogprob, check_logprobs


def top_logprobs(logits, k):
    """`(log_softmax(logits), top k ids, their log-probabilities)` of float `[..., vocab]`
    logits: the model's own distribution, nothing filtered."""
    logprobs = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)
    values, ids = tf.math.top_k(logprobs, k=k)
    return logprobs, ids, values


# ---------------------------------------------------------------- the engine
class BatchEngine(RequestQueue):
    """Runs queued `Request`s in batches on a worker thread (module docstring).

    Args:
        model: an `ALGPT2LMHeadModel` (TensorFlow backend).
        max_batch: the rows of a batch.
        window_s: how long the first request of a new batch waits for others.
        max_queue: the most requests waiting; `submit` raises `QueueFull` past it.
        batching: False runs every request alone (the unbatched baseline).
        steps_per_call: decode steps per compiled call; a client sees its
            tokens (and a cancel or a join takes effect) in groups of this many.
        tricks: the decode speed tricks (`decode_tricks.DecodeTricks`, default this CPU's),
            as `Generator` takes them: its steps and joins are `generation`'s step functions
            with a `DecodePlan` of these (the row-major copies only when `max_batch` is 1).

    Example:
    >>> from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel
    >>> engine = BatchEngine(ALGPT2LMHeadModel(ALGPT2Config.from_preset("algpt2-tiny")))
    >>> engine.generate([464, 3290], max_new_tokens=4)[1]
    'length'
    >>> engine.close()
    """

    def __init__(self, model, max_batch=16, window_s=0.01, max_queue=256, batching=True,
                 steps_per_call=4, tricks=None):
        self.model = model
        self.tricks = tricks or DecodeTricks.for_cpu()
        self.vocab_size = model.config.vocab_size
        self.max_positions = model.config.max_positions
        self.steps_per_call = steps_per_call
        self.max_batch = max_batch if batching else 1
        self.window_s = window_s
        self.active = 0
        self.batches_run = 0
        self.joined = 0  # requests that joined a running batch
        self._functions = {}
        self._functions_lock = threading.Lock()
        self.warmed = threading.Event()  # set when `warm_up` has compiled everything
        self._warming = None
        self._start(max_queue, "algpt2-batch-engine")

    # -------------------------------------------------------------- public
    def prompt_logprobs(self, prompt_ids, k=0):
        """`TokenLogprob`s of a prompt's tokens after the first (each given the
        ones before it), by one compiled forward pass; safe to call from any
        thread. Raises `ValueError` naming a bad prompt or `k`."""
        config = self.model.config
        [prompt_ids] = check_prompts([prompt_ids], config.vocab_size)
        check_logprobs(k)
        check_fits(len(prompt_ids), 0, config.max_positions)
        n = len(prompt_ids)
        length = min(round_up(n, PROMPT_BUCKET), config.max_positions)
        ids = np.zeros((1, length), np.int32)
        ids[0, :n] = prompt_ids  # right-padded: a causal model's earlier positions ignore it
        chosen, top_ids, top_values = (t.numpy()[0] for t in self._function("score", length)(ids))
        return [TokenLogprob(float(chosen[i]), list(zip(top_ids[i, :k].tolist(),
                                                        top_values[i, :k].tolist())))
                for i in range(n - 1)]

    def warm_up(self, prompt_tokens=PROMPT_BUCKET, background=False, then=None):
        """Compiles what a batch in the first cache segment runs, so no client
        waits on a compile: the joins of prompts of up to `prompt_tokens`
        tokens (at every row count of `join_widths`; a batch starts with
        one), the decode steps (without log-probabilities) and the
        compaction's shift. Call it before serving (`algpt2 serve` does unless
        `--no-warm-up`); returns the seconds it took.

        With `background`, it compiles what a lone request runs (the one-row
        join, the steps, the shift) and returns; the wider joins compile on a
        thread of their own while the engine serves (a batch that needs one
        first waits for it), and `then()` runs when they are done (with the
        whole warm-up otherwise). `warmed` is set once everything is compiled.

        Why: a first join inside a served batch compiled for 3.5 s on
        algpt2-tiny, stalling every row of that batch (benchmarks/serve_load.py);
        in the background, `algpt2 serve --model algpt2` answers without the joins
        of 2-16 rows (1.1-2.3 s each on Zen 5): its second start is ready in
        7.9 s instead of 14.8 (`benchmarks/cold_start.py`, with AutoGraph off too).
        """
        start = time.perf_counter()
        size, length = self.max_batch, cache_lengths(self.model.config.max_positions)[0]
        prompt_len = min(round_up(prompt_tokens, PROMPT_BUCKET), length - 1)
        ids, mask = np.zeros((size, prompt_len), np.int32), np.ones((size, prompt_len), np.int32)

        def join(width, state):
            return self._function("join", length, prompt_len, width)(
                state, np.zeros(width, np.int32), ids[:width], mask[:width], np.int32(prompt_len))

        state = join(1, self._empty_state(length))
        self._function("steps", length, False)(
            np.int32(1), np.int32(prompt_len), np.zeros(size, np.int32),
            tuple(self._filler_params(size)), state)
        if size > 1:
            self._function("shift", length)(state, np.int32(1))

        def wider_joins():
            warm = state
            for width in join_widths(size)[1:]:
                warm = join(width, warm)
            self.warmed.set()
            if then is not None:
                then()

        if background:
            self._warming = threading.Thread(target=wider_joins, name="algpt2-warm-up",
                                             daemon=True)
            self._warming.start()
        else:
            wider_joins()
        return time.perf_counter() - start

    def close(self):
        """Stops the worker after what it is running (requests still waiting end
        "cancelled"), and waits for a background warm-up to end."""
        super().close()
        if self._warming is not None:
            self._warming.join()

    # -------------------------------------------------------------- worker
    def _take_batch(self):
        """Waits for a request, then `window_s` for more; None once closed. A batch
        takes the requests whose prompts and new tokens fit in one cache together."""
        with self._wake:
            while not self._pending and not self._closed:
                self._wake.wait()
            if self._closed:
                return None
            deadline = time.monotonic() + self.window_s
            while len(self._pending) < self.max_batch and time.monotonic() < deadline:
                self._wake.wait(deadline - time.monotonic())
            # The first request, and those after it that fit in one cache with it (the longest
            # prompt and the most new tokens within max_positions); the others keep their place.
            limit = self.model.config.max_positions
            batch, left = [self._pending.popleft()], collections.deque()
            while self._pending:
                r = self._pending.popleft()
                together = batch + [r]
                fits = (max(len(q.prompt_ids) for q in together)
                        + max(q.max_new_tokens for q in together) <= limit)
                (batch if fits and len(batch) < self.max_batch else left).append(r)
            self._pending = left
            self.batches_run += 1  # counted as it starts: a request may end before the batch does
        return batch

    def _joiners(self, free, slot, length_limit):
        """Waiting requests that fit the running batch now, first come first
        served: a prompt (padded) must fit in the slots before `slot`, and its
        tokens in those after."""
        joiners = []
        with self._wake:
            while self._pending and len(joiners) < free and not self._closed:
                r = self._pending[0]
                if (round_up(len(r.prompt_ids), PROMPT_BUCKET) > slot
                        or slot + r.max_new_tokens > length_limit):
                    break
                joiners.append(self._pending.popleft())
        return joiners

    def _work(self):
        while True:
            batch = self._take_batch()
            if batch is None:
                break
            self._rows = []
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001  (every request in the batch hears of it)
                for r in self._rows:
                    if r is not None:
                        r.on_done("error", e)
            finally:
                self.active = 0
        with self._wake:
            left, self._pending = list(self._pending), collections.deque()
        for r in left:
            r.on_done("cancelled", None)

    def _run(self, requests):
        """One batch: prefill, then chunks of decode steps, admitting waiting
        requests into free rows between chunks, until no row is running."""
        limit = self.model.config.max_positions
        size = self.max_batch
        n = len(requests)
        longest_new = max(r.max_new_tokens for r in requests)
        padded = min(round_up(max(len(r.prompt_ids) for r in requests), PROMPT_BUCKET),
                     limit - longest_new)
        length = cache_length(padded + longest_new, limit)
        rows = self._rows = list(requests) + [None] * (size - n)  # (set early: errors reach them)
        params = self._filler_params(size)
        counts = np.zeros(size, np.int32)  # each row's tokens so far (its random stream's step)
        starts = np.zeros(size, np.int64)  # each row's first cache slot in use

        def admit(state, joiners, free, slot, length, prompt_len=None):
            """`_join`s `joiners` into rows `free` and records them there."""
            state = self._join(state, joiners, free, slot, length, prompt_len)
            for i, r in zip(free, joiners):
                rows[i], counts[i], starts[i] = r, 0, slot - len(r.prompt_ids)
                self._set_params(params, i, r)
            return state

        # The batch starts empty and its first requests join it: a prefill of as many rows as
        # they need (see `_join`), not of the whole batch.
        slot = padded
        state = admit(self._empty_state(length), requests, list(range(n)), slot, length,
                      prompt_len=padded)
        for i, r in enumerate(requests):
            if r.cancelled.is_set():
                rows[i] = None
                r.on_done("cancelled", None)
        while any(r is not None for r in rows):
            self.active = sum(r is not None for r in rows)
            free = [i for i, r in enumerate(rows) if r is None]
            drop = self._slots_to_drop(free, rows, starts, slot, length)
            if drop:
                state = self._function("shift", length)(state, np.int32(drop))
                slot -= drop
                starts -= drop
            joiners = self._joiners(len(free), slot, limit) if size > 1 else []
            if joiners:
                need = cache_length(slot + max(r.max_new_tokens for r in joiners), limit)
                if need > length:
                    state = self._function("grow", length, need)(state)
                    length = need
                state = admit(state, joiners, free, slot, length)
                self.joined += len(joiners)
            live = [i for i, r in enumerate(rows) if r is not None]
            count = min(self.steps_per_call,
                        max(rows[i].max_new_tokens - counts[i] for i in live))
            with_logprobs = any(rows[i].logprobs is not None for i in live)
            tokens, scores, state = self._function("steps", length, with_logprobs)(
                np.int32(count), np.int32(slot), counts.copy(), tuple(params), state)
            tokens = tokens.numpy()
            chosen, top_ids, top_values = (t.numpy() for t in scores) if with_logprobs else \
                (None,) * 3
            slot += count
            for k in range(count):
                for i in live:
                    r = rows[i]
                    if r is None:
                        continue
                    if r.cancelled.is_set():
                        rows[i] = None
                        r.on_done("cancelled", None)
                        continue
                    token = int(tokens[i, k])
                    if r.logprobs is None:
                        r.on_token(token)
                    else:
                        r.on_token(token, TokenLogprob(float(chosen[i, k]), list(zip(
                            top_ids[i, k, :r.logprobs].tolist(),
                            top_values[i, k, :r.logprobs].tolist()))))
                    if token in r.stop_ids or counts[i] + 1 == r.max_new_tokens:
                        rows[i] = None
                        r.on_done("stop" if token in r.stop_ids else "length", None)
                    counts[i] += 1

    def _empty_state(self, length):
        """A batch's state with no row in use: `(logits, caches, key_mask, lengths, seen)`."""
        model, size = self.model, self.max_batch
        vocab = model.config.vocab_size
        return (tf.zeros([size, vocab], model.embedding.compute_dtype),
                model.empty_caches(size, length, model.embedding.compute_dtype),
                tf.zeros([size, length], tf.int32), tf.zeros([size], tf.int32),
                tf.zeros([size, vocab]))

    def _join(self, state, joiners, free, slot, length, prompt_len=None):
        """Prefills the `joiners`' prompts into rows `free[:len(joiners)]` in one call,
        their prompts ending at cache slot `slot - 1` (padded to `prompt_len`, by
        default the longest prompt's `PROMPT_BUCKET` multiple).

        One prefill call for all who join between two calls, and for the
        requests a batch starts with: a call costs far more than its rows
        (`algpt2`, 16-token prompts, Zen 3, two runs: one row 91-92 ms, two
        121-135, four 129-136, eight 236-249, sixteen 423-441), so joining
        one at a time paid that per request, and starting with a prefill of
        all 16 rows cost 383 ms however few requests a batch had. The call's
        row count is one of `join_widths`, so few shapes compile; the extra
        rows repeat the first joiner's row, prompt and all (the same values
        written twice to the same places)."""
        prompt_len = prompt_len or max(round_up(len(r.prompt_ids), PROMPT_BUCKET)
                                       for r in joiners)
        width = next(w for w in join_widths(self.max_batch) if w >= len(joiners))
        prompts = [r.prompt_ids for r in joiners]
        rows = free[:len(joiners)]
        prompts += prompts[:1] * (width - len(joiners))
        rows += rows[:1] * (width - len(joiners))
        ids, mask = left_pad(prompts, prompt_len, 0)
        return self._function("join", length, prompt_len, width)(
            state, np.asarray(rows, np.int32), ids, mask, np.int32(slot))

    def _slots_to_drop(self, free, rows, starts, slot, length):
        """Compaction: how many leading cache slots to drop before admitting
        waiting requests (0: none). The running rows' slots shift left by the
        slots no running row uses any more, when the first waiting request's
        tokens would not fit in the cache otherwise (it would grow it, or wait
        for the next batch). Attention reads keys by mask, not by slot, so a
        shifted row computes the same; without this a busy batch's cache
        only grew (to 512 slots on algpt2-tiny, each step attending over all).
        """
        with self._wake:
            head = self._pending[0] if self._pending and free and self.max_batch > 1 else None
        if head is None or slot + head.max_new_tokens <= length:
            return 0
        return max(0, int(min(starts[i] for i, r in enumerate(rows) if r is not None)))

    @staticmethod
    def _filler_params(size):
        """The per-row sampling settings of `size` empty rows (greedy), as `steps` takes
        them: temperature, top_k, top_p, repetition penalty, seed."""
        return [np.full(size, 1.0, np.float32), np.ones(size, np.int32),
                np.ones(size, np.float32), np.ones(size, np.float32), np.zeros(size, np.int32)]

    @staticmethod
    def _set_params(params, i, r):
        p = r.params
        for array, value in zip(params, (p.temperature, p.top_k, p.top_p, p.repetition_penalty,
                                         int(r.seed or 0))):
            array[i] = value

    def _plan(self):
        """The `DecodePlan` of a compiled function (made while it is traced)."""
        return DecodePlan(self.model, self.tricks, one_row=self.max_batch == 1)

    def _function(self, kind, *shape):
        """The compiled function `kind` for cache `shape` (built on first use; the worker and a
        background warm-up may ask at once, and get the same one)."""
        # Every function is built with `autograph=False`: their loops and branches are explicit
        # (`tf.while_loop`), and skipping AutoGraph's source conversion took the synchronous warm-up
        # of a second `algpt2 serve --model algpt2` from 4.1 to 2.9 s (Zen 5, XLA programs cached).
        key = (kind,) + shape
        with self._functions_lock:
            if key not in self._functions:
                build = {"grow": self._build_grow,
                         "shift": self._build_shift,
                         "join": self._build_join, "steps": self._build_steps,
                         "score": self._build_score}[kind]
                self._functions[key] = build(*shape)
            return self._functions[key]

    def _build_score(self, length):
        """`ids [1, length] -> (logprob [1, length - 1], top ids, top logprobs)`: each
        position's next token scored by the model's own distribution."""
        model = self.model

        def score(ids):
            logits = model({"input_ids": ids})["logits"][:, :-1]
            logprobs, top_ids, top_values = top_logprobs(logits, MAX_LOGPROBS)
            chosen = tf.gather(logprobs, ids[:, 1:], batch_dims=2)
            return chosen, top_ids, top_values

        return tf.function(score, jit_compile=True, autograph=False)

    def _build_shift(self, length):
        """`(state, drop) -> state` with every row's cache slots moved `drop` to the left
        (the first `drop` slots are let go; the freed end is masked out)."""
        def shift(state, drop):
            logits, caches, key_mask, lengths, seen = state
            caches = [tuple(tf.roll(c, -drop, axis=2) for c in pair) for pair in caches]
            kept = tf.cast(tf.range(length) < length - drop, tf.int32)
            return logits, caches, tf.roll(key_mask, -drop, axis=1) * kept[None], lengths, seen

        return tf.function(shift, jit_compile=True, autograph=False)

    def _build_grow(self, length, new_length):
        def grow(state):
            logits, caches, key_mask, lengths, seen = state
            caches, key_mask = grow_caches(caches, key_mask, new_length)
            return logits, caches, key_mask, lengths, seen

        return tf.function(grow, jit_compile=True, autograph=False)

    def _build_join(self, length, prompt_len, width):
        """`(state, rows [W], ids [W, P], mask [W, P], slot) -> state` with the
        prompts prefilled into `rows`, at cache slots `slot - P .. slot - 1`
        (the rows' other slots masked out): from there each row's steps match
        a batch of its own. `rows` may repeat a row with the same prompt."""
        model = self.model

        def join(state, rows, ids, mask, slot):
            logits, caches, key_mask, lengths, seen = state
            new_logits, new_caches, new_mask, new_lengths, new_seen = prefill(
                model, ids, mask, prompt_len, self._plan())
            start = slot - prompt_len
            written = [tuple(write_slots(c, n, start, rows=rows) for c, n in zip(pair, new))
                       for pair, new in zip(caches, new_caches)]
            # The prompts' masks at slots start .. slot - 1, zeros elsewhere. Built by a roll,
            # not by concatenating zeros of sizes that depend on `slot`: a shape that depends on
            # an argument makes XLA compile anew for each of its values (2 s per join here).
            rows_mask = tf.roll(tf.pad(new_mask, [[0, 0], [0, length - prompt_len]]), start,
                                axis=1)
            at = rows[:, None]
            return (tf.tensor_scatter_nd_update(logits, at, new_logits),
                    written,
                    tf.tensor_scatter_nd_update(key_mask, at, rows_mask),
                    tf.tensor_scatter_nd_update(lengths, at, new_lengths),
                    tf.tensor_scatter_nd_update(seen, at, new_seen))

        return tf.function(join, jit_compile=True, autograph=False)

    def _build_steps(self, length, with_logprobs=False):
        """`(count, slot, counts, params, state) -> (tokens [batch, steps_per_call], logprobs,
        state)`: `count` decode steps from cache slot `slot` in one compiled call (a
        `tf.while_loop`), so the caches cross into Python once per `steps_per_call` tokens
        instead of once per token. `logprobs` is `()`, or with `with_logprobs` each token's
        log-probability `[batch, steps]` and the top `MAX_LOGPROBS` ids and log-probabilities
        `[batch, steps, MAX_LOGPROBS]`."""
        model, width = self.model, self.steps_per_call

        def steps(count, slot, counts, params, state):
            temperature, top_k, top_p, penalty, seeds = params
            batch = tf.shape(state[0])[0]
            plan = self._plan()  # before the loop: the row-major copies are made once a call

            def at(k):  # the indices of column k of a [batch, steps, ...] output
                return tf.stack([tf.range(batch), tf.fill([batch], k)], axis=1)

            def body(k, out, scores, state):
                logits, caches, key_mask, lengths, seen = state
                if with_logprobs:  # of the logits the token is chosen from
                    logprobs, ids, values = top_logprobs(logits, MAX_LOGPROBS)
                tokens, seen, logits, key_mask, caches = sample_and_advance(
                    model, logits, seen, (temperature, top_k, top_p, penalty), seeds, counts + k,
                    slot + k, lengths, key_mask, caches, plan)
                if with_logprobs:
                    chosen, top_ids, top_values = scores
                    scores = (tf.tensor_scatter_nd_update(
                                  chosen, at(k), tf.gather(logprobs, tokens, batch_dims=1)),
                              tf.tensor_scatter_nd_update(top_ids, at(k), ids),
                              tf.tensor_scatter_nd_update(top_values, at(k), values))
                out = tf.tensor_scatter_nd_update(out, at(k), tokens)
                return k + 1, out, scores, (logits, caches, key_mask, lengths + 1, seen)

            scores = (tf.zeros([batch, width]), tf.zeros([batch, width, MAX_LOGPROBS], tf.int32),
                      tf.zeros([batch, width, MAX_LOGPROBS])) if with_logprobs else ()
            _, out, scores, state = tf.while_loop(
                lambda k, *_: k < count, body,
                (tf.constant(0), tf.zeros([batch, width], tf.int32), scores, state))
            return out, scores, state

        return tf.function(steps, jit_compile=True, autograph=False)


def cache_length(needed, limit):
    """The cache length for `needed` slots: 64, 128, 256, ... or `limit` (few compiled shapes)."""
    return next(length for length in cache_lengths(limit) if length >= needed)


def join_widths(max_batch):
    """The row counts a join call compiles for: 1, 2, 4, ... below `max_batch`, then
    `max_batch` (a join of k requests runs at the first that holds k; each width is one
    more compile in `warm_up`, about 6 s for `algpt2`)."""
    widths, width = [], 1
    while width < max_batch:
        widths.append(width)
        width *= 2
    return widths + [max_batch]
