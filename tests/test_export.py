import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema

from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel
from algpt2_tf.cli import main
from algpt2_tf.export import PROBE_TEXT, export_model, probe_batch, tflite_greedy
from algpt2_tf.export.int4 import _builtin
from algpt2_tf.export.steps import InterpreterSteps, cache_names
from algpt2_tf.tokenizer import GPT2Tokenizer


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A model with every option of the architecture (factorized embedding, two blocks in
    cycle order, per-layer norms, rank-2 deltas, an SOP head), every weight random (the
    zero-initialised deltas too, so an export that dropped them would fail), saved: every
    export test of this file runs on it (the plain shared model's exports are tested by
    the LiteRT engine's and the quantization tests)."""
    import keras
    from conftest import randomize_weights

    keras.utils.set_random_seed(5)
    config = ALGPT2Config(max_positions=96, hidden_size=32, num_layers=4, num_heads=2,
                          intermediate_size=64, embedding_size=16, num_layer_groups=2,
                          group_order="cycle", per_layer_norms=True, lora_rank=2,
                          sop_head=True)
    model = randomize_weights(ALGPT2LMHeadModel(config), np.random.default_rng(5), scale=0.1)
    path = str(tmp_path_factory.mktemp("model") / "m.keras")
    model.save(path)
    return path


@pytest.fixture(scope="module")
def keras_model(model_path):
    from algpt2_tf.causal_lm import ALGPT2LMHeadModel
    from algpt2_tf.saving import load_model
    return load_model(model_path, ALGPT2LMHeadModel)


@pytest.fixture(scope="module")
def tflite_report(tmp_path_factory, model_path):
    """The float32 TFLite export of `model_path` (cache length 32), made once for the file."""
    return export_model(model_path, "tflite", str(tmp_path_factory.mktemp("lite")), max_length=32,
                        log=lambda *_: None)


def run_python(code):
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_keras_export_loads_in_a_fresh_process(tmp_path, model_path, keras_model):
    report = export_model(model_path, "keras", str(tmp_path / "m"), log=lambda *_: None)
    assert report.path == str(tmp_path / "m" / "1" / "model.keras")
    ids, mask = probe_batch(GPT2Tokenizer())
    got = run_python(f"""
import json, keras, numpy as np
from algpt2_tf import ALGPT2LMHeadModel  # registers the model with Keras
m = keras.models.load_model({report.path!r})
out = m({{"input_ids": np.array({ids.tolist()}), "attention_mask": np.array({mask.tolist()})}})
print(json.dumps(out["logits"].numpy().tolist()))
""")
    expected = keras_model({"input_ids": ids, "attention_mask": mask})["logits"].numpy()
    np.testing.assert_allclose(np.array(got), expected, atol=1e-5)


def test_savedmodel_serves_logits_and_text_without_algpt2(tmp_path, model_path, keras_model):
    out = tmp_path / "served"
    report = export_model(model_path, "savedmodel", str(out), max_length=64, log=lambda *_: None)
    assert report.path == str(out / "1") and os.path.exists(out / "1" / "saved_model.pb")
    ids, mask = probe_batch(GPT2Tokenizer())
    prompts = PROBE_TEXT + ["", "Ünïcödé 😀 text"]
    got = run_python(f"""
import json, sys
import tensorflow as tf, tensorflow_text
from tensorflow.python.tools import saved_model_utils  # what `saved_model_cli show` reads
sm = tf.saved_model.load({str(out / "1")!r})
logits = sm.signatures["serving_default"](input_ids=tf.constant({ids.tolist()}, tf.int32),
                                          attention_mask=tf.constant({mask.tolist()}, tf.int32))
gen = sm.signatures["generate"](prompts=tf.constant({prompts!r}), max_new_tokens=tf.constant(20),
                                temperature=tf.constant(1.0), top_k=tf.constant(1),
                                top_p=tf.constant(1.0), seed=tf.constant(0))
sampled = [sm.signatures["generate"](prompts=tf.constant(["Once"]), max_new_tokens=tf.constant(10),
                                     temperature=tf.constant(1.0), top_k=tf.constant(0),
                                     top_p=tf.constant(0.9), seed=tf.constant(s))["text"].numpy()[0].decode("utf-8", "replace")
           for s in (1, 1, 2)]
print(json.dumps({{"algpt2_imported": any(m.startswith("algpt2_tf") for m in sys.modules),
                   "logits": logits["logits"].numpy().tolist(),
                   "text": [t.decode("utf-8", "replace") for t in gen["text"].numpy()],
                   "ids": gen["token_ids"].numpy().tolist(), "sampled": sampled,
                   "signature_defs": sorted(saved_model_utils.get_meta_graph_def(
                       {str(out / "1")!r}, "serve").signature_def)}}))
""")
    assert not got["algpt2_imported"]
    expected = keras_model({"input_ids": ids, "attention_mask": mask})["logits"].numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(np.array(got["logits"])[real], expected[real], atol=1e-4)
    greedy = keras_model.generate(prompts, max_new_tokens=20, sampler="greedy")
    assert got["text"] == greedy.text
    for row, ids_row in zip(got["ids"], greedy.ids):
        assert [t for t in row if t != -1] == ids_row
    assert got["sampled"][0] == got["sampled"][1] and got["sampled"][0].startswith("Once")
    # The MetaGraph that `saved_model_cli show --all` lists (one TensorFlow start-up less).
    assert {"serving_default", "generate"} <= set(got["signature_defs"])


def test_tflite_float32_matches_keras_and_decodes_identically(tflite_report, keras_model):
    from ai_edge_litert.interpreter import Interpreter

    report = tflite_report
    interpreter = Interpreter(model_path=report.path)
    # One cache length at 32 slots (moves between lengths: the batch test below).
    assert set(interpreter.get_signature_list()) == {"logits", "prefill_32", "decode_32"}
    prompt = GPT2Tokenizer().encode("In the beginning")
    ids = np.array([prompt], np.int32)
    lite = interpreter.get_signature_runner("logits")(input_ids=ids, attention_mask=np.ones_like(ids))
    np.testing.assert_allclose(lite["logits"], keras_model(ids)["logits"].numpy(), atol=1e-4)
    expected = keras_model.generate([prompt], max_new_tokens=24, stop_ids=[]).new_ids[0]
    assert tflite_greedy(interpreter, prompt, 24) == expected
    # Prefill again into the used cache: the prompt's slots are rewritten, the stale ones masked.
    steps = InterpreterSteps(interpreter)
    assert steps.greedy(prompt[1:], 28) and steps.greedy(prompt, 24) == expected
    assert report.greedy_agreement == 1.0 and report.max_abs_diff < 1e-4
    # The cache is the decode steps' input, not state stored in the file; they return the
    # new token's keys and values for the runtime to write.
    decode = interpreter.get_signature_runner("decode_32")
    assert {n for n in decode.get_input_details()
            if n.startswith(("keys_", "values_"))} == set(cache_names(keras_model.config.num_layers))
    assert set(decode.get_output_details()) == {"logits", "new_keys_values"}
    with open(report.path, "rb") as f:
        flatbuffer = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(f.read(), 0))
    assert not [b for b in flatbuffer.buffers
                if b.data is not None and len(b.data) >= 1024 and not np.any(b.data)]
    # The decode step slices no float tensor: a STRIDED_SLICE of the logits ran in TFLite's
    # reference kernel, outside XNNPACK (see `tflite.TFLiteModule._run`).
    graph = next(g for g in flatbuffer.subgraphs if g.name == b"decode_32")
    sliced = [graph.tensors[op.inputs[0]].type for op in graph.operators
              if _builtin(flatbuffer.operatorCodes[op.opcodeIndex])
              == schema.BuiltinOperator.STRIDED_SLICE]
    assert schema.TensorType.FLOAT32 not in sliced


