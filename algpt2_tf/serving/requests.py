"""What every serving engine shares, with no TensorFlow: a request, the bounded queue that a
worker thread serves, and the checks a request passes before it waits.

`batching.BatchEngine` (XLA, batched) and `litert_serving.LiteRTEngine` (LiteRT, one at a
time) both subclass `RequestQueue`, so `algpt2 serve --engine litert` imports no TensorFlow.
"""

import collections
import dataclasses
import threading
from typing import Callable, List, NamedTuple, Optional, Tuple

from algpt2_tf.generation.prompts import check_fits, check_max_new_tokens, check_prompts
from algpt2_tf.generation.sampling import SamplingParams

MAX_LOGPROBS = 5
"""The most alternatives a token's log-probabilities list (OpenAI's completions limit)."""


class QueueFull(Exception):
    """The engine's queue holds `max_queue` requests already."""


class TokenLogprob(NamedTuple):
    """A token's log-probability and the `k` most likely tokens' (`[(id, logprob)]`, best first)."""

    logprob: float
    top: List[Tuple[int, float]]


def check_logprobs(k):
    """`k` alternatives per token: None (no log-probabilities) or 0..MAX_LOGPROBS."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, int)
                          or not 0 <= k <= MAX_LOGPROBS):
        raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {k!r}.")


@dataclasses.dataclass
class Request:
    """One generation request. `on_token(token_id)` is called from the
    engine's thread for each new token (`on_token(token_id, TokenLogprob)`
    when `logprobs` is set: how many alternatives, 0 to `MAX_LOGPROBS`), then
    `on_done(reason, error)` once: reason "stop" (a stop id), "length"
    (max_new_tokens), "cancelled", or "error" (with the exception)."""

    prompt_ids: List[int]
    max_new_tokens: int
    params: SamplingParams
    seed: int
    stop_ids: Tuple[int, ...]
    on_token: Callable[..., None]  # (token_id) or (token_id, TokenLogprob)
    on_done: Callable[[str, Optional[BaseException]], None]
    logprobs: Optional[int] = None
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self):
        self.cancelled.set()


class RequestQueue:
    """What every serving engine shares (`BatchEngine`, `litert_serving.LiteRTEngine`): checked
    `Request`s in a bounded queue that one worker thread serves, and a blocking helper. An
    engine sets `vocab_size` and `max_positions` (the longest prompt plus new tokens), then
    calls `_start`, and serves `self._pending` in its `_work`."""

    def _start(self, max_queue, thread_name):
        self.max_queue = max_queue
        self._pending = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=thread_name, daemon=True)
        self._thread.start()

    @property
    def waiting(self):
        return len(self._pending)

    def check(self, request):
        """Raises `ValueError` naming what this engine cannot run of `request`."""
        [request.prompt_ids] = check_prompts([request.prompt_ids], self.vocab_size)
        check_max_new_tokens(request.max_new_tokens)
        if not -2 ** 31 <= int(request.seed or 0) < 2 ** 31:
            raise ValueError(f"seed must fit in 32 bits, got {request.seed}.")
        check_fits(len(request.prompt_ids), request.max_new_tokens, self.max_positions)
        check_logprobs(request.logprobs)

    def submit(self, request):
        """Queues `request` after checking it (`ValueError` names the problem; `QueueFull`
        when `max_queue` requests wait already)."""
        self.check(request)
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting (the limit is "
                                f"{self.max_queue}); retry later.")
            self._pending.append(request)
            self._wake.notify()
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
        """Stops the worker after what it is running; requests still waiting end
        "cancelled"."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()
