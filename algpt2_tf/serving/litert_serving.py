"""The serving engine of `algpt2 serve --engine litert`: the model's LiteRT build, one
request at a time.

`LiteRTEngine` takes the same `Request`s as `batching.BatchEngine` (so the OpenAI server runs
on either) and decodes each with `litert_engine.LiteRTGenerator`: the build's batch-1
`prefill_N`/`decode_N` steps and the one sampler's NumPy twin, so a request gets the tokens
the XLA engine gives it (greedy, and sampled with a seed, for a float32 build). Requests
queue (`max_queue`, then `QueueFull`: HTTP 429) and run in arrival order on one worker
thread; a cancelled request stops at its next token. Per-token log-probabilities come from
the same raw logits as on the XLA engine; scoring a prompt's own tokens (`echo` with
`logprobs`) needs every position's logits, which the build does not return: a 400 that says
to use `--engine xla`.

Where it pays: batch-1 requests (`algpt2`, int8 build, one client on Zen 4: 4.82x the XLA
engine's tokens per second at 0.20x its p99, benchmarks/README.md). Concurrent requests wait
for each other instead of sharing decode steps. A float32 build decodes 157.6 tokens/s at
batch 1 (peers.py), below the batching XLA engine's 295.2 at 16 clients; an int8 build
served 391.5 there (p99 0.75x), with a later first token (Zen 4).

Example:

>>> import tempfile
>>> from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel
>>> from algpt2_tf.export.litert_engine import cached_build
>>> model = ALGPT2LMHeadModel(ALGPT2Config(max_positions=32, hidden_size=32, num_layers=2,
...                                        num_heads=2, intermediate_size=64, embedding_size=16))
>>> folder = tempfile.mkdtemp()
>>> model.save(f"{folder}/m.keras")
>>> engine = LiteRTEngine(cached_build(f"{folder}/m.keras", cache=f"{folder}/c",
...                                     log=lambda *_: None))
>>> engine.generate([464, 3290], max_new_tokens=4)[1]
'length'
>>> engine.close()
"""

import time

import numpy as np

from algpt2_tf.export.litert_engine import LiteRTGenerator
from algpt2_tf.serving.requests import RequestQueue, TokenLogprob


def token_logprob(logits, token, k):
    """`TokenLogprob` of `token` under float `[vocab]` logits, with the `k` likeliest tokens'
    (the model's own distribution: nothing filtered)."""
    logits = logits.astype(np.float64)
    logprobs = logits - logits.max()
    logprobs -= np.log(np.exp(logprobs).sum())
    top = np.argsort(-logprobs, kind="stable")[:k]
    return TokenLogprob(float(logprobs[token]), [(int(i), float(logprobs[i])) for i in top])


class LiteRTEngine(RequestQueue):
    """Runs queued `requests.Request`s one by one on a LiteRT build (module docstring).

    Args:
        build: a `litert_engine.LiteRTBuild` (`cached_build`).
        max_queue: the most requests waiting; `submit` raises `QueueFull` past it.
        num_threads: LiteRT's CPU threads (default: all).
    """

    def __init__(self, build, max_queue=256, num_threads=None):
        self.build = build
        self.vocab_size = build.vocab_size
        self.max_positions = build.max_length
        self.generator = LiteRTGenerator(build, num_threads)
        self._start(max_queue, "algpt2-litert-engine")

    def prompt_logprobs(self, prompt_ids, k=0):
        raise ValueError("The litert engine does not score a prompt's own tokens (echo with "
                         "logprobs); serve with --engine xla for that.")

    def warm_up(self):
        """Decodes two tokens (LiteRT sets up its kernels on the first call); returns the
        seconds it took."""
        start = time.perf_counter()
        self.generator.generate([0], 2)
        return time.perf_counter() - start

    def _next(self):
        with self._wake:
            while not self._pending and not self._closed:
                self._wake.wait()
            if self._closed:
                return None
            return self._pending.popleft()

    def _work(self):
        while (request := self._next()) is not None:
            self._run(request)
        while self._pending:
            self._pending.popleft().on_done("cancelled", None)

    def _run(self, request):
        reason = "length"
        try:
            for token, logits in self.generator.steps(
                    request.prompt_ids, request.max_new_tokens, request.params, request.seed,
                    request.stop_ids):
                if request.cancelled.is_set():
                    reason = "cancelled"
                    break
                if request.logprobs is None:
                    request.on_token(token)
                else:
                    request.on_token(token, token_logprob(logits, token, request.logprobs))
                if token in request.stop_ids:
                    reason = "stop"
        except Exception as e:  # noqa: BLE001 (the request ends with the error; serving goes on)
            request.on_done("error", e)
            return
        request.on_done(reason, None)