def test_litert_compiled_model_with_weight_cache_decodes_identically(tmp_path, tflite_report,
                                                                     keras_model):
    from algpt2_tf.export.litert import LiteRTDecoder

    report = tflite_report
    cache = str(tmp_path / "xnnpack" / "weights.cache")
    prompt = GPT2Tokenizer().encode("In the beginning")
    expected = keras_model.generate([prompt], max_new_tokens=24, stop_ids=[]).new_ids[0]
    decoder = LiteRTDecoder(report.path, weight_cache_path=cache)
    assert decoder.greedy(prompt, 24) == expected
    assert os.path.getsize(cache) > 0
    # The caches were written through views of the buffers the steps read: they hold what
    # the classic Interpreter's caches (NumPy arrays copied in at each step) hold.
    from ai_edge_litert.interpreter import Interpreter

    steps = InterpreterSteps(Interpreter(model_path=report.path))
    steps.greedy(prompt, 24)
    for name, array in steps.caches[32].items():
        buffer = decoder._cache_buffers[32, name]
        np.testing.assert_allclose(buffer.read(array.size, np.float32).reshape(array.shape),
                                   array, atol=1e-5)
    assert np.abs(array).max() > 0
    # A second decoder reuses the packed weights from the file.
    assert LiteRTDecoder(report.path, weight_cache_path=cache).greedy(prompt, 24) == expected


