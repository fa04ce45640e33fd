"""The OpenAI-compatible server, driven by the official `openai` client."""

import threading
import time

import httpx
import keras
import numpy as np
import pytest
from conftest import free_port, tiny_config

from algpt2_tf import ALGPT2LMHeadModel
from algpt2_tf.generation.generator import Generator, SamplingParams
from algpt2_tf.serving.batching import BatchEngine
from algpt2_tf.serving.requests import Request
from algpt2_tf.tokenizer import GPT2Tokenizer

openai = pytest.importorskip("openai")

NAME = "books-tiny"
KEY = "test-key"


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(3)
    return ALGPT2LMHeadModel(tiny_config(vocab_size=50257, max_positions=64,
                                         initializer_range=0.2))


@pytest.fixture(scope="module")
def server(model):
    import uvicorn

    from algpt2_tf.serving.openai_api import create_app

    engine = BatchEngine(model, max_batch=8, window_s=0.05, max_queue=8)
    app = create_app(engine, GPT2Tokenizer(), NAME, api_key=KEY, max_request_bytes=4096)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", engine
    uv.should_exit = True
    thread.join()
    engine.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def test_models_and_a_greedy_completion_equal_the_library(client, model):
    assert [m.id for m in client.models.list().data] == [NAME]
    out = client.completions.create(model=NAME, prompt="The old house", max_tokens=8,
                                    temperature=0)
    tokenizer = GPT2Tokenizer()
    ids = tokenizer.encode("The old house")
    expected = Generator(model).generate([ids], 8, SamplingParams(top_k=1), 0,
                                         [tokenizer.eos_id]).new_ids[0]
    expected = [t for t in expected if t != tokenizer.eos_id]
    assert out.choices[0].text == tokenizer.decode(expected)
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == len(expected)
    assert out.choices[0].finish_reason in ("length", "stop")


def test_streaming_gives_the_same_text_token_by_token(client):
    kwargs = dict(model=NAME, prompt=["It was", "Once"], max_tokens=10, temperature=0.9,
                  top_p=0.95, seed=11, n=2)
    whole = client.completions.create(**kwargs)
    pieces, finished = {}, {}
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            **kwargs))
    for chunk in chunks:
        for c in chunk.choices:
            pieces.setdefault(c.index, []).append(c.text)
            if c.finish_reason:
                finished[c.index] = c.finish_reason
    assert sorted(pieces) == [0, 1, 2, 3]
    for c in whole.choices:
        assert "".join(pieces[c.index]) == c.text
        assert finished[c.index] == c.finish_reason
    assert max(len(p) for p in pieces.values()) > 3  # it streamed, not one lump
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_seeds_reproduce_and_choices_differ(client):
    kwargs = dict(model=NAME, prompt="She said", max_tokens=12, temperature=1.0, seed=5, n=2)
    a, b = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text  # seeds 5 and 6
    wide = client.completions.create(**dict(kwargs, seed=5 + 2 ** 31))  # any integer: mod 2**31
    assert [c.text for c in wide.choices] == [c.text for c in a.choices]


def test_stop_sequences_and_echo(client):
    base = client.completions.create(model=NAME, prompt="A", max_tokens=16, temperature=0)
    text = base.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop
    cut = client.completions.create(model=NAME, prompt="A", max_tokens=16, temperature=0,
                                    stop=[stop], echo=True)
    assert cut.choices[0].text == "A" + text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="A", max_tokens=16, temperature=0, stop=stop, stream=True))
    assert streamed == text[:text.find(stop)]


