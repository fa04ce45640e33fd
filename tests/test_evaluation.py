import json
import math

import numpy as np
import pytest
import tensorflow as tf

from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel
from algpt2_tf.cli import main
from algpt2_tf.evaluation import evaluate_texts, sliding_windows
from algpt2_tf.losses import IGNORE_INDEX
from algpt2_tf.tokenizer import GPT2Tokenizer
from conftest import shared_file


def small_model(max_positions=64):
    return ALGPT2LMHeadModel(ALGPT2Config(
        max_positions=max_positions, hidden_size=32, num_layers=2, num_heads=2,
        intermediate_size=64, embedding_size=16))


@pytest.mark.parametrize("n,seq_len,stride", [(10, 4, 2), (10, 4, 4), (23, 8, 3), (5, 8, 8), (2, 4, 1)])
def test_sliding_windows_score_every_token_once(n, seq_len, stride):
    ids = np.arange(100, 100 + n)
    scored = []
    for window, labels in sliding_windows(ids, seq_len, stride):
        assert len(window) <= seq_len
        scored += [int(x) for x in labels if x != IGNORE_INDEX]
        for i, x in enumerate(labels):
            if x != IGNORE_INDEX:
                assert x == window[i + 1]
    assert scored == list(range(101, 100 + n))


def test_metrics_match_a_direct_computation():
    model = small_model()
    tokenizer = GPT2Tokenizer()
    text = "The quick brown fox jumps over the lazy dog, again and again."
    ids = tokenizer.encode(text)
    logits = model({"input_ids": np.array([ids])})["logits"][0]
    log_probs = tf.nn.log_softmax(logits).numpy()
    nll = -sum(log_probs[t, ids[t + 1]] for t in range(len(ids) - 1))
    result = evaluate_texts(model, tokenizer, [text], seq_len=64, verbose=0)
    assert result["tokens"] == len(ids) - 1 and result["words"] == len(text.split())
    assert result["token_perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-4)
    assert result["word_perplexity"] == pytest.approx(math.exp(nll / len(text.split())), rel=1e-4)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-4)
    # A short stride only adds context: never a different token count.
    strided = evaluate_texts(model, tokenizer, [text], seq_len=8, stride=3, verbose=0)
    assert strided["tokens"] == result["tokens"]


@pytest.mark.slow
def test_wikitext2_validation(tmp_path, capsys):
    path = shared_file("wikitext-2-raw", "wiki.valid.raw")
    model = small_model(max_positions=256)
    model.save(str(tmp_path / "m.keras"))
    out = tmp_path / "ppl.json"
    assert main(["evaluate", "--model", str(tmp_path / "m.keras"), "--files", path,
                 "--seq-len", "256", "--stride", "256", "--batch-size", "16", "--json", str(out),
                 "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"token_perplexity", "bits_per_byte", "word_perplexity", "tokens", "words"}
    text = open(path, encoding="utf-8").read()
    assert result["words"] == len(text.split()) == 213886  # -> word counts as WikiText papers use
    assert result["tokens"] == len(GPT2Tokenizer().encode(text)) - 1
    # An untrained model is close to uniform over 50257 ids.
    assert 20000 < result["token_perplexity"] < 80000
    assert json.loads(capsys.readouterr().out)["tokens"] == result["tokens"]


def test_evaluate_bad_input(tmp_path, capsys):
    assert main(["evaluate", "--model", str(tmp_path / "none.keras"), "--files", "x"]) == 2
    assert "No model" in capsys.readouterr().err
    model = small_model()
    model.save(str(tmp_path / "m.keras"))
    assert main(["evaluate", "--model", str(tmp_path / "m.keras"), "--files",
                 str(tmp_path / "*.txt"), "--quiet"]) == 2
    assert "No files match" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("hello there")
    assert main(["evaluate", "--model", str(tmp_path / "m.keras"), "--files",
                 str(tmp_path / "a.txt"), "--seq-len", "999", "--quiet"]) == 2
    assert "max_positions" in capsys.readouterr().err


def test_generate_and_evaluate_on_jax_import_no_tensorflow(tmp_path):
    """`algpt2 --backend jax generate` (the host loop) and `evaluate` load the network alone:
    the greedy text and the perplexity of this process's TensorFlow model, and TensorFlow
    never imported in theirs (checked with `sys.modules`)."""
    import os
    import subprocess
    import sys

    model = small_model()
    model.save(str(tmp_path / "m.keras"))
    text = "The quick brown fox jumps over the lazy dog. " * 4
    (tmp_path / "text.txt").write_text(text)
    path = str(tmp_path / "m.keras")
    code = ("import json, sys\nfrom algpt2_tf.cli import main\n"
            f"main(['--backend', 'jax', 'generate', '--model', {path!r}, '--prompt', 'The fox', "
            "'--max-new-tokens', '6', '--sampler', 'greedy'])\n"
            f"main(['--backend', 'jax', 'evaluate', '--model', {path!r}, "
            f"'--files', {str(tmp_path / 'text.txt')!r}, '--seq-len', '32', '--quiet'])\n"
            "print(json.dumps({'tensorflow': 'tensorflow' in sys.modules}))")
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALGPT2_CACHE=str(tmp_path / "cache"))
    env.pop("KERAS_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout.strip().splitlines()
    assert json.loads(printed[-1]) == {"tensorflow": False}
    assert "engine host loop (jax)" in done.stderr
    assert printed[0] == model.generate("The fox", max_new_tokens=6, sampler="greedy").text[0]
    expected = evaluate_texts(model, GPT2Tokenizer(), [text], seq_len=32, verbose=0)
    got = json.loads("\n".join(printed[1:-1]))
    assert got["token_perplexity"] == pytest.approx(expected["token_perplexity"], rel=1e-4)
