import base64
import concurrent.futures
import json
import os
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import free_port

from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel
from algpt2_tf.cli import main
from algpt2_tf.export import export_model
from algpt2_tf.serving.client import ServingClient, ServingClientError

GEN = {"max_new_tokens": 4, "temperature": 1.0, "top_k": 1, "top_p": 1.0, "seed": 0}


class ServerThread:
    def __init__(self, base_path, name="tiny", **kwargs):
        import uvicorn

        from algpt2_tf.serving.server import ModelManager, create_app

        self.manager = ModelManager(name, base_path, poll_seconds=0.2)
        self.port = free_port()
        app = create_app(self.manager, **kwargs)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.manager.stop()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import keras

    keras.utils.set_random_seed(9)
    root = tmp_path_factory.mktemp("serving")
    model = ALGPT2LMHeadModel(ALGPT2Config(
        max_positions=64, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
        embedding_size=16, initializer_range=0.1))
    model.save(str(root / "m.keras"))
    export_model(str(root / "m.keras"), "savedmodel", str(root / "base"), max_length=48,
                 log=lambda *_: None)
    return root, model


@pytest.fixture(scope="module")
def server(exported):
    root, _ = exported
    base = root / "live"
    shutil.copytree(root / "base", base)
    srv = ServerThread(str(base))
    yield srv
    srv.stop()


def post(url, body, path="/v1/models/tiny:predict", raw=None):
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(url + path, content=content, timeout=60)


def test_status_and_metadata(server):
    for path in ("/v1/models/tiny", "/v1/models/tiny/versions/1"):
        r = httpx.get(server.url + path)
        assert r.status_code == 200
        assert r.json() == {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                                      "status": {"error_code": "OK", "error_message": ""}}]}
    for path in ("/v1/models/tiny/metadata", "/v1/models/tiny/versions/1/metadata"):
        meta = httpx.get(server.url + path).json()
        defs = meta["metadata"]["signature_def"]["signature_def"]
        assert meta["model_spec"] == {"name": "tiny", "signature_name": "", "version": "1"}
        assert set(defs) == {"serving_default", "generate"}
        assert defs["serving_default"]["inputs"]["input_ids"]["dtype"] == "DT_INT32"
        assert defs["generate"]["inputs"]["prompts"]["dtype"] == "DT_STRING"
        assert defs["generate"]["outputs"]["text"]["tensor_shape"]["dim"] == [{"size": "-1", "name": ""}]


def test_logits_row_and_columnar(server, exported):
    _, model = exported
    ids = [[464, 2068, 7586], [1, 2, 3]]
    expected = model({"input_ids": np.array(ids)})["logits"].numpy()
    rows = post(server.url, {"instances": [{"input_ids": r, "attention_mask": [1, 1, 1]} for r in ids]})
    assert rows.status_code == 200
    np.testing.assert_allclose(np.array(rows.json()["predictions"]), expected, atol=1e-4)
    cols = post(server.url, {"signature_name": "serving_default",
                             "inputs": {"input_ids": ids, "attention_mask": [[1, 1, 1]] * 2}})
    np.testing.assert_allclose(np.array(cols.json()["outputs"]), expected, atol=1e-4)


def test_generate_row_columnar_and_b64(server, exported):
    _, model = exported
    expected = model.generate(["Hello world", "Hi"], max_new_tokens=4).text
    cols = post(server.url, {"signature_name": "generate",
                             "inputs": dict(GEN, prompts=["Hello world", "Hi"])})
    assert cols.status_code == 200 and cols.json()["outputs"]["text"] == expected
    rows = post(server.url, {"signature_name": "generate", "instances": [
        dict(GEN, prompts="Hello world"), dict(GEN, prompts={"b64": base64.b64encode(b"Hi").decode()})]})
    assert rows.status_code == 200
    assert [p["text"] for p in rows.json()["predictions"]] == expected
    client = ServingClient(server.url, "tiny")
    assert client.generate(["Hello world"], max_new_tokens=4)["text"] == expected[:1]