def full_logprobs(model, ids):
    """log-softmax of the model's logits over `ids` (a full recompute, no cache)."""
    logits = model(np.array([ids]))["logits"].numpy()[0].astype("float64")
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def test_logprobs_equal_a_full_recompute(client, model):
    tokenizer = GPT2Tokenizer()
    prompt = "The old house"
    kwargs = dict(model=NAME, prompt=prompt, max_tokens=10, temperature=0.9, seed=4, logprobs=3,
                  echo=True)
    out = client.completions.create(**kwargs).choices[0]
    ids = tokenizer.encode(prompt)
    engine = BatchEngine(model)
    new, _ = engine.generate(ids, 10, SamplingParams(0.9, 0, 1.0), seed=4)
    engine.close()
    new = [t for t in new if t != tokenizer.eos_id]
    everything = ids + new
    expected = full_logprobs(model, everything)
    lp = out.logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in everything]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(everything)):
        row = expected[i - 1]
        np.testing.assert_allclose(lp.token_logprobs[i], row[everything[i]], atol=2e-4)
        best = np.sort(row)[::-1][:3]
        alternatives = lp.top_logprobs[i]
        assert 3 <= len(alternatives) <= 4  # the three likeliest, and the chosen token
        assert lp.tokens[i] in alternatives
        np.testing.assert_allclose(sorted(alternatives.values(), reverse=True)[:3], best,
                                   atol=2e-4)
    assert lp.text_offset[:len(ids)] == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[len(ids)] == len(prompt)
    # Streamed, the chunks carry the same entries, each with the text it starts in.
    streamed = list(client.completions.create(stream=True, **kwargs))
    tokens = [t for c in streamed for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    values = [v for c in streamed for ch in c.choices if ch.logprobs
              for v in ch.logprobs.token_logprobs]
    assert tokens == lp.tokens and values == lp.token_logprobs
    # Without echo, greedy: every chosen token is its step's likeliest.
    greedy = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0,
                                       logprobs=0).choices[0].logprobs
    assert all(list(top) == [token] for top, token in zip(greedy.top_logprobs, greedy.tokens))
    assert greedy.text_offset[0] == 0


def test_batched_requests_get_the_tokens_they_get_alone(model):
    engine = BatchEngine(model, max_batch=8, window_s=0.5)
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [1, 2], [40, 41]]
    settings = [SamplingParams(1.0, 0, 0.9), SamplingParams(0.7, 20, 1.0, 1.2),
                SamplingParams(top_k=1), SamplingParams(1.5), SamplingParams(1.0, 0, 0.5)]
    lengths = [12, 5, 9, 12, 7]
    alone = [engine.generate(p, n, s, seed=i + 1)
             for i, (p, n, s) in enumerate(zip(prompts, lengths, settings))]
    together = [([], threading.Event(), {}) for _ in prompts]
    before = engine.batches_run
    for i, (tokens, done, end) in enumerate(together):  # all queued within the window
        engine.submit(Request(prompts[i], lengths[i], settings[i], i + 1, (), tokens.append,
                              lambda reason, error, done=done, end=end: (
                                  end.update(reason=reason), done.set())))
    for _, done, _ in together:
        done.wait()
    engine.close()
    together = [(tokens, end["reason"]) for tokens, _, end in together]
    assert together == alone
    assert engine.batches_run - before == 1  # they did share one batch
    assert [len(tokens) for tokens, _ in alone] == lengths


def late_requests_and_alone(engine, late):
    """Runs `late` (prompt, max_new_tokens, params, seed) requests, all submitted at once when
    a first request ([5, 6, 7], 30 tokens) has made 5 tokens; returns `(tokens, reason)` of
    each (the first's first) and what each gets when run alone."""
    alone = [engine.generate(p, n, params, seed) for p, n, params, seed in late]
    first_alone = engine.generate([5, 6, 7], 30, SamplingParams(1.0), 1)
    results = [([], threading.Event(), {}) for _ in range(len(late) + 1)]

    def request(i, prompt, n, params, seed, on_token=None):
        tokens, done, end = results[i]
        return Request(prompt, n, params, seed, (), on_token or tokens.append,
                       lambda reason, error: (end.update(reason=reason), done.set()))

    def first_token(token):  # the first request's 5th token brings the others
        results[0][0].append(token)
        if len(results[0][0]) == 5:
            for i, args in enumerate(late):
                engine.submit(request(i + 1, *args))

    engine.submit(request(0, [5, 6, 7], 30, SamplingParams(1.0), 1, first_token))
    for _, done, _ in results:
        done.wait()
    engine.close()
    return [(tokens, end["reason"]) for tokens, _, end in results], [first_alone] + alone


def test_requests_join_a_running_batch_and_get_the_tokens_they_get_alone(model):
    engine = BatchEngine(model, max_batch=4, window_s=0.0)
    got, alone = late_requests_and_alone(engine, [
        ([9, 10, 11], 12, SamplingParams(1.0, 0, 0.9), 4),
        ([1] * 20, 6, SamplingParams(top_k=1), 0),  # 32 slots padded: joins once slot >= 32
        ([40, 41], 9, SamplingParams(0.8, 10, 1.0, 1.3), 7)])
    assert got == alone
    assert engine.joined == 3 and engine.batches_run == 3 + 2  # one batch for all four


