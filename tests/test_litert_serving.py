"""`algpt2 serve --engine litert`: the OpenAI server on the model's LiteRT build gives the XLA
engine's completions (greedy and seeded), streams, reports log-probabilities, and refuses what
it cannot do with a 400 that says so."""

import json
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from conftest import free_port, saved_with_litert_build
from fastapi.testclient import TestClient

from algpt2_tf.generation.sampling import SamplingParams
from algpt2_tf.serving.batching import BatchEngine
from algpt2_tf.serving.litert_serving import LiteRTEngine
from algpt2_tf.serving.openai_api import create_app
from algpt2_tf.tokenizer import GPT2Tokenizer

NAME = "tiny"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny GPT-2-vocabulary model, saved with its LiteRT build, and one app on each engine."""
    folder = tmp_path_factory.mktemp("litert_serving")
    model, cache, build = saved_with_litert_build(folder, "tiny.keras", seed=5)
    litert, xla = LiteRTEngine(build, max_queue=4), BatchEngine(model, max_batch=4)
    apps = {name: TestClient(create_app(engine, GPT2Tokenizer(), NAME))
            for name, engine in (("litert", litert), ("xla", xla))}
    yield folder, cache, litert, apps
    litert.close()
    xla.close()


def complete(app, **body):
    answer = app.post("/v1/completions", json=dict(model=NAME, **body))
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_completions_equal_the_xla_engines(served):
    _, _, _, apps = served
    for body in (dict(prompt="The old house", max_tokens=8, temperature=0),
                 dict(prompt=["It was", "Once"], max_tokens=10, temperature=0.9, top_p=0.95,
                      seed=11, n=2)):
        litert, xla = complete(apps["litert"], **body), complete(apps["xla"], **body)
        assert [c["text"] for c in litert["choices"]] == [c["text"] for c in xla["choices"]]
        assert litert["usage"] == xla["usage"]


def test_streaming_and_logprobs(served):
    _, _, _, apps = served
    body = dict(prompt="She said", max_tokens=6, temperature=0.8, seed=3, logprobs=2)
    whole = complete(apps["litert"], **body)["choices"][0]
    reference = complete(apps["xla"], **body)["choices"][0]
    assert whole["logprobs"]["tokens"] == reference["logprobs"]["tokens"]
    np.testing.assert_allclose(whole["logprobs"]["token_logprobs"],
                               reference["logprobs"]["token_logprobs"], atol=2e-4)
    with apps["litert"].stream("POST", "/v1/completions",
                               json=dict(model=NAME, stream=True, **body)) as answer:
        events = [line for line in answer.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) > 3
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == whole["text"]


def test_what_the_build_cannot_do_is_a_400_that_says_so(served):
    _, _, engine, apps = served
    echo = apps["litert"].post("/v1/completions", json=dict(
        model=NAME, prompt="Hi there", max_tokens=2, logprobs=1, echo=True))
    assert echo.status_code == 400 and "--engine xla" in echo.json()["error"]["message"]
    long = apps["litert"].post("/v1/completions", json=dict(model=NAME, prompt="word " * 70,
                                                             max_tokens=4))
    assert long.status_code == 400
    # The engine still serves after them, and its blocking helper reports the finish reason.
    tokens, reason = engine.generate([464, 3290], 4, SamplingParams(top_k=1))
    assert len(tokens) == 4 and reason == "length"


def test_algpt2_serve_engine_litert_answers_a_client(served, tmp_path):
    """`algpt2 serve --model M --engine litert` (the build cached by the fixture is reused)
    answers as the xla engine does, and never imports TensorFlow or Keras (Python's own
    `-X importtime` list of the server's imports)."""
    from algpt2_tf.cli import main

    folder, cache, _, apps = served
    assert main(["serve", "--model", str(folder / "tiny.keras"), "--quantize", "int8"]) == 2
    port = free_port()
    env = dict(os.environ, ALGPT2_CACHE=cache)
    imports = tmp_path / "imports.txt"
    with open(imports, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "algpt2_tf.cli",
                                 "serve", "--model", str(folder / "tiny.keras"), "--engine",
                                 "litert", "--port", str(port)], env=env,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert "LiteRT float32 engine" in proc.stdout.readline()
        deadline = time.time() + 60
        while True:
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                                    json=dict(model="tiny", prompt="The old house",
                                              max_tokens=8, temperature=0))
                break
            except httpx.ConnectError:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.2)
        assert answer.status_code == 200
        expected = complete(apps["xla"], prompt="The old house", max_tokens=8, temperature=0)
        assert answer.json()["choices"][0]["text"] == expected["choices"][0]["text"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    modules = {line.rsplit("|", 1)[-1].strip() for line in imports.read_text().splitlines()
               if line.startswith("import time:")}
    assert "algpt2_tf.serving.litert_serving" in modules
    assert not {"tensorflow", "keras"} & modules


def test_engine_auto_serves_litert_one_request_at_a_time_when_a_build_is_cached(served,
                                                                                tmp_path):
    from algpt2_tf.serving.openai_api import choose_engine

    folder, cache, _, _ = served
    model = str(folder / "tiny.keras")
    assert choose_engine("auto", model, max_batch=1, cache=cache) == "litert"
    assert choose_engine("auto", model, batching=False, cache=cache) == "litert"
    assert choose_engine("auto", model, max_batch=16, cache=cache) == "xla"  # batches: XLA
    assert choose_engine("auto", model, max_batch=1, cache=str(tmp_path)) == "xla"  # no build
    assert choose_engine("litert", model, max_batch=16, cache=str(tmp_path)) == "litert"
    # An int8 or int4 build outserves XLA's batching too: auto takes it for a batching server.
    from algpt2_tf.export.litert import LiteRTDecoder
    from algpt2_tf.export.litert_engine import cached_build

    build = cached_build(model, "int4", cache=cache, log=lambda *_: None)
    assert choose_engine("auto", model, "int4", max_batch=16, cache=cache) == "litert"
    assert choose_engine("auto", model, "int8", max_batch=16, cache=cache) == "xla"  # not built
    decoder = LiteRTDecoder(build.model_path, str(tmp_path / "weights.cache"))
    assert len(decoder.greedy([3, 1, 4], 5)) == 5
    assert choose_engine("auto", model, max_batch=16, cache=cache) == "xla"  # float32: XLA