def test_tflite_without_sharing_decodes_a_batch(tmp_path):
    """GPT-2-shaped (a block per layer), 3 rows: the same signatures, the same outputs; rows
    of different lengths (left-padded in one prefill) continue as the Keras model does."""
    from ai_edge_litert.interpreter import Interpreter
    from conftest import gpt2_tiny_config

    from algpt2_tf.export.litert import LiteRTDecoder
    from algpt2_tf.export.tflite import convert

    model = ALGPT2LMHeadModel(gpt2_tiny_config(max_positions=64))
    path = tmp_path / "model.tflite"
    path.write_bytes(convert(model, 40, batch=3))  # caches of 32 and 40 slots
    interpreter = Interpreter(model_path=str(path))
    ids = np.array([[3, 1, 4, 1, 5]] * 3, np.int32)
    lite = interpreter.get_signature_runner("logits")(input_ids=ids, attention_mask=np.ones_like(ids))
    np.testing.assert_allclose(lite["logits"], model(ids)["logits"].numpy(), atol=1e-4)
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3]]
    # 30 tokens after the longest prompt's 5: the caches move from 32 slots to 40 on the way.
    expected = [model.generate([p], max_new_tokens=30, stop_ids=[]).new_ids[0] for p in prompts]
    assert InterpreterSteps(interpreter).greedy_rows(prompts, 30) == expected
    decoder = LiteRTDecoder(str(path), weight_cache_path=str(tmp_path / "weights.cache"))
    # Prepared at load: every length's caches and decode buffers, before any request.
    assert set(decoder.caches) == {32, 40}
    assert set(decoder._decode_buffers) == {"decode_32", "decode_40"}
    assert decoder.greedy_rows(prompts, 30) == expected
    assert decoder.length == 40
    lazy = LiteRTDecoder(str(path), weight_cache_path=str(tmp_path / "weights.cache"),
                         prepare=False)
    assert not lazy.caches and not lazy._decode_buffers
    assert lazy.greedy_rows(prompts, 30) == expected
    assert decoder.greedy_rows(prompts[1:], 30) == expected[1:]  # fewer rows than the build's
    with pytest.raises(ValueError, match="exceed the build's cache of 40"):
        decoder.greedy_rows(prompts, 40)
    with pytest.raises(ValueError, match="1 to 3 rows"):
        decoder.prefill_rows(prompts * 2)