def test_requests_waiting_together_join_in_one_call(model):
    """Three requests queued during a call join at the next one in a single prefill of four
    rows (the fourth repeats the first joiner), and each gets the tokens it gets alone."""
    engine = BatchEngine(model, max_batch=8, window_s=0.0)
    # The random-weight logits are nearly flat (std 0.36 over 50,257 tokens): at temperature 1
    # a top-p draw over ~41,000 tokens moves to a neighbour on a last-bit difference, and the
    # joined prefill (4 rows padded to 16) and the lone one (1 row) round differently on some
    # CPUs (Intel Xeon family 6 model 207: token 28152 against 28153). At 0.05, top-p keeps a
    # few tokens, so the row, seed and positions of the join decide each one.
    got, alone = late_requests_and_alone(engine, [
        ([9, 10, 11], 12, SamplingParams(0.05, 0, 0.9), 4),
        ([40, 41], 9, SamplingParams(0.8, 10, 1.0, 1.3), 7),
        ([7] * 14, 6, SamplingParams(top_k=1), 0)])
    assert got == alone
    assert engine.joined == 3
    # Every batch starts by a 1-row join (one request each); the late three joined in 4 rows.
    assert {key[1:] for key in engine._functions if key[0] == "join"} == {(64, 16, 1),
                                                                          (64, 16, 4)}


def test_requests_that_do_not_fit_one_cache_together_run_in_turn(model):
    """A long prompt and a long generation queued together do not share a batch (50 + 40 slots
    > the model's 64 positions): each runs in its own and gets its alone tokens, where a
    shared batch had failed both."""
    engine = BatchEngine(model, max_batch=4, window_s=0.5)
    asks = [(list(range(1, 51)), 4, SamplingParams(top_k=1), 0),
            ([5, 6, 7], 40, SamplingParams(1.0), 3)]
    alone = [engine.generate(p, n, params, seed) for p, n, params, seed in asks]
    results = [([], threading.Event(), {}) for _ in asks]
    before = engine.batches_run
    for (prompt, n, params, seed), (tokens, done, end) in zip(asks, results):
        engine.submit(Request(prompt, n, params, seed, (), tokens.append,
                              lambda reason, error, done=done, end=end: (
                                  end.update(reason=reason, error=error), done.set())))
    for _, done, _ in results:
        assert done.wait(60)
    engine.close()
    assert [(tokens, end["reason"]) for tokens, _, end in results] == alone
    assert engine.batches_run - before == 2


def test_a_client_leaving_mid_stream_frees_its_row(server):
    url, engine = server
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": NAME, "prompt": "Far away", "max_tokens": 60, "stream": True, "seed": 1}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        # Closed after the first chunk: the engine stops the row well before 60 tokens.
        deadline = time.time() + 30
        while engine.active and time.time() < deadline:
            time.sleep(0.05)
        assert engine.active == 0


