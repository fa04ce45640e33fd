"""The LiteRT engine of `algpt2 generate`: a cached build, rebuilt when stale or damaged,
the XLA path's greedy text, and no TensorFlow at run time."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import saved_with_litert_build

from algpt2_tf import ALGPT2LMHeadModel
from algpt2_tf.cli import main
from algpt2_tf.export.litert_engine import LiteRTGenerator, build_key, cached_build
from algpt2_tf.generation.sampling import sampling_params


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model with the GPT-2 vocabulary (so the CLI's tokenizer fits), saved, and its
    build in a cache folder of its own."""
    folder = tmp_path_factory.mktemp("litert")
    model, cache, build = saved_with_litert_build(folder, "m.keras", seed=11)
    return folder, model, cache, build


def test_a_float32_build_gives_the_xla_greedy_tokens(saved):
    _, model, _, build = saved
    generator = LiteRTGenerator(build)
    for prompt in ([464, 3290], [40, 1101, 257, 1110, 13]):
        expected = model.generate([prompt], max_new_tokens=12, stop_ids=[]).new_ids[0]
        assert generator.generate(prompt, 12) == expected
    # A stop id ends it (and is the last token), as on every path.
    tokens = generator.generate([464, 3290], 12)
    stop = tokens[3]
    assert generator.generate([464, 3290], 12, stop_ids=(stop,)) == tokens[:tokens.index(stop) + 1]


def test_sampling_is_seeded_as_on_the_xla_path(saved):
    _, model, _, build = saved
    generator = LiteRTGenerator(build)
    params = sampling_params("top_p", temperature=1.0, top_p=0.9)
    first = generator.generate([464, 3290], 10, params, seed=5)
    assert generator.generate([464, 3290], 10, params, seed=6) != first
    xla = model.generate([[464, 3290]], max_new_tokens=10, sampler="top_p", top_p=0.9, seed=5,
                         stop_ids=[]).new_ids[0]
    assert first == xla  # one sampler, one meaning of a seed


def test_model_generate_on_litert_in_groups_and_a_weight_changed_since_is_rebuilt(
        saved, tmp_path, monkeypatch):
    from algpt2_tf.causal_lm import ALGPT2LMHeadModel
    from algpt2_tf.export.litert_engine import batch_for
    from algpt2_tf.saving import load_model

    monkeypatch.setenv("ALGPT2_CACHE", str(tmp_path))
    folder = saved[0]
    model = load_model(str(folder / "m.keras"), ALGPT2LMHeadModel)  # its own copy: this test changes a weight

    def batches():
        return sorted(json.loads((tmp_path / "litert" / entry / "meta.json").read_text())["batch"]
                      for entry in os.listdir(tmp_path / "litert"))

    assert [batch_for(rows) for rows in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, 4]
    # Five prompts of different lengths: a group of 4 on a batch-4 build, then one row on a
    # batch-1 build; row r sampled with seed `row_seed(seed, r)` as in the XLA loop's batch.
    prompts = [[464 + r] * (1 + r % 4) + [3290] for r in range(5)]
    # (Top-k, not top-p: over this random model's nearly flat 50,257 probabilities, top-p's
    # running sum of ~45,000 of them in NumPy and in XLA can part at the last bit.)
    for options in ({}, {"sampler": "top_k", "top_k": 20, "seed": 4}):
        litert = model.generate(prompts, max_new_tokens=6, stop_ids=[], engine="litert", **options)
        assert litert.new_ids == model.generate(prompts, max_new_tokens=6, stop_ids=[],
                                                **options).new_ids
    assert batches() == [1, 4]  # each built once
    # A row that stops ends there while the others go on (3 rows: the batch-4 build).
    greedy = model.generate(prompts[:3], max_new_tokens=6, stop_ids=[], engine="litert").new_ids
    stop = greedy[1][2]
    stopped = model.generate(prompts[:3], max_new_tokens=6, stop_ids=[stop],
                             engine="litert").new_ids
    assert stopped == [row[:row.index(stop) + 1] if stop in row else row for row in greedy]
    weight = model.lm_head.weights[0] if model.lm_head.weights else model.weights[-1]
    weight.assign(weight.numpy() * 1.7 + 0.3)
    after = model.generate(prompts[:1], max_new_tokens=6, stop_ids=[], engine="litert").new_ids
    assert after == model.generate(prompts[:1], max_new_tokens=6, stop_ids=[]).new_ids
    assert batches() == [1, 1, 4]  # a new batch-1 build: never the stale one
    with pytest.raises(ValueError, match="engine must be one of xla, litert"):
        model.generate(prompts, engine="onnx")
    with pytest.raises(ValueError, match="quantize applies to engine='litert'"):
        model.generate(prompts, quantize="int8")
    with pytest.raises(ValueError, match="exceeds the LiteRT build's cache of 32 tokens"):
        model.generate([[5] * 28], max_new_tokens=8, engine="litert")