@pytest.mark.parametrize("path,body,raw,status,message", [
    ("/v1/models/nope:predict", {"inputs": {}}, None, 404, "Servable not found"),
    ("/v1/models/tiny/versions/7:predict", {"inputs": {}}, None, 404, "Specific(tiny, 7)"),
    ("/v1/models/tiny:predict", {"signature_name": "nope", "inputs": {}}, None, 404, "nope"),
    ("/v1/models/tiny:predict", None, b"{not json", 400, "Malformed JSON"),
    ("/v1/models/tiny:predict", {"inputs": {"input_ids": [["a"]], "attention_mask": [[1]]}}, None, 400, "int32"),
    ("/v1/models/tiny:predict", {"inputs": {"input_ids": [1, 2], "attention_mask": [1, 1]}}, None, 400, "shape"),
    ("/v1/models/tiny:predict", {"inputs": {"input_ids": [[1, 2], [3]], "attention_mask": [[1, 1], [1]]}}, None, 400, "rectangular"),
    ("/v1/models/tiny:predict", {"inputs": {"input_ids": [[1, 2]]}}, None, 400, "Missing input"),
    ("/v1/models/tiny:predict", {"inputs": {"input_ids": [[1]], "attention_mask": [[1]], "x": 1}}, None, 400, "Unknown input"),
    ("/v1/models/tiny:predict", {"instances": [], "inputs": {}}, None, 400, "both"),
    ("/v1/models/tiny:predict", {"signature_name": "generate", "inputs": dict(GEN, prompts=[1])}, None, 400, "string"),
    ("/v1/models/tiny:predict", {"signature_name": "generate", "inputs": dict(GEN, prompts=["x"], max_new_tokens=500)}, None, 400, "max_length"),
    ("/v1/models/tiny:predict", {"inputs": {"input_ids": [[99999999]], "attention_mask": [[1]]}}, None, 400, "vocab_size"),
    ("/v1/models/tiny:predict", {}, None, 400, "Missing 'instances' or 'inputs'"),
    ("/v1/models/tiny/versions/%C2%B2:predict", {"inputs": {}}, None, 404, "Specific(tiny, \u00b2)"),
    ("/v1/models/tiny:predict", None, b'{"signature_name": "generate", "inputs": {"prompts": ["a\\ud800b"], '
     b'"max_new_tokens": 2, "temperature": 1.0, "top_k": 1, "top_p": 1.0, "seed": 0}}', 400, "not valid Unicode"),
    ("/v1/models/tiny:predict", None, b'{"signature_name": "generate", "inputs": {"prompts": ["a"], '
     b'"max_new_tokens": 2, "temperature": NaN, "top_k": 0, "top_p": 1.0, "seed": 0}}', 400, "temperature must be"),
    ("/v1/models/tiny:predict", {"signature_name": "generate", "inputs": dict(GEN, prompts=["x"], temperature=-1.0)}, None, 400, "temperature must be"),
    ("/v1/models/tiny:predict", {"signature_name": "generate", "inputs": dict(GEN, prompts=["x"], top_p=1.5)}, None, 400, "top_p must be"),
    ("/v1/models/tiny:predict", {"signature_name": "generate", "inputs": dict(GEN, prompts=["x"], top_p=0.0)}, None, 400, "top_p must be"),
    ("/v1/models/tiny:predict", {"signature_name": "generate", "inputs": dict(GEN, prompts=["x"], top_k=-1)}, None, 400, "top_k must be"),
    ("/v1/models/tiny:predict", {"signature_name": "generate", "inputs": dict(GEN, prompts=["x"], seed=1e20)}, None, 400, "outside int32's range"),
    ("/v1/models/tiny:predict", {"signature_name": "generate", "inputs": dict(GEN, prompts=["x"], top_k=2 ** 40)}, None, 400, "outside int32's range"),
])
def test_errors(server, path, body, raw, status, message):
    r = post(server.url, body, path=path, raw=raw)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_unknown_model_status_is_404(server):
    assert httpx.get(server.url + "/v1/models/other").status_code == 404
    assert httpx.get(server.url + "/v1/models/tiny/versions/3/metadata").status_code == 404


