"""An OpenAI-compatible completions server for a Keras ALGPT2 model.

Endpoints (the subset of https://platform.openai.com/docs/api-reference that
a base language model can honestly serve, as vLLM's server does):

    GET  /v1/models              the one served model
    GET  /v1/models/{model}
    POST /v1/completions         prompt (string, list of strings, token ids),
                                 max_tokens, temperature, top_p, seed, stop,
                                 n, stream, echo, logprobs (0..5); usage
                                 counts tokens
    POST /v1/chat/completions    400: a base LM has no chat format

Streaming is Server-Sent Events, one chunk per token as it is made (text
that could still become a stop sequence, or an incomplete UTF-8 character,
waits for the next token), then `data: [DONE]`; with
`stream_options.include_usage` a last chunk carries the usage. Requests
share decode steps through `batching.BatchEngine`. Choice `j` of a request
with `seed` s (any integer, taken mod 2**31) samples with seed `s + j`
(`sampling.row_seed`), as row `j` of `model.generate` with that seed does: the same tokens
as `algpt2 generate --seed s+j`;
without a seed, each choice draws a random one. `temperature=0` is greedy.

`logprobs: k` gives, per token, its log-probability under the model's own
distribution (raw logits, before temperature and top-p, as vLLM reports
them) and the `k` likeliest tokens' (the chosen one is always listed), in the
legacy shape `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`;
with `echo`, the prompt's tokens too (the first has none). Tokens are named
by their own decoded text (a byte that is half of a UTF-8 character decodes
as U+FFFD). A streamed chunk carries the tokens whose text starts in it; a
token wholly cut off by a stop sequence is not listed.

Errors have OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}`: 400 bad parameters, 401 a missing or wrong API key (when one is
set), 404 an unknown model or path, 413 a body over the limit, 429 a full
queue, 504 past the per-request time limit.
"""

import asyncio
import json
import os
import secrets
import sys
import time
import uuid
from typing import List, Optional, Union

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from algpt2_tf.export.litert_engine import cached_build
from algpt2_tf.generation.sampling import SamplingParams, row_seed
from algpt2_tf.runtime import xla_cache
from algpt2_tf.saving import load_model, load_tokenizer_for
from algpt2_tf.serving.requests import MAX_LOGPROBS, QueueFull, Request
from algpt2_tf.serving.request_body import (BodyTimeout, BodyTooLarge, RequireAPIKey, check_binding,
                                            read_limited, run_app)

MAX_N = 16
MAX_STOPS = 4


class APIError(Exception):
    """An error answered in OpenAI's JSON shape with an HTTP status."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (status, message, param,
                                                                       code, kind)

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self):
        return JSONResponse(self.body(), status_code=self.status)


def sse(event):
    """One Server-Sent Events `data:` line for a JSON-able event."""
    return "data: " + json.dumps(event) + "\n\n"


# ------------------------------------------------------------------ parameters
class CompletionBody(BaseModel):
    """The fields of a /v1/completions body, typed strictly: a string is not a
    boolean, a boolean is not a token id, NaN is not a temperature, and a field this
    server does not know is an error that names it (nothing is silently ignored)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    model: Optional[str] = None
    prompt: Union[str, List[Union[str, List[int], int]]] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    n: Optional[int] = Field(None, ge=1, le=MAX_N)
    best_of: Optional[int] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, List[str]]] = None
    stream: Optional[bool] = None
    stream_options: Optional["StreamOptions"] = None
    echo: Optional[bool] = None
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: Optional[str] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    user: Optional[str] = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    include_usage: Optional[bool] = None


CompletionBody.model_rebuild()


