"""Batched generation for a server: concurrent requests share decode steps.

`BatchEngine` owns one model and one worker thread. Requests queue up; the
worker takes those that arrive within `window_s` of the first (at most
`max_batch`), runs them as one batch — a prefill, then one compiled decode
step per token for every row at once — and hands each request its tokens as
they are made. A row stops at its own `max_new_tokens`, at one of its stop
ids, or when its client cancels; the batch ends when every row has stopped,
and the next batch starts with the requests that queued meanwhile.

Each request keeps its own sampling settings and seed: `per_row_tokens`
picks a row's token from that row's logits, settings and a random stream
seeded by `(seed, step)` alone, so a request gets the tokens it would get
alone with the same seed (tested), whatever else shares its batch.

The queue is bounded (`QueueFull` when it is full: HTTP 429) and a request
can be cancelled at any time (a closed stream frees its row at the next step).
"""

import dataclasses
import queue
import threading
import time
from typing import Callable, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from algpt2_tf.generation import (LENGTH_BUCKET, PROMPT_BUCKET, SamplingParams, _advance,
                                  _mark_seen, _prefill, _round_up, first_argmax)
from algpt2_tf.prompts import check_max_new_tokens, check_prompts, left_pad

class QueueFull(Exception):
    """The engine's queue holds `max_queue` requests already."""


# ---------------------------------------------------------------- sampling
def per_row_tokens(logits, seen, temperature, top_k, top_p, penalty, seeds, step):
    """One token per row, each from its own settings and random stream.

    Args:
        logits: float `[batch, vocab]`; seen: float `[batch, vocab]` (1 on
            tokens already in the row, for the repetition penalty).
        temperature, top_p, penalty: float32 `[batch]`; top_k: int32
            `[batch]` (`top_k == 1` or `temperature <= 0` is greedy, `top_k
            == 0` and `top_p == 1` filter nothing), as in `SamplingParams`.
        seeds: int32 `[batch]`; step: int32 scalar.
    Returns:
        int32 `[batch]`. A sampled row draws by the Gumbel-max trick with
        uniforms from `stateless_uniform(seed=(seeds[b], step))`: the same
        row, seed and step give the same token in any batch.
    """
    logits = tf.cast(logits, tf.float32)
    vocab = tf.shape(logits)[-1]
    penalized = tf.where(
        seen > 0,
        tf.where(logits > 0, logits / penalty[:, None], logits * penalty[:, None]), logits)
    greedy = tf.logical_or(tf.equal(top_k, 1), temperature <= 0.0)

    def sampled():
        scaled = penalized / tf.maximum(temperature, 1e-6)[:, None]

        def filtered():  # top-k, then the nucleus of what top-k keeps
            ordered = tf.sort(scaled, direction="DESCENDING", axis=-1)
            k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)
            ranks = tf.range(vocab)[None, :]
            ordered = tf.where(ranks < k[:, None], ordered, -np.inf)
            before = tf.cumsum(tf.nn.softmax(ordered, axis=-1), axis=-1, exclusive=True)
            last = tf.maximum(tf.reduce_sum(tf.cast(before < top_p[:, None], tf.int32), -1) - 1, 0)
            last = tf.where(top_p < 1.0, tf.minimum(last, k - 1), k - 1)
            cutoff = tf.gather(ordered, last, batch_dims=1)[:, None]
            return tf.where(scaled < cutoff, -np.inf, scaled)

        needs_filter = tf.reduce_any(tf.logical_or(top_k > 1, top_p < 1.0))
        scaled = tf.cond(needs_filter, filtered, lambda: scaled)
        uniforms = tf.map_fn(
            lambda seed: tf.random.stateless_uniform([vocab], seed=tf.stack([seed, step]),
                                                     minval=1e-20, maxval=1.0),
            seeds, fn_output_signature=tf.float32)
        return first_argmax(scaled - tf.math.log(-tf.math.log(uniforms)))

    picked = tf.cond(tf.reduce_all(greedy), lambda: tf.zeros([tf.shape(logits)[0]], tf.int32),
                     sampled)
    return tf.where(greedy, first_argmax(penalized), picked)