def test_limits_are_checked_before_decoding(saved):
    _, _, _, build = saved
    generator = LiteRTGenerator(build)
    with pytest.raises(ValueError, match="exceeds the LiteRT build's cache of 32 tokens"):
        generator.generate([1] * 28, 10)
    with pytest.raises(ValueError, match=r"Token ids must be in \[0, 50257\)"):
        generator.generate([50257], 2)


def test_a_changed_model_gets_a_new_build_and_a_damaged_one_is_rebuilt(saved, tmp_path):
    import shutil

    folder, model, cache, build = saved
    path = str(tmp_path / "m.keras")
    shutil.copy(folder / "m.keras", path)
    assert cached_build(path, cache=cache, build=False).folder == build.folder  # same bytes
    changed = ALGPT2LMHeadModel(model.config)
    changed.set_weights([w * 0.5 for w in model.get_weights()])
    changed.save(path)
    assert build_key(path) != build.key
    assert cached_build(path, cache=cache, build=False) is None  # never the stale build
    # A damaged entry (a cut-off model.tflite) is not used, and is rebuilt.
    tflite = os.path.join(build.folder, "model.tflite")
    data = open(tflite, "rb").read()
    try:
        with open(tflite, "wb") as f:
            f.write(data[:len(data) // 2])
        source = str(folder / "m.keras")
        assert cached_build(source, cache=cache, build=False) is None
        lines = []
        rebuilt = cached_build(source, cache=cache, log=lines.append)
        assert rebuilt.folder == build.folder and "Removing an incomplete or damaged" in lines[0]
        assert os.path.getsize(tflite) == len(data)
    finally:
        with open(tflite, "wb") as f:
            f.write(data)


RUN = """
import sys
from algpt2_tf.cli import main
code = main({argv!r})
print("MODULES", "tensorflow" in sys.modules, "keras" in sys.modules)
sys.exit(code)
"""


def run_cli(argv, cache):
    env = dict(os.environ, ALGPT2_CACHE=cache)
    return subprocess.run([sys.executable, "-c", RUN.format(argv=argv)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_generate_runs_on_the_cached_build_without_tensorflow(saved):
    folder, model, cache, _ = saved
    from algpt2_tf.tokenizer import GPT2Tokenizer

    prompt = "The old house"
    ids = GPT2Tokenizer().encode(prompt)
    expected = GPT2Tokenizer().decode(model.generate([ids], max_new_tokens=6).new_ids[0])
    argv = ["generate", "--model", str(folder / "m.keras"), "--prompt", prompt,
            "--max-new-tokens", "6", "--sampler", "greedy"]
    done = run_cli(argv, cache)  # auto: the build is cached, so LiteRT
    assert done.returncode == 0, done.stderr[-2000:]
    text, modules = done.stdout.rsplit("MODULES", 1)
    assert modules.split() == ["False", "False"]
    assert "engine litert (float32 build" in done.stderr
    assert text.rstrip("\n") == prompt + expected.split(GPT2Tokenizer().decode(
        [GPT2Tokenizer().eos_id]))[0]
    xla = run_cli(argv + ["--engine", "xla"], cache)
    assert xla.returncode == 0 and "engine xla" in xla.stderr
    assert xla.stdout.rsplit("MODULES", 1)[0] == text


def test_auto_takes_xla_until_a_build_exists_and_litert_builds_on_first_use(saved, tmp_path,
                                                                            capsys, monkeypatch):
    folder, _, _, _ = saved
    monkeypatch.setenv("ALGPT2_CACHE", str(tmp_path / "empty"))
    argv = ["generate", "--model", str(folder / "m.keras"), "--prompt", "Hi",
            "--max-new-tokens", "2", "--sampler", "greedy"]
    assert main(argv) == 0
    assert "engine xla" in capsys.readouterr().err
    assert main(argv + ["--engine", "litert", "--max-new-tokens", "40"]) == 2  # over 32 tokens
    assert "exceeds the LiteRT build's cache" in capsys.readouterr().err
    entries = os.listdir(tmp_path / "empty" / "litert")
    assert len(entries) == 1  # built on first use, kept for the next
    meta = json.loads((tmp_path / "empty" / "litert" / entries[0] / "meta.json").read_text())
    assert meta["quantize"] == "none" and meta["max_length"] == 32
