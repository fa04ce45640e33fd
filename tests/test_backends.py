"""The same model on Keras 3's TensorFlow, PyTorch and JAX backends.

A backend is chosen before Keras is imported, so each runs in a subprocess
(`backend_check.py`): the TensorFlow-written reference model loads on each,
gives the same logits, padding and the cached step behave, bad input gives the
same clear errors, `fit` lowers the LM and SOP losses, and the model each
backend trained loads on the other two with the same logits.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import kill_at_first_checkpoint_then_rerun, randomize_weights

from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel

pytest.importorskip("torch")
pytest.importorskip("jax")

BACKENDS = ("tensorflow", "torch", "jax")
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backend_check.py")
TOL = 1e-4


def run_check(backend, mode, folder):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3",
               CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, SCRIPT, mode, str(folder)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{backend} {mode}:\n{done.stderr[-4000:]}"
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    found = json.loads(line[len("RESULT "):])
    assert found["backend"] == backend
    return found


def write_reference(folder, config, seed, length):
    """The TensorFlow-written model every backend loads (`reference.keras`) and its logits
    on random ids (`reference.npz`); returns the model."""
    rng = np.random.default_rng(seed)
    model = randomize_weights(ALGPT2LMHeadModel(config), rng)
    ids = rng.integers(0, config.vocab_size, (2, length)).astype("int32")
    model.save(str(folder / "reference.keras"))
    np.savez(folder / "reference.npz", ids=ids,
             logits=np.asarray(model({"input_ids": ids})["logits"]))
    return model


@pytest.fixture(scope="module")
def findings(tmp_path_factory):
    folder = tmp_path_factory.mktemp("backends")
    write_reference(folder, ALGPT2Config(
        vocab_size=97, max_positions=32, hidden_size=32, num_layers=3, num_heads=4,
        intermediate_size=64, embedding_size=8, sop_head=True, per_layer_norms=True, lora_rank=2,
        embedding_dropout=0.0, attention_dropout=0.0, residual_dropout=0.0), seed=0, length=10)
    written = {b: run_check(b, "write", folder) for b in BACKENDS}
    read = {b: run_check(b, "read", folder) for b in BACKENDS}
    return written, read


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_torch_and_jax_give_the_tensorflow_logits_and_greedy_tokens(tmp_path, backend):
    """The fast tier's twin of the backend matrix: one subprocess per backend loads the
    TensorFlow-written model, matches its logits and its greedy tokens."""
    model = write_reference(tmp_path, ALGPT2Config(
        vocab_size=97, max_positions=32, hidden_size=16, num_layers=2, num_heads=2,
        intermediate_size=32, embedding_size=8, per_layer_norms=True, embedding_dropout=0.0,
        attention_dropout=0.0, residual_dropout=0.0), seed=1, length=6)
    found = run_check(backend, "parity", tmp_path)
    assert found["forward_diff"] < TOL
    assert found["greedy"] == model.generate([[5, 6, 7], [8]], max_new_tokens=6,
                                             stop_ids=[]).new_ids


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_padding_and_cache_match_the_tensorflow_reference(findings, backend):
    found = findings[0][backend]
    assert found["forward_diff"] < TOL
    assert found["padding_diff"] < TOL
    assert found["cache_diff"] < TOL


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_gives_the_same_clear_errors(findings, backend):
    found = findings[0][backend]
    assert "input_ids must be < vocab_size (97)" in found["error_large_id"]
    assert "input_ids must be >= 0" in found["error_negative_id"]
    assert "exceeds max_positions (32)" in found["error_too_long"]



@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_lowers_the_lm_and_sop_losses(findings, backend):
    found = findings[0][backend]
    assert found["lm_loss"][-1] < found["lm_loss"][0]
    assert found["sop_loss"][-1] < found["sop_loss"][0]


@pytest.mark.slow
@pytest.mark.parametrize("reader", BACKENDS)
def test_a_model_saved_on_one_backend_loads_on_the_others(findings, reader):
    found = findings[1][reader]
    writers = [b for b in BACKENDS if b != reader]
    assert sorted(k for k in found if k.startswith("load_")) == sorted(
        f"load_{w}_diff" for w in writers)
    for writer in writers:
        assert found[f"load_{writer}_diff"] < TOL, writer


@pytest.mark.slow
def test_a_plain_pytorch_loop_trains_the_model(findings):
    found = findings[0]["torch"]
    assert found["is_torch_module"]
    losses = found["torch_loop_losses"]
    assert losses[-1] < losses[0]
    losses = found["dataloader_lm_loss"]  # fit on a torch.utils.data.DataLoader
    assert len(losses) == 3 and losses[-1] < losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_greedy_generation_gives_the_tensorflow_tokens(findings, backend):
    found, reference = findings[0][backend], findings[0]["tensorflow"]
    assert found["greedy"] == reference["greedy"]
    assert [len(row) for row in found["greedy"]] == [6, 6]
    assert found["sampling_repeats"]  # the same seed, the same tokens


@pytest.mark.slow
def test_the_command_line_runs_on_each_backend(tmp_path, corpus):
    """`algpt2 --backend B`: train on torch, generate on JAX, evaluate on torch; export refuses."""
    from algpt2_tf.evaluation import evaluate_texts
    from algpt2_tf.causal_lm import ALGPT2LMHeadModel
    from algpt2_tf.saving import load_model
    from algpt2_tf.tokenizer import GPT2Tokenizer

    config = ALGPT2Config(max_positions=64, hidden_size=32, num_layers=2, num_heads=2,
                          intermediate_size=64, embedding_size=16, embedding_dropout=0.0,
                          attention_dropout=0.0, residual_dropout=0.0)
    config.to_json_file(tmp_path / "config.json")
    run = str(tmp_path / "run")

    def algpt2(*args):
        env = dict(os.environ, ALGPT2_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
        env.pop("KERAS_BACKEND", None)
        return subprocess.run(["algpt2", *args], env=env, capture_output=True, text=True,
                              timeout=600)

    done = algpt2("--backend", "torch", "train", "--config", str(tmp_path / "config.json"),
                  "--train-files", corpus, "--steps", "4", "--seq-len", "32", "--batch-size", "4",
                  "--checkpoint-every", "2", "--log-every", "2", "--verbose", "0", "--out", run)
    assert done.returncode == 0, done.stderr[-3000:]
    model = load_model(run, ALGPT2LMHeadModel)  # trained on torch, loaded here on TensorFlow

    expected = model.generate("The list", max_new_tokens=6, sampler="greedy").text[0]
    done = algpt2("--backend", "jax", "generate", "--model", run, "--prompt", "The list",
                  "--max-new-tokens", "6", "--sampler", "greedy")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.rstrip("\n") == expected

    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 8)
    done = algpt2("--backend", "torch", "evaluate", "--model", run, "--files",
                  str(tmp_path / "text.txt"), "--seq-len", "32", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    reference = evaluate_texts(model, GPT2Tokenizer(), [(tmp_path / "text.txt").read_text()],
                               seq_len=32, verbose=0)
    assert json.loads(done.stdout)["token_perplexity"] == pytest.approx(
        reference["token_perplexity"], rel=1e-4)

    done = algpt2("--backend", "jax", "export", "--model", run, "--format", "keras", "--out",
                  str(tmp_path / "exported"))
    assert done.returncode == 2
    assert "export needs the TensorFlow backend (this run uses jax)" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_training_resumes_exactly_on_the_backend_that_wrote_it(tmp_path, corpus, backend):
    """`kill -9` a torch / JAX run after its first checkpoint, rerun: the weights
    of an uninterrupted run."""
    from algpt2_tf.causal_lm import ALGPT2LMHeadModel
    from algpt2_tf.saving import load_model

    config = ALGPT2Config(max_positions=64, hidden_size=32, num_layers=2, num_heads=2,
                          intermediate_size=64, embedding_size=16, sop_head=True,
                          embedding_dropout=0.0, attention_dropout=0.0, residual_dropout=0.0)
    config.to_json_file(tmp_path / "config.json")
    env = dict(os.environ, ALGPT2_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    env.pop("KERAS_BACKEND", None)

    def command(out):
        return ["algpt2", "--backend", backend, "train", "--config", str(tmp_path / "config.json"),
                "--train-files", corpus, "--sop", "--steps", "6", "--seq-len", "32",
                "--batch-size", "4", "--checkpoint-every", "2", "--log-every", "2",
                "--learning-rate", "3e-3", "--warmup-steps", "2", "--verbose", "0",
                "--out", str(tmp_path / out)]

    done = subprocess.run(command("full"), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    done = kill_at_first_checkpoint_then_rerun(command("part"), tmp_path / "part",
                                               "ckpt-00000002.npz", timeout=300, env=env)
    assert "Resuming from step 2" in done.stdout
    full, part = load_model(str(tmp_path / "full"), ALGPT2LMHeadModel), load_model(str(tmp_path / "part"), ALGPT2LMHeadModel)
    for a, b in zip(full.get_weights(), part.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)