def _schema_error(error):
    """A pydantic `ValidationError` as one 400 naming the field."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    if first["type"] == "extra_forbidden":
        message = f"Unknown field '{where}': this server does not support it."
    else:
        message = f"'{where}': {first['msg']} (got {first.get('input')!r:.80})."
    return APIError(400, message, str(first["loc"][0]) if first["loc"] else None)


def _valid_text(text, where):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, e.g. "\ud800" in the JSON
        raise APIError(400, f"'{where}' is not valid Unicode: {e.reason} at character "
                            f"{e.start}.", where) from None
    return text


def parse_completion(body, model_name, tokenizer, max_positions, max_queue=None,
                     max_response_bytes=None):
    """Checks a /v1/completions body (`CompletionBody`, then the limits); returns a dict of
    what the handler needs. Tokenizes the prompts: run it off the event loop."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    try:
        req = CompletionBody.model_validate(body)
    except ValidationError as e:
        raise _schema_error(e) from None
    if req.model != model_name:
        raise APIError(404, f"The model '{req.model}' does not exist; this server "
                            f"serves '{model_name}'.", "model", "model_not_found")
    if req.suffix is not None:
        raise APIError(400, "'suffix' is not supported by this server.", "suffix")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0.0):
            raise APIError(400, f"'{name}' is not supported by this server (only 0).", name)
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    elif (isinstance(prompt, list) and prompt
          and all(isinstance(p, str) or (isinstance(p, list) and p) for p in prompt)):
        prompts = prompt
    else:
        raise APIError(400, "'prompt' must be a string, a list of strings, a list of token "
                            "ids or a list of such lists.", "prompt")
    ids = []
    for p in prompts:
        if isinstance(p, str):
            ids.append(tokenizer.encode(_valid_text(p, "prompt")) or [tokenizer.eos_id])
        else:
            if not all(0 <= t < tokenizer.vocab_size for t in p):
                raise APIError(400, f"Token ids must be in [0, {tokenizer.vocab_size}).", "prompt")
            ids.append(list(p))
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    longest = max(len(i) for i in ids)
    if longest + max_tokens > max_positions:
        raise APIError(400, f"The prompt ({longest} tokens) plus max_tokens ({max_tokens}) "
                            f"exceeds the model's context of {max_positions} tokens.",
                       "max_tokens", "context_length_exceeded")
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    n = 1 if req.n is None else req.n
    if req.best_of not in (None, n):
        raise APIError(400, "'best_of' is not supported by this server (only equal to n).",
                       "best_of")
    if max_queue is not None and len(ids) * n > max_queue:
        raise APIError(400, f"The request asks for {len(ids)} prompt(s) x n={n} = "
                            f"{len(ids) * n} generations; this server queues at most "
                            f"{max_queue} (--max-queue), so it could never run. Send fewer "
                            "prompts or a smaller n per request.", "n")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > MAX_STOPS or not all(s for s in stops):
        raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} "
                            "non-empty strings.", "stop")
    for stop in stops:
        _valid_text(stop, "stop")
    echo, stream = bool(req.echo), bool(req.stream)
    if max_response_bytes is not None:
        size = response_bytes_estimate(len(ids) * n, max_tokens, longest if echo else 0,
                                       req.logprobs, stream)
        if size > max_response_bytes:
            raise APIError(413, f"The response could be about {size:,} bytes, over the limit "
                                f"of {max_response_bytes:,} (--max-response-bytes); ask for "
                                "fewer tokens, choices, prompts or logprobs.", "max_tokens",
                           "response_too_large")
    options = req.stream_options
    return {"prompts": prompts, "ids": ids, "max_tokens": max_tokens, "n": n, "seed": req.seed,
            "stops": stops, "echo": echo, "logprobs": req.logprobs, "stream": stream,
            "include_usage": bool(options is not None and options.include_usage),
            "params": SamplingParams(temperature=float(temperature),
                                     top_k=1 if temperature == 0 else 0, top_p=float(top_p))}


BYTES_PER_TOKEN = 24
"""A generated token's text in JSON, about (most GPT-2 tokens are 2-8 characters;
escapes take more): the response-size estimate's unit."""
BYTES_PER_LOGPROB = 48
"""One `{token: logprob}` entry with its number."""
BYTES_PER_EVENT = 256
"""A streamed chunk's fixed part (id, model, choice, `data: ` framing)."""


def response_bytes_estimate(choices, max_tokens, echoed_tokens, logprobs, stream):
    """About how many bytes the answer to a completion request can take, before any of it
    is computed: every choice at `max_tokens` tokens (plus the echoed prompt), each with
    its `logprobs` alternatives, each a chunk of its own when streamed."""
    tokens = max_tokens + echoed_tokens
    per_token = BYTES_PER_TOKEN
    if logprobs is not None:
        per_token += BYTES_PER_LOGPROB * (logprobs + 2)  # the chosen one, its offset
    if stream:
        per_token += BYTES_PER_EVENT
    return choices * (tokens * per_token + BYTES_PER_EVENT)