def test_errors_have_openais_shape_and_status(server, client):
    url, engine = server
    cases = [
        (dict(model="gpt-4", prompt="x"), openai.NotFoundError, "model_not_found"),
        (dict(model=NAME, prompt="x", temperature=3), openai.BadRequestError, None),
        (dict(model=NAME, prompt="x", max_tokens=100), openai.BadRequestError,
         "context_length_exceeded"),
        (dict(model=NAME, prompt="x", logprobs=6), openai.BadRequestError, None),
        (dict(model=NAME, prompt=[[50257]]), openai.BadRequestError, None),
    ]
    for kwargs, error, code in cases:
        with pytest.raises(error) as info:
            client.completions.create(**kwargs)
        assert info.value.body["message"] and info.value.body["type"]
        if code:
            assert info.value.code == code
    with pytest.raises(openai.BadRequestError, match="base language model"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    big = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": NAME, "prompt": "x" * 5000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"


def test_a_full_queue_answers_429(model):
    from algpt2_tf.serving.requests import QueueFull

    engine = BatchEngine(model, max_batch=1, window_s=0.0, max_queue=2)
    started, release = threading.Event(), threading.Event()

    def block(token):
        started.set()
        release.wait()

    def noop(*_):
        pass

    with pytest.raises(ValueError, match="32 bits"):  # refused alone, not failing a batch
        engine.submit(Request([5], 3, SamplingParams(top_k=1), 2 ** 40, (), noop, noop))
    engine.submit(Request([5], 3, SamplingParams(top_k=1), 0, (), block, noop))
    started.wait()  # the worker is busy with the first; two more fill the queue
    ends = [threading.Event() for _ in range(2)]
    for end in ends:
        engine.submit(Request([5], 3, SamplingParams(top_k=1), 0, (), noop,
                              lambda reason, error, end=end: end.set()))
    with pytest.raises(QueueFull, match="limit is 2"):
        engine.submit(Request([5], 3, SamplingParams(top_k=1), 0, (), noop, noop))
    release.set()
    for end in ends:  # the queued two run once the first is done
        assert end.wait(60)
    engine.close()
    assert engine.batches_run == 3


def test_the_server_answers_429_when_the_queue_is_full(model):
    from fastapi.testclient import TestClient

    from algpt2_tf.serving.requests import QueueFull
    from algpt2_tf.serving.openai_api import create_app

    engine = BatchEngine(model, max_queue=4)

    def full(request):
        raise QueueFull("The queue is full (its limit is 4); retry later.")

    engine.submit = full  # as if four requests were waiting
    http = TestClient(create_app(engine, GPT2Tokenizer(), NAME))
    answer = http.post("/v1/completions", json={"model": NAME, "prompt": "x"})
    # A request that could never fit the queue is a 400 that says why, not "retry later".
    never = http.post("/v1/completions", json={"model": NAME, "prompt": "x", "n": 5})
    engine.close()
    assert answer.status_code == 429
    assert answer.json()["error"]["code"] == "queue_full"
    assert never.status_code == 400 and "could never run" in never.json()["error"]["message"]


def test_algpt2_serve_model_starts_the_api(tmp_path, model):
    """`algpt2 serve --model M`: the command line's server answers the client."""
    import os
    import subprocess

    from algpt2_tf.cli import main

    assert main(["serve"]) == 2  # neither --model nor --model-base-path
    assert main(["serve", "--model", "x", "--model-base-path", "y"]) == 2
    model.save(str(tmp_path / "books.keras"))
    port = free_port()
    env = dict(os.environ, ALGPT2_API_KEY=KEY)
    proc = subprocess.Popen(["algpt2", "serve", "--model", str(tmp_path / "books.keras"),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert "Serving books on" in proc.stdout.readline()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY,
                               max_retries=0)
        deadline = time.time() + 60
        while True:
            try:
                assert [m.id for m in client.models.list().data] == ["books"]
                break
            except openai.APIConnectionError:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.2)
        out = client.completions.create(model="books", prompt="Hello", max_tokens=3,
                                        temperature=0)
        assert out.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_warm_up_compiles_what_a_batch_with_a_join_runs(model):
    """After `warm_up`, a batch that a request joins builds no new compiled function."""
    engine = BatchEngine(model, max_batch=4, window_s=0.0)
    assert engine.warm_up() > 0
    compiled = set(engine._functions)
    assert {key[0] for key in compiled} == {"steps", "join", "shift"}
    done = [threading.Event() for _ in range(2)]
    first_tokens = []

    def first_token(token):  # the first request's 2nd token brings the second
        first_tokens.append(token)
        if len(first_tokens) == 2:
            engine.submit(Request([9, 10, 11], 4, SamplingParams(1.0), 2, (), lambda t: None,
                                  lambda reason, error: done[1].set()))

    engine.submit(Request([5, 6, 7], 12, SamplingParams(1.0), 1, (), first_token,
                          lambda reason, error: done[0].set()))
    for event in done:
        assert event.wait(60)
    engine.close()
    assert engine.joined == 1 and set(engine._functions) == compiled


def test_background_warm_up_serves_at_once_and_compiles_the_rest(model):
    """`warm_up(background=True)` returns once a lone request's functions are compiled; the
    wider joins compile while a request is served (its tokens equal the foreground engine's),
    `then` runs after them, and at the end the functions of a full warm-up exist: the joins of
    every width of `join_widths(4)`, the steps and the shift (listed here, where a second
    engine's full warm-up cost this test 5 more compiles)."""
    plain = BatchEngine(model, max_batch=4, window_s=0.0)  # compiles what the request runs
    expected = plain.generate([5, 6, 7], 6, SamplingParams(1.0), 3)
    plain.close()
    full = {("join", 64, 16, 1), ("join", 64, 16, 2), ("join", 64, 16, 4), ("steps", 64, False),
            ("shift", 64)}
    engine = BatchEngine(model, max_batch=4, window_s=0.0)
    after = []
    engine.warm_up(background=True, then=lambda: after.append(set(engine._functions)))
    assert ("join", 64, 16, 1) in engine._functions and ("steps", 64, False) in engine._functions
    assert engine.generate([5, 6, 7], 6, SamplingParams(1.0), 3) == expected
    assert engine.warmed.wait(120)
    engine.close()
    assert after == [full] and set(engine._functions) == full


def test_a_batch_compacts_its_cache_so_a_late_request_joins(model):
    """A request whose tokens would not fit after the current slot joins once the batch
    drops the slots its running rows no longer use, and gets the tokens it gets alone."""
    engine = BatchEngine(model, max_batch=4, window_s=0.0)  # the model has 64 positions
    late = [([9, 10, 11], 40, SamplingParams(1.0, 0, 0.9), 4),  # joins at slot 20
            ([40, 41], 40, SamplingParams(0.8, 10, 1.0, 1.3), 7)]  # arrives at slot 36
    alone = [engine.generate(p, n, params, seed) for p, n, params, seed in late]
    first_alone = engine.generate([5, 6, 7], 20, SamplingParams(1.0), 1)
    results = [([], threading.Event(), {}) for _ in range(3)]

    def request(i, prompt, n, params, seed, on_token=None, on_done=None):
        tokens, done, end = results[i]

        def finished(reason, error):
            end.update(reason=reason)
            if on_done:
                on_done()
            done.set()

        return Request(prompt, n, params, seed, (), on_token or tokens.append, finished)

    def first_token(token):  # the first request's 4th token (slot 20) brings the second
        results[0][0].append(token)
        if len(results[0][0]) == 4:
            engine.submit(request(1, *late[0]))

    # The third comes when the first ends at slot 36: 36 + 40 > 64 slots, but the second
    # row starts at slot 17, so dropping 17 slots lets it in at slot 19.
    engine.submit(request(0, [5, 6, 7], 20, SamplingParams(1.0), 1, first_token,
                          lambda: engine.submit(request(2, *late[1]))))
    for _, done, _ in results:
        assert done.wait(60)
    engine.close()
    got = [(tokens, end["reason"]) for tokens, _, end in results]
    assert got == [first_alone] + alone
    assert engine.joined == 2 and engine.batches_run == len(late) + 2  # one batch for all three


def test_joins_shifts_and_steps_compile_once_for_every_slot(model):
    """The slot a row joins at, the slots a shift drops and the slot the steps start at are
    run-time values: the compiled program is the same for any of them (a shape that
    depended on one made XLA compile each join anew, 2 s a time, inside served batches)."""
    engine = BatchEngine(model, max_batch=2, window_s=0.0)
    ids, mask = np.zeros((2, 16), np.int32), np.ones((2, 16), np.int32)
    state = engine._function("join", 64, 16, 2)(engine._empty_state(64), np.int32([0, 1]), ids,
                                                 mask, np.int32(16))
    params = (np.ones(2, np.float32), np.zeros(2, np.int32), np.ones(2, np.float32),
              np.ones(2, np.float32), np.zeros(2, np.int32))
    calls = {"join": (engine._function("join", 64, 16, 2),
                      lambda v: (state, np.int32([1, 0]), ids, mask, np.int32(v))),
             "shift": (engine._function("shift", 64), lambda v: (state, np.int32(v - 16))),
             "steps": (engine._function("steps", 64, False),
                       lambda v: (np.int32(4), np.int32(v), np.zeros(2, np.int32), params,
                                  state))}
    for name, (function, args) in calls.items():
        programs = {function.experimental_get_compiler_ir(*args(v))(stage="hlo")
                    for v in (20, 36)}
        assert len(programs) == 1, name
    engine.close()