def test_request_size_limit_and_timeout(exported):
    root, _ = exported
    # The timeout covers the body's arrival too (408, tests/test_hardening.py): long enough for
    # a small body on a loaded machine, far shorter than the first call of the signature that
    # decodes 16 rows for 40 steps.
    small = ServerThread(str(root / "base"), max_request_bytes=600, timeout_seconds=0.25)
    try:
        big = post(small.url, {"inputs": {"input_ids": [[1] * 300], "attention_mask": [[1] * 300]}})
        assert big.status_code == 413 and "limit" in big.json()["error"]
        slow = post(small.url, {"signature_name": "generate",
                                "inputs": dict(GEN, prompts=["x"] * 16, max_new_tokens=40)})
        assert slow.status_code == 504, slow.text
    finally:
        small.stop()


def test_response_limit_is_checked_before_computing(exported):
    """[1, 40] ids ask for 40 x 50,257 logits: about 26 MB of JSON, refused before the
    model runs; the same server answers what fits."""
    root, _ = exported
    small = ServerThread(str(root / "base"), max_response_bytes=10 << 20)
    try:
        big = post(small.url, {"inputs": {"input_ids": [[1] * 40], "attention_mask": [[1] * 40]}})
        assert big.status_code == 413 and "would be about" in big.json()["error"]
        assert "10,485,760" in big.json()["error"]
        ok = post(small.url, {"inputs": {"input_ids": [[1] * 4], "attention_mask": [[1] * 4]}})
        assert ok.status_code == 200 and len(ok.content) < 10 << 20
    finally:
        small.stop()


def test_response_estimate_bounds_the_real_logits_answer(server):
    from algpt2_tf.serving.server import response_bytes_estimate

    import tensorflow as tf

    servable = server.manager.current
    signature = servable.signature(None)
    ids = [[3, 1, 4, 1, 5, 9]]
    r = post(server.url, {"inputs": {"input_ids": ids, "attention_mask": [[1] * 6]}})
    estimate = response_bytes_estimate(signature, {"input_ids": tf.constant(ids),
                                                   "attention_mask": tf.constant(ids)})
    assert len(r.content) <= estimate <= 2 * len(r.content)


def test_api_key_guards_every_path(exported):
    root, _ = exported
    keyed = ServerThread(str(root / "base"), api_key="secret")
    try:
        for path in ("/v1/models/tiny", "/docs", "/openapi.json"):
            assert httpx.get(keyed.url + path).status_code == 401, path
        assert post(keyed.url, {"inputs": {"input_ids": [[1]], "attention_mask": [[1]]}}).status_code == 401
        ok = httpx.get(keyed.url + "/v1/models/tiny", headers={"Authorization": "Bearer secret"})
        assert ok.status_code == 200
    finally:
        keyed.stop()


def test_a_body_that_never_arrives_gets_408(exported):
    import socket

    root, _ = exported
    srv = ServerThread(str(root / "base"), timeout_seconds=0.5)
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.sendall(b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Length: 100\r\n\r\n{\"inputs\":")
            assert b" 408 " in s.recv(200).split(b"\r\n")[0]
    finally:
        srv.stop()


def test_a_timed_out_computation_is_cancelled(exported):
    """Past --timeout the signature's decode loop stops (CancelledError), not just the answer."""
    import tensorflow as tf

    from algpt2_tf.serving.server import _cancellation_manager, run_cancelable

    root, _ = exported
    loaded = tf.saved_model.load(str(root / "base" / "1"))
    signature = loaded.signatures["generate"]
    inputs = {"prompts": tf.constant(["a"] * 64), "max_new_tokens": tf.constant(46),
              "temperature": tf.constant(1.0), "top_k": tf.constant(0),
              "top_p": tf.constant(1.0), "seed": tf.constant(0)}
    run_cancelable(signature, inputs, None)  # traced and warm
    started = time.monotonic()
    run_cancelable(signature, inputs, None)
    full = time.monotonic() - started
    cancel = _cancellation_manager()
    threading.Timer(full / 5, cancel.start_cancel).start()
    started = time.monotonic()
    with pytest.raises(tf.errors.CancelledError):
        run_cancelable(signature, inputs, cancel)
    assert time.monotonic() - started < full


def test_start_up_with_only_an_unloadable_version_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "saved_model.pb").write_bytes(b"not a SavedModel")
    assert main(["serve", "--model-base-path", str(tmp_path), "--model-name", "x"]) == 2
    err = capsys.readouterr().err
    assert "could be loaded: version 1" in err and "Traceback" not in err