# ------------------------------------------------------------------ text
def held_back(text, stops):
    """How many characters at the end of `text` must wait: the start of a
    stop sequence, or an incomplete UTF-8 character (decoded as U+FFFD)."""
    wait = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                wait = max(wait, k)
                break
    return wait


class Choice:
    """One choice's tokens, text and end, fed from the engine's thread into
    an asyncio queue of events for the handler."""

    def __init__(self, index, prompt, prompt_ids, echo, stops, tokenizer, loop, logprobs=False):
        self.index, self.stops, self.tokenizer, self.loop = index, stops, tokenizer, loop
        self.logprobs = logprobs  # the request asked for log-probabilities
        self.prefix = (prompt if isinstance(prompt, str) else tokenizer.decode(prompt_ids)) \
            if echo else ""
        self.tokens = []
        self.sent = 0  # characters of `text` already given out
        self.text = ""
        self.finish_reason = None
        self.cut = False  # a stop sequence cut `text`
        self.events = asyncio.Queue()
        self.request = None
        self.echoed = []  # the echoed prompt's log-probability entries (set by the handler)
        self.scores = []  # the `TokenLogprob` of each token
        self.offsets = []  # where each token's text starts in `text` (before a cut)
        self.reported = 0  # tokens whose log-probabilities went out

    # engine thread -> event loop
    def on_token(self, token, logprob=None):
        self.loop.call_soon_threadsafe(self.events.put_nowait, ("token", (token, logprob)))

    def on_done(self, reason, error):
        self.loop.call_soon_threadsafe(self.events.put_nowait, ("done", (reason, error)))

    # event loop
    def add(self, token, logprob=None):
        """Takes a token; returns the text that can go out now ("" if none)."""
        if token == self.tokenizer.eos_id:
            return None
        self.offsets.append(len(self.text))
        self.tokens.append(token)
        self.scores.append(logprob)
        self.text = self.tokenizer.decode(self.tokens)
        for stop in self.stops:
            at = self.text.find(stop)
            if at >= 0:
                self.text = self.text[:at]
                self.finish_reason = "stop"
                self.cut = True
                self.request.cancel()
                break
        ready = len(self.text) if self.finish_reason else len(self.text) - held_back(
            self.text, self.stops)
        out, self.sent = self.text[self.sent:max(ready, self.sent)], max(ready, self.sent)
        return out

    def rest(self):
        out, self.sent = self.text[self.sent:], len(self.text)
        return out

    def new_entries(self, ended=False):
        """Log-probability entries `(token text, logprob, {text: logprob}, offset)` of the
        tokens not reported yet whose text starts in what went out (all of them once the
        choice `ended`, but for those a stop sequence cut off); none unless asked for."""
        if not self.logprobs:
            return []
        upto = len(self.text) if self.cut or not ended else None
        entries = []
        while self.reported < len(self.tokens) and (upto is None
                                                    or self.offsets[self.reported] < upto):
            i = self.reported
            entries.append(logprob_entry(self.tokenizer, self.tokens[i], self.scores[i],
                                         len(self.prefix) + self.offsets[i]))
            self.reported += 1
        return entries

    async def events_until_done(self, timeout_s):
        """Yields `(text piece, log-probability entries)` until the choice ends (sets
        `finish_reason`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if not self.events.empty():  # tokens come `steps_per_call` at a time: no wait
                    kind, value = self.events.get_nowait()
                else:
                    kind, value = await asyncio.wait_for(self.events.get(),
                                                         max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                self.request.cancel()
                raise APIError(504, f"The request took longer than {timeout_s:g} s.",
                               code="timeout", kind="timeout_error")
            if kind == "token":
                if self.finish_reason:
                    continue  # a stop sequence ended it; the engine has not seen the cancel yet
                piece = self.add(*value)
                if piece is None:  # <|endoftext|>
                    self.finish_reason = "stop"
                elif piece:
                    yield piece, self.new_entries()
            else:
                reason, error = value
                if error is not None:
                    raise APIError(500, f"Generation failed: {error}", kind="server_error")
                if not self.finish_reason:
                    self.finish_reason = "stop" if reason == "stop" else "length"
                piece, entries = self.rest(), self.new_entries(ended=True)
                if piece or entries:
                    yield piece, entries
                return


def logprob_entry(tokenizer, token, score, offset):
    """One token's `(text, logprob, {text: logprob} of the alternatives and itself, offset)`;
    `score` None (a prompt's first token) gives no log-probabilities."""
    text = tokenizer.decode([token])
    if score is None:
        return text, None, None, offset
    top = {tokenizer.decode([t]): value for t, value in score.top}
    top.setdefault(text, score.logprob)
    return text, score.logprob, top, offset


def prompt_entries(engine, tokenizer, ids, k):
    """The echoed prompt's log-probability entries (its first token has none)."""
    scores = [None] + engine.prompt_logprobs(ids, k)
    return [logprob_entry(tokenizer, t, score, len(tokenizer.decode(ids[:i])))
            for i, (t, score) in enumerate(zip(ids, scores))]


def logprobs_json(entries):
    """OpenAI's legacy completions `logprobs` object."""
    return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
            "top_logprobs": [e[2] for e in entries], "text_offset": [e[3] for e in entries]}