@pytest.mark.parametrize("quantize", ["fp16", "int8"])  # int4: the LiteRT serving test's build
def test_tflite_quantized(tmp_path, model_path, tflite_report, keras_model, quantize):
    base = tflite_report
    report = export_model(model_path, "tflite", str(tmp_path / quantize), quantize=quantize,
                          max_length=32, log=lambda *_: None)
    assert report.size_bytes < 0.7 * base.size_bytes
    # The reported agreement is the share of greedy tokens equal to the Keras model's.
    from ai_edge_litert.interpreter import Interpreter

    prompt = GPT2Tokenizer().encode(PROBE_TEXT[0])
    steps = len(tflite_greedy(Interpreter(model_path=base.path), prompt, 32 - len(prompt)))
    lite = tflite_greedy(Interpreter(model_path=report.path), prompt, steps)
    keras_tokens = keras_model.generate([prompt], max_new_tokens=steps, stop_ids=[]).new_ids[0]
    assert report.greedy_agreement == np.mean(np.equal(lite, keras_tokens))
    assert report.max_abs_diff < 1.0


@pytest.mark.parametrize("block_size", [None, 32])
def test_int4_rewrites_each_shared_weight_once_and_stays_close_to_float(tflite_report, block_size):
    """`int4.quantize_weights`: every matrix product's weight becomes INT4 (the values
    `quantize_rows` gives, packed two a byte), every embedding table INT8 with a DEQUANTIZE
    after its GATHER, one quantized buffer per float buffer (the shared block stays shared
    across layers and signatures), and the logits follow the float model's."""
    from ai_edge_litert.interpreter import Interpreter
    from tensorflow.lite.tools import flatbuffer_utils

    from algpt2_tf.export.int4 import pack_int4, quantize_rows, quantize_weights

    source = open(tflite_report.path, "rb").read()
    float_model = flatbuffer_utils.read_model_from_bytearray(bytearray(source))
    packed = quantize_weights(source, block_size)
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(packed))
    ops = schema.BuiltinOperator
    seen = {ops.FULLY_CONNECTED: set(), ops.GATHER: set()}
    blocks_seen = set()
    float_weights = set()
    for graph, float_graph in zip(model.subgraphs, float_model.subgraphs):
        for op, float_op in zip([op for op in graph.operators
                                 if model.operatorCodes[op.opcodeIndex].builtinCode
                                 != ops.DEQUANTIZE], float_graph.operators):
            code = model.operatorCodes[op.opcodeIndex].builtinCode
            if code not in seen:
                continue
            at = 1 if code == ops.FULLY_CONNECTED else 0
            tensor, float_tensor = graph.tensors[op.inputs[at]], float_graph.tensors[
                float_op.inputs[at]]
            if float_model.buffers[float_tensor.buffer].data is None:
                continue  # not a constant (an attention product's operand)
            assert tensor.type == (schema.TensorType.INT4 if code == ops.FULLY_CONNECTED
                                   else schema.TensorType.INT8)
            seen[code].add(tensor.buffer)
            float_weights.add((float_tensor.buffer, code))
            if code == ops.FULLY_CONNECTED:
                weights = np.frombuffer(bytes(float_model.buffers[float_tensor.buffer].data),
                                        np.float32).reshape(float_tensor.shape)
                block = block_size if weights.shape[1] % (block_size or 1) == 0 else None
                values, scales = quantize_rows(weights, 4, block)
                assert bytes(model.buffers[tensor.buffer].data) == bytes(pack_int4(values))
                details = tensor.quantization.details
                if block:  # float16 scales, one per block of a row, in a tensor of the graph
                    table = graph.tensors[details.blockSize and details.scales]
                    assert details.blockSize == block and table.type == schema.TensorType.FLOAT16
                    stored = np.frombuffer(bytes(model.buffers[table.buffer].data), np.float16)
                    np.testing.assert_array_equal(stored.reshape(table.shape), scales)
                    blocks_seen.add(block)
                else:
                    np.testing.assert_allclose(tensor.quantization.scale, scales)
            else:  # the gathered rows are dequantized before use
                consumer = [o for o in graph.operators if op.outputs[0] in o.inputs]
                assert [model.operatorCodes[o.opcodeIndex].builtinCode
                        for o in consumer] == [ops.DEQUANTIZE]
    assert len(seen[ops.FULLY_CONNECTED]) + len(seen[ops.GATHER]) == len(float_weights)
    assert len(model.subgraphs) > 1 and seen[ops.FULLY_CONNECTED] and seen[ops.GATHER]
    assert blocks_seen == ({block_size} if block_size else set())
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_weights(source, 48)
    weight_bytes = [sum(len(b.data) for b in m.buffers if b.data is not None)
                    for m in (float_model, model)]
    assert weight_bytes[1] < 0.4 * weight_bytes[0]  # the tied table: int8 + int4 of float32
    ids = np.array([[3, 1, 4, 1, 5]], np.int32)
    logits = [Interpreter(model_content=content).get_signature_runner("logits")(
        input_ids=ids, attention_mask=np.ones_like(ids))["logits"] for content in (source, packed)]
    # Random weights and rows of 16 to 64 values: a coarse case, still the same logits' shape.
    assert np.corrcoef(logits[0].ravel(), logits[1].ravel())[0, 1] > 0.95
    assert not np.array_equal(logits[0], logits[1])