def test_new_version_is_picked_up_while_in_flight_requests_finish(exported, tmp_path):
    root, _ = exported
    base = tmp_path / "base"
    shutil.copytree(root / "base", base)
    srv = ServerThread(str(base))
    try:
        results = []

        def busy():
            for _ in range(20):
                r = post(srv.url, {"signature_name": "generate", "inputs": dict(GEN, prompts=["a", "b"])})
                results.append(r.status_code)

        worker = threading.Thread(target=busy)
        worker.start()
        staging = tmp_path / "staging"
        shutil.copytree(base / "1", staging)
        os.replace(staging, base / "2")
        deadline = time.time() + 30
        while httpx.get(srv.url + "/v1/models/tiny").json()["model_version_status"][0]["version"] != "2":
            assert time.time() < deadline
            time.sleep(0.1)
        worker.join()
        assert results and set(results) == {200}
        assert httpx.get(srv.url + "/v1/models/tiny/versions/1").status_code == 404
        assert post(srv.url, {"inputs": {"input_ids": [[1]], "attention_mask": [[1]]}},
                    path="/v1/models/tiny/versions/2:predict").status_code == 200
    finally:
        srv.stop()


@pytest.mark.slow
def test_16_concurrent_clients_get_no_errors(server):
    # (Throughput and latency under load: benchmarks/serve_load.py.)
    def client(i):
        errors = 0
        with httpx.Client(timeout=60) as http:
            for j in range(5):
                a = http.post(server.url + "/v1/models/tiny:predict", json={
                    "inputs": {"input_ids": [[i, j, 7]], "attention_mask": [[1, 1, 1]]}})
                b = http.post(server.url + "/v1/models/tiny:predict", json={
                    "signature_name": "generate", "inputs": dict(GEN, prompts=[f"p{i} {j}"], max_new_tokens=2)})
                errors += (a.status_code != 200) + (b.status_code != 200)
        return errors

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(client, range(16))) == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12)
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={
        "signature_name": st.sampled_from(["serving_default", "generate", "x"]) | json_values,
        "instances": json_values, "inputs": json_values}),
    st.fixed_dictionaries({"signature_name": st.just("generate"), "inputs": st.fixed_dictionaries({
        "prompts": st.lists(st.text(max_size=10), min_size=1, max_size=3) | json_values,
        "max_new_tokens": st.integers(-3, 60) | json_values, "temperature": st.floats(-1, 3) | json_values,
        "top_k": st.integers(-2, 5), "top_p": st.floats(-1, 2), "seed": st.integers(-5, 5)})}),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies)
def test_fuzz_never_5xx(server, body):
    r = post(server.url, body)
    assert r.status_code < 500, (body, r.text)
    assert "error" in r.json() or r.status_code == 200


def test_server_healthy_after_fuzz(server):
    test_fuzz_never_5xx(server)
    assert httpx.get(server.url + "/v1/models/tiny").status_code == 200


def test_client_cli(server, capsys):
    assert main(["client", "--url", server.url, "--model-name", "tiny", "--prompt", "Hello",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("Hello")
    assert main(["client", "--url", server.url, "--model-name", "tiny", "--ids", "1,2,3"]) == 0
    assert json.loads(capsys.readouterr().out)["shape"] == [1, 3, 50257]
    assert main(["client", "--url", server.url, "--model-name", "nope", "--ids", "1"]) == 1
    assert "404" in capsys.readouterr().err
    assert main(["client", "--url", server.url, "--model-name", "tiny", "--ids", "a,b"]) == 2


def test_serve_cli_rejects_a_folder_without_versions(tmp_path, capsys):
    assert main(["serve", "--model-base-path", str(tmp_path), "--model-name", "x"]) == 2
    assert "No SavedModel version" in capsys.readouterr().err


def test_client_docstring_example_against_a_live_server(exported):
    """The `ServingClient` docstring example, run as a doctest against `algpt2 serve`."""
    from test_docstrings import run_examples

    root, _ = exported
    srv = ServerThread(str(root / "base"), name="algpt2")
    try:
        assert run_examples(ServingClient, "ServingClient", {"url": srv.url}) == 2
    finally:
        srv.stop()