# ------------------------------------------------------------------ the app
def create_app(engine, tokenizer, model_name, api_key=None, max_request_bytes=1 << 20,
               timeout_s=60.0, max_response_bytes=32 << 20):
    """The FastAPI app serving `engine`'s model as `model_name`.

    Args:
        engine: the `BatchEngine` (or `litert_serving.LiteRTEngine`).
        tokenizer: the model's tokenizer.
        model_name: the served name (requests must name it).
        api_key: when set, every request (the docs too) needs `Authorization: Bearer KEY`.
        max_request_bytes: the largest body (413).
        timeout_s: the time a request may take, its body's arrival included (408, 504).
        max_response_bytes: the largest answer a request may ask for, estimated before
            anything runs (`response_bytes_estimate`; 413).
    """
    for name, value in (("max_request_bytes", max_request_bytes), ("timeout_s", timeout_s),
                        ("max_response_bytes", max_response_bytes)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}.")
    app = FastAPI(title="algpt2 OpenAI-compatible API")
    created = int(time.time())
    max_positions = engine.max_positions

    @app.exception_handler(APIError)
    async def _api_error(request, exc):
        return exc.response()

    @app.exception_handler(404)
    async def _not_found(request, exc):
        return APIError(404, f"Unknown path {request.url.path}.", code="not_found").response()

    @app.exception_handler(405)
    async def _method(request, exc):
        return APIError(405, f"Method {request.method} not allowed on {request.url.path}.")\
            .response()

    if api_key:
        app.add_middleware(RequireAPIKey, api_key=api_key, reject=lambda: APIError(
            401, "Invalid or missing API key: send 'Authorization: Bearer KEY'.",
            code="invalid_api_key").response())

    def model_card():
        return {"id": model_name, "object": "model", "created": created, "owned_by": "algpt2-tf",
                "max_model_len": max_positions}

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    def get_model(name: str):
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist.", "model", "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat():
        raise APIError(400, f"'{model_name}' is a base language model with no chat format; "
                            "send a prompt to /v1/completions instead.", "messages",
                       "chat_not_supported")

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = await read_json_body(http, max_request_bytes, timeout_s)
        loop = asyncio.get_running_loop()
        # Off the event loop: tokenizing a large prompt takes long enough to stall every stream.
        spec = await loop.run_in_executor(None, parse_completion, body, model_name, tokenizer,
                                          max_positions, engine.max_queue, max_response_bytes)
        echoed = await echoed_prompts(loop, engine, tokenizer, spec)
        choices = submit_choices(engine, tokenizer, loop, spec, echoed)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": model_name}
        if not spec["stream"]:
            return await completed(choices, spec, meta, timeout_s)
        return StreamingResponse(streamed(choices, spec, meta, timeout_s),
                                 media_type="text/event-stream")

    return app


# ------------------------------------------------------- one completion request
async def read_json_body(http, max_request_bytes, timeout_s):
    """The request's JSON body, read within the size and time limits (413, 408, 400)."""
    try:
        raw = await read_limited(http, max_request_bytes, timeout_s)
    except BodyTooLarge as e:
        raise APIError(413, f"The request body is {e}.", code="request_too_large") from None
    except BodyTimeout as e:
        raise APIError(408, str(e), code="timeout", kind="timeout_error") from None
    try:
        return json.loads(raw)
    except ValueError as e:
        raise APIError(400, f"The request body is not valid JSON: {e}.")