# ---------------------------------------------------------------- requests
@dataclasses.dataclass
class Request:
    """One generation request. `on_token(token_id)` is called from the
    engine's thread for each new token, then `on_done(reason, error)` once:
    reason "stop" (a stop id), "length" (max_new_tokens), "cancelled", or
    "error" (with the exception)."""

    prompt_ids: List[int]
    max_new_tokens: int
    params: SamplingParams
    seed: int
    stop_ids: Tuple[int, ...]
    on_token: Callable[[int], None]
    on_done: Callable[[str, Optional[BaseException]], None]
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self):
        self.cancelled.set()


# ---------------------------------------------------------------- the engine
class BatchEngine:
    """Runs queued `Request`s in batches on a worker thread (module docstring).

    Args:
        model: an `ALGPT2LMHeadModel` (TensorFlow backend).
        max_batch: the most requests in one batch.
        window_s: how long the first request of a batch waits for others.
        max_queue: the most requests waiting; `submit` raises `QueueFull` past it.
        batching: False runs every request alone (the unbatched baseline).
        steps_per_call: decode steps per compiled call; a client sees its
            tokens (and a cancel takes effect) in groups of this many.

    Example:
    >>> from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel
    >>> engine = BatchEngine(ALGPT2LMHeadModel(ALGPT2Config.from_preset("algpt2-tiny")))
    >>> engine.generate([464, 3290], max_new_tokens=4)[1]
    'length'
    >>> engine.close()
    """

    def __init__(self, model, max_batch=16, window_s=0.01, max_queue=256, batching=True,
                 steps_per_call=4):
        self.model = model
        self.steps_per_call = steps_per_call
        self.max_batch = max_batch if batching else 1
        self.window_s = window_s
        self.max_queue = max_queue
        self._queue = queue.Queue()
        self._lock = threading.Lock()
        self.waiting = 0
        self.active = 0
        self.batches_run = 0
        self._prefills, self._steps = {}, {}
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="algpt2-batch-engine", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- public
    def submit(self, request):
        """Queues `request` after checking it (`ValueError` names the problem)."""
        config = self.model.config
        [request.prompt_ids] = check_prompts([request.prompt_ids], config.vocab_size)
        check_max_new_tokens(request.max_new_tokens)
        if len(request.prompt_ids) + request.max_new_tokens > config.max_positions:
            raise ValueError(f"The prompt ({len(request.prompt_ids)} tokens) plus max_new_tokens "
                             f"({request.max_new_tokens}) exceeds max_positions "
                             f"({config.max_positions}).")
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if self.waiting >= self.max_queue:
                raise QueueFull(f"{self.waiting} requests are waiting (the limit is "
                                f"{self.max_queue}); retry later.")
            self.waiting += 1
        self._queue.put(request)
        return request

    def generate(self, prompt_ids, max_new_tokens=16, params=None, seed=0, stop_ids=()):
        """Blocking helper: `(new token ids, finish reason)` for one prompt."""
        tokens, done = [], threading.Event()
        result = {}

        def finished(reason, error):
            result.update(reason=reason, error=error)
            done.set()

        self.submit(Request(list(prompt_ids), max_new_tokens, params or SamplingParams(top_k=1),
                            seed, tuple(stop_ids), tokens.append, finished))
        done.wait()
        if result["error"] is not None:
            raise result["error"]
        return tokens, result["reason"]

    def close(self):
        """Stops the worker after the batch it is running."""
        with self._lock:
            self._closed = True
        self._queue.put(None)
        self._thread.join()

    # -------------------------------------------------------------- worker
    def _take_batch(self):
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # close after this batch
                break
            batch.append(item)
        with self._lock:
            self.waiting -= len(batch)
            self.active = len(batch)
            self.batches_run += 1  # counted as it starts: a request may end before the batch does
        return batch

    def _work(self):
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [r for r in batch if not r.cancelled.is_set()]
            for r in batch:
                if r.cancelled.is_set():
                    r.on_done("cancelled", None)
            try:
                if live:
                    self._run(live)
            except Exception as e:  # noqa: BLE001  (every request hears of it)
                for r in live:
                    r.on_done("error", e)
            finally:
                with self._lock:
                    self.active = 0

    def _run(self, requests):
        n = len(requests)
        # Two batch shapes: one request alone, or a full batch (filler rows cost little next to
        # the seconds each new shape spends compiling while every client waits).
        size = 1 if n == 1 else self.max_batch
        limit = self.model.config.max_positions
        longest_new = max(r.max_new_tokens for r in requests)
        padded = min(_round_up(max(len(r.prompt_ids) for r in requests), PROMPT_BUCKET),
                     limit - longest_new)
        max_length = min(_round_up(padded + longest_new, LENGTH_BUCKET), limit)
        prompts = [r.prompt_ids for r in requests] + [[0]] * (size - n)  # filler rows
        ids, mask = left_pad(prompts, padded, 0)
        rows = lambda values, dtype: np.asarray(values + [values[0]] * (size - n), dtype)  # noqa: E731
        params = (rows([r.params.temperature for r in requests], np.float32),
                  rows([r.params.top_k for r in requests], np.int32),
                  rows([r.params.top_p for r in requests], np.float32),
                  rows([r.params.repetition_penalty for r in requests], np.float32),
                  rows([int(r.seed or 0) for r in requests], np.int32))
        state = self._prefill(max_length)(ids, mask)
        steps_fn = self._steps_function(max_length)
        running = [True] * n
        counts = [0] * n
        for first in range(0, longest_new, self.steps_per_call):
            count = min(self.steps_per_call, longest_new - first)
            tokens, state = steps_fn(np.int32(first), np.int32(count), np.int32(padded), params,
                                     state)
            tokens = tokens.numpy()
            for k in range(count):
                for row, r in enumerate(requests):
                    if not running[row]:
                        continue
                    if r.cancelled.is_set():
                        running[row] = False
                        r.on_done("cancelled", None)
                        continue
                    token = int(tokens[row, k])
                    r.on_token(token)
                    counts[row] += 1
                    if token in r.stop_ids or counts[row] == r.max_new_tokens:
                        running[row] = False
                        r.on_done("stop" if token in r.stop_ids else "length", None)
            if not any(running):
                return

    def _prefill(self, max_length):
        if max_length not in self._prefills:
            model = self.model
            self._prefills[max_length] = tf.function(
                lambda ids, mask: _prefill(model, ids, mask, max_length), jit_compile=True)
        return self._prefills[max_length]

    def _steps_function(self, max_length):
        """`(first, count, padded, params, state) -> (tokens [batch, steps_per_call], state)`:
        decode steps `first .. first + count - 1` in one compiled call (a `tf.while_loop`), so
        the caches cross into Python once per `steps_per_call` tokens instead of once per token."""
        if max_length not in self._steps:
            model, width = self.model, self.steps_per_call

            def steps(first, count, padded, params, state):
                temperature, top_k, top_p, penalty, seeds = params
                batch = tf.shape(state[0])[0]

                def body(k, out, state):
                    logits, caches, key_mask, lengths, seen = state
                    i = first + k
                    tokens = per_row_tokens(logits, seen, temperature, top_k, top_p, penalty,
                                            seeds, i)
                    seen = _mark_seen(seen, tokens[:, None], tf.ones_like(tokens)[:, None])
                    logits, key_mask, caches = _advance(model, tokens, padded + i, lengths,
                                                        key_mask, caches)
                    out = tf.tensor_scatter_nd_update(
                        out, tf.stack([tf.range(batch), tf.fill([batch], k)], axis=1), tokens)
                    return k + 1, out, (logits, caches, key_mask, lengths + 1, seen)

                _, out, state = tf.while_loop(lambda k, *_: k < count, body,
                                              (tf.constant(0), tf.zeros([batch, width], tf.int32),
                                               state))
                return out, state

            self._steps[max_length] = tf.function(steps, jit_compile=True)
        return self._steps[max_length]