def test_litert_quality_scores_a_build_as_evaluate_scores_the_model(tflite_report, keras_model):
    """`benchmarks/litert_quality.py` scores a build's `logits` signature on the windows and
    with the loss `algpt2 evaluate` uses: a float32 build's perplexity is the Keras model's."""
    from ai_edge_litert.interpreter import Interpreter

    from algpt2_tf.evaluation import evaluate_texts

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    try:
        import litert_quality
    finally:
        sys.path.pop(0)
    texts = [" ".join(PROBE_TEXT * 6), "Hello there, general reader of these lines."]
    runner = Interpreter(model_path=tflite_report.path).get_signature_runner("logits")
    got = litert_quality.held_out(runner, GPT2Tokenizer(), texts, 32, 16)
    expected = evaluate_texts(keras_model, GPT2Tokenizer(), texts, seq_len=32, stride=16,
                              verbose=0)
    assert got["tokens"] == expected["tokens"] > 32  # more than one window
    assert got["token_perplexity"] == pytest.approx(expected["token_perplexity"], rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(expected["bits_per_byte"], rel=1e-5)


def test_export_bad_input_exits_2_and_leaves_nothing(tmp_path, model_path, capsys):
    out = str(tmp_path / "m")
    assert main(["export", "--model", model_path, "--format", "keras", "--out", out]) == 0
    before = sorted(os.listdir(out))
    cases = [
        (["--format", "onnx"], "Unknown format"),
        (["--format", "keras", "--model", str(tmp_path / "none.keras")], "No model"),
        (["--format", "keras", "--version", "1"], "already exists"),
        (["--format", "tflite", "--max-length", "4096"], "max_positions"),
        (["--format", "keras", "--quantize", "fp16"], "tflite format only"),
        (["--format", "savedmodel", "--quantize", "int4"], "int4 applies to the tflite"),
        (["--format", "savedmodel", "--batch", "2"], "tflite format only"),
        (["--format", "tflite", "--batch", "0"], "batch must be a positive integer"),
    ]
    for extra, message in cases:
        args = ["export", "--model", model_path, "--out", out] + extra
        if "--model" in extra:
            args = ["export", "--out", out] + extra
        assert main(args) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert sorted(os.listdir(out)) == before
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["export", "--model", model_path, "--format", "keras", "--out",
                 str(blocker / "sub")]) == 2
    assert main(["export", "--model", model_path, "--format", "keras", "--out", str(blocker)]) == 2
    assert "not a directory" in capsys.readouterr().err
    # --batch: a TFLite export whose steps decode 2 rows together.
    from ai_edge_litert.interpreter import Interpreter

    lite = str(tmp_path / "lite")
    assert main(["export", "--model", model_path, "--format", "tflite", "--out", lite,
                 "--max-length", "32", "--batch", "2"]) == 0
    steps = InterpreterSteps(Interpreter(model_path=os.path.join(lite, "1", "model.tflite")))
    assert steps.batch == 2 and steps.lengths == [32]
    # --overwrite replaces version 1 in place.
    assert main(["export", "--model", model_path, "--format", "keras", "--out", out,
                 "--version", "1", "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == before


def test_failed_export_leaves_nothing(tmp_path, model_path, monkeypatch):
    from algpt2_tf.export import api as export_lib

    def broken(*args, **kwargs):
        raise export_lib.ExportVerificationError("simulated mismatch")

    monkeypatch.setitem(export_lib._EXPORTERS, "keras", broken)
    with pytest.raises(export_lib.ExportVerificationError):
        export_model(model_path, "keras", str(tmp_path / "new"), log=lambda *_: None)
    assert not os.path.exists(tmp_path / "new")


def test_tools_export_script(tmp_path, model_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(repo, "tools", "export.py"), "--model",
                           model_path, "--format", "keras", "--out", str(tmp_path / "t")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Wrote keras" in done.stdout
    bad = subprocess.run([sys.executable, os.path.join(repo, "tools", "export.py"), "--model",
                          model_path, "--format", "zip", "--out", str(tmp_path / "t")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Unknown format" in bad.stderr


@pytest.mark.slow
def test_algpt2_int8_tflite_size(tmp_path):
    # `algpt2` with 2 of its 12 layers: the same weights (one shared block), a
    # sixth of the conversion time; two cache lengths, so five signatures. A second
    # copy of the block (7 MB in int8) or of the table (6.4 MB) would not fit.
    config = dataclasses.replace(ALGPT2Config.from_preset("algpt2"), num_layers=2)
    model = ALGPT2LMHeadModel(config)
    path = str(tmp_path / "algpt2.keras")
    model.save(path)
    report = export_model(path, "tflite", str(tmp_path / "lite"), quantize="int8",
                          max_length=64, log=lambda *_: None)
    # One int8 copy of the 50257 x 128 table serves the lookup and the tied
    # softmax, and every signature uses the same weights.
    assert report.size_bytes <= 15e6, report.size_bytes


def test_host_view_refuses_a_buffer_it_cannot_write_through(monkeypatch):
    """`litert.host_view` checks that what it writes reads back through the buffer: a buffer
    without host memory, or a C library that hands out other memory, is a clear error."""
    import ctypes

    from ai_edge_litert.tensor_buffer import TensorBuffer

    from algpt2_tf.export import litert

    array = np.zeros((2, 3), np.float32)
    buffer = TensorBuffer.create_from_host_memory(array)
    view = litert.host_view(buffer, (2, 3))
    view[1, 2] = 7.0
    assert buffer.read(6, np.float32)[5] == 7.0
    with pytest.raises(ValueError, match="larger than the buffer"):
        litert.host_view(buffer, (3, 3))
    library, name, pointer = litert._litert_c_api()
    elsewhere = np.zeros(6, np.float32)

    class Library:
        def __init__(self, status, address):
            self.status, self.address = status, address

        def LiteRtGetTensorBufferHostMemory(self, buffer, address):  # noqa: N802 (C name)
            ctypes.cast(address, ctypes.POINTER(ctypes.c_void_p))[0] = self.address
            return self.status

    monkeypatch.setattr(litert, "_litert_c_api", lambda: (Library(1, None), name, pointer))
    with pytest.raises(RuntimeError, match="no host memory"):
        litert.host_view(buffer, (2, 3))
    monkeypatch.setattr(litert, "_litert_c_api",
                        lambda: (Library(0, elsewhere.ctypes.data), name, pointer))
    with pytest.raises(RuntimeError, match="does not read back"):
        litert.host_view(buffer, (2, 3))