async def echoed_prompts(loop, engine, tokenizer, spec):
    """prompt number -> its echoed log-probability entries (`echo` with `logprobs`), else {}."""
    echoed = {}
    if spec["echo"] and spec["logprobs"] is not None:
        try:
            for p, ids in enumerate(spec["ids"]):
                echoed[p] = await loop.run_in_executor(None, prompt_entries, engine, tokenizer,
                                                       ids, spec["logprobs"])
        except ValueError as e:
            raise APIError(400, str(e))
    return echoed


def submit_choices(engine, tokenizer, loop, spec, echoed):
    """Submits every choice of the request (choice `j` of a prompt seeded `row_seed(seed, j)`,
    or at random without a seed); none runs when one is refused (429 queue full, 400)."""
    k = spec["logprobs"]
    choices = []
    try:
        for p, (prompt, ids) in enumerate(zip(spec["prompts"], spec["ids"])):
            for j in range(spec["n"]):
                seed = row_seed(spec["seed"] % 2 ** 31, j) if spec["seed"] is not None else \
                    secrets.randbelow(2 ** 31)
                choice = Choice(p * spec["n"] + j, prompt, ids, spec["echo"], spec["stops"],
                                tokenizer, loop, logprobs=k is not None)
                choice.echoed = echoed.get(p, [])
                choice.request = engine.submit(Request(
                    ids, spec["max_tokens"], spec["params"], seed, (tokenizer.eos_id,),
                    choice.on_token, choice.on_done, logprobs=k))
                choices.append(choice)
    except (QueueFull, ValueError) as e:  # none of the request runs
        for c in choices:
            c.request.cancel()
        if isinstance(e, QueueFull):
            raise APIError(429, str(e), code="queue_full", kind="rate_limit_error")
        raise APIError(400, str(e))
    return choices


def usage_of(spec, choices):
    prompt_tokens = sum(len(ids) for ids in spec["ids"])
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def _logprobs(spec, entries):
    return None if spec["logprobs"] is None else logprobs_json(entries)


async def completed(choices, spec, meta, timeout_s):
    """The whole answer, once every choice is done (a choice past `timeout_s`: 504)."""
    entries = {c.index: list(c.echoed) for c in choices}
    try:
        for c in choices:
            async for _, new in c.events_until_done(timeout_s):
                entries[c.index] += new
    finally:
        for c in choices:
            c.request.cancel()  # a no-op for finished ones
    return {**meta, "choices": [
        {"text": c.prefix + c.text, "index": c.index,
         "logprobs": _logprobs(spec, entries[c.index]), "finish_reason": c.finish_reason}
        for c in choices], "usage": usage_of(spec, choices)}


async def streamed(choices, spec, meta, timeout_s):
    """The answer as server-sent events, every choice's pieces as they come; the rows are
    freed when the client goes away."""
    def chunk(index, text, finish_reason=None, entries=()):
        return sse({**meta, "choices": [{"text": text, "index": index,
                                         "logprobs": _logprobs(spec, entries),
                                         "finish_reason": finish_reason}]})

    queue = asyncio.Queue()

    async def pump(c):  # one task per choice, all feeding one stream
        try:
            if c.prefix:
                await queue.put(chunk(c.index, c.prefix, entries=c.echoed))
            async for piece, entries in c.events_until_done(timeout_s):
                await queue.put(chunk(c.index, piece, entries=entries))
            await queue.put(chunk(c.index, "", c.finish_reason))
        except APIError as e:
            await queue.put(sse(e.body()))
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        ended = 0
        while ended < len(tasks):
            # The engine hands over a row's tokens `steps_per_call` at a time: what is queued
            # goes out in one write (still one SSE event per token).
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            ended += items.count(None)
            if any(item is not None for item in items):
                yield "".join(item for item in items if item is not None)
        if spec["include_usage"]:
            yield sse({**meta, "choices": [], "usage": usage_of(spec, choices)})
        yield "data: [DONE]\n\n"
    finally:  # the client went away, or the stream ended: free the rows
        for c in choices:
            c.request.cancel()
        for t in tasks:
            t.cancel()


def choose_engine(engine, model_path, quantize="none", max_batch=16, batching=True,
                  cache=None):
    """The engine `engine="auto"` serves with, when a current LiteRT build of the model is
    cached (so start-up builds nothing): "litert" when the server runs one request at a time
    (`max_batch` 1 or no batching: LiteRT's batch-1 decode is the fastest measured), and for an
    int8 (or int4) build even when it batches (`algpt2`, 16 clients streaming 16 tokens, Zen 4: one
    request at a time on LiteRT int8 served 391.5 tokens/s with a p99 of 684 ms, XLA's
    continuous batching 295.2 and 913 ms; `benchmarks/README.md`); else "xla". Other values
    are returned as they are."""
    if engine != "auto":
        return engine

    one_at_a_time = max_batch == 1 or not batching
    if ((one_at_a_time or quantize != "none")
            and cached_build(model_path, quantize, cache=cache, build=False)):
        return "litert"
    return "xla"


def serve(model_path, host="127.0.0.1", port=8000, model_name=None, api_key=None, max_batch=16,
          window_s=0.01, max_queue=256, batching=True, timeout_s=60.0,
          max_request_bytes=1 << 20, warm_up=True, max_response_bytes=32 << 20,
          insecure_no_auth=False, engine="xla", quantize="none", tricks=None,
          compile_cache=None):
    """Loads a model (run folder, .keras file, HF folder or preset name) and
    serves it until interrupted; with `warm_up`, compiles what a lone request
    runs before it listens and the wider batch shapes while it serves
    (`BatchEngine.warm_up(background=True)`). Beyond loopback only with `api_key`
    or `insecure_no_auth` (`request_body.check_binding`). `tricks`: the xla engine's decode
    speed tricks (`DecodeTricks`, default this CPU's). `compile_cache`: the folder of XLA's
    compiled programs in use (`xla_cache.use`), whose new entries are recorded after the
    warm-up and when the server stops, so the next start reads them. `engine="litert"` serves
    the model's LiteRT build (`quantize`: its weights; built once and cached,
    `litert_engine.cached_build`) one request at a time (`litert_serving`)."""
    warning = check_binding(host, api_key, insecure_no_auth)
    if engine not in ("auto", "xla", "litert"):
        raise ValueError(f"engine must be auto, xla or litert, got {engine!r}.")
    engine = choose_engine(engine, model_path, quantize, max_batch, batching)
    tokenizer = load_tokenizer_for(model_path)
    name = model_name or os.path.basename(os.path.normpath(model_path)).removesuffix(".keras")
    if engine == "litert":  # no TensorFlow unless the build is made now
        from algpt2_tf.serving.litert_serving import LiteRTEngine  # deferred: imports LiteRT

        build = cached_build(model_path, quantize,
                             log=lambda line: print(line, file=sys.stderr, flush=True))
        engine = LiteRTEngine(build, max_queue=max_queue)
        batching, max_batch = False, 1
        warmed = f"; LiteRT {'float32' if quantize == 'none' else quantize} engine"
        warmed += f", warmed up in {engine.warm_up():.1f} s" if warm_up else ""
    else:
        if quantize != "none":
            raise ValueError("quantize applies to the litert engine; serve a Keras int8 model "
                             "(algpt2 quantize) with the xla engine.")
        from algpt2_tf.causal_lm import ALGPT2LMHeadModel  # deferred: imports TensorFlow, Keras
        from algpt2_tf.serving.batching import BatchEngine  # deferred: imports TensorFlow, Keras

        engine = BatchEngine(load_model(model_path, ALGPT2LMHeadModel), max_batch=max_batch,
                             window_s=window_s, max_queue=max_queue, batching=batching,
                             tricks=tricks)
        record = (lambda: xla_cache.record(compile_cache)) if compile_cache else None
        if warm_up:  # what a lone request runs now, the wider joins while it serves
            seconds = engine.warm_up(background=True, then=record)
            warmed = f"; compiled the batch-1 shapes in {seconds:.1f} s"
            if engine.max_batch > 1:
                warmed += ", the wider joins compiling in the background"
        else:
            warmed = ""
            if record:
                record()
    def close():
        engine.close()
        if compile_cache:
            xla_cache.record(compile_cache)

    run_app(lambda: create_app(engine, tokenizer, name, api_key, max_request_bytes, timeout_s,
                               max_response_bytes), close, host, port,
            f"Serving {name} on http://{host}:{port}/v1 (OpenAI completions API; "
            f"batching {'up to ' + str(max_batch) if batching else 'off'}{warmed})", warning)
