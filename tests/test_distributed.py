"""Data-parallel training (`algpt2_tf/distribute.py`): 2 logical CPU devices under `mirrored`
give the single-device run's gradients, weights and metrics, and resume exactly."""

import json
import os
import subprocess
import sys

import numpy as np

from conftest import kill_at_first_checkpoint_then_rerun

from algpt2_tf.saving import load_model
from algpt2_tf.training import TrainOptions, train

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")

ONE_STEP = """
import json
import numpy as np
from algpt2_tf.distribute import make_strategy, scope
strategy = make_strategy("mirrored", 2)  # before TensorFlow runs anything
import keras
from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel

config = ALGPT2Config(vocab_size=97, max_positions=32, hidden_size=32, num_layers=3, num_heads=4,
                      intermediate_size=64, embedding_size=8, embedding_dropout=0.0,
                      attention_dropout=0.0, residual_dropout=0.0, sop_head=True)
ids = np.random.default_rng(0).integers(0, 97, (4, 16)).astype("int32")
mask = np.ones_like(ids)
mask[0, :9] = 0  # left padding: the two replicas see different numbers of tokens
mask[3, :3] = 0
batch = {"input_ids": ids, "attention_mask": mask, "sop_labels": np.array([0, 1, 1, 0], "int32")}

def one_sgd_step(strategy):
    with scope(strategy):
        keras.utils.set_random_seed(1)
        model = ALGPT2LMHeadModel(config)
        model.compile(optimizer=keras.optimizers.SGD(0.5))
    before = model.get_weights()
    history = model.fit(batch, batch_size=4, epochs=1, shuffle=False, verbose=0).history
    return [a - b for a, b in zip(model.get_weights(), before)], history

single, single_logs = one_sgd_step(None)
mirrored, mirrored_logs = one_sgd_step(strategy)
print(json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "relative": max(float(np.abs(a - b).max() / np.abs(a).max())
                    for a, b in zip(single, mirrored) if np.abs(a).max() > 0),
    "moved": sum(int(np.abs(a).max() > 0) for a in single),
    "single": single_logs, "mirrored": mirrored_logs}))
"""


def test_one_step_on_two_replicas_is_the_global_batchs_step():
    """SGD (scale-sensitive, unlike Adam): summed replica gradients = the global gradient,
    with unequal token counts per replica and the SOP loss; metrics agree."""
    done = subprocess.run([sys.executable, "-c", ONE_STEP], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2 and out["moved"] > 10
    assert out["relative"] < 1e-4
    for name in ("loss", "lm_loss", "sop_loss", "sop_accuracy", "perplexity"):
        np.testing.assert_allclose(out["mirrored"][name], out["single"][name], rtol=1e-4)


def test_mirrored_training_equals_one_device_and_resumes_exactly(tmp_path, small_config, corpus,
                                                                 monkeypatch):
    monkeypatch.setenv("ALGPT2_CACHE", str(tmp_path / "cache"))
    steps = 8
    single = train(TrainOptions(
        out=str(tmp_path / "single"), preset=None, config=small_config, train_files=[corpus],
        seq_len=32, batch_size=4, steps=steps, learning_rate=3e-3, warmup_steps=2, sop=True,
        checkpoint_every=4, log_every=2, verbose=0, seed=7), log=lambda *_: None)
    run_dir = tmp_path / "mirrored"
    cmd = [sys.executable, "-m", "algpt2_tf.cli", "train", "--config", small_config,
           "--train-files", corpus, "--out", str(run_dir), "--seq-len", "32", "--batch-size", "4",
           "--steps", str(steps), "--learning-rate", "3e-3", "--warmup-steps", "2", "--sop",
           "--checkpoint-every", "4", "--log-every", "2", "--verbose", "0", "--seed", "7",
           "--distribute", "mirrored", "--replicas", "2"]
    env = dict(ENV, ALGPT2_CACHE=str(tmp_path / "cache"))
    done = kill_at_first_checkpoint_then_rerun(cmd, run_dir, timeout=300, env=env)
    assert "Resuming from step 4" in done.stdout
    for a, b in zip(load_model(single["model"]).get_weights(), load_model(str(run_dir)).get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    rows = {name: open(tmp_path / name / "metrics.csv").read().splitlines()
            for name in ("single", "mirrored")}
    assert rows["single"][0] == rows["mirrored"][0] and len(rows["single"]) == len(rows["mirrored"])


def test_bad_distribute_options_exit_2(tmp_path, capsys):
    from algpt2_tf.cli import main

    for extra, message in [(["--distribute", "ring"], "--distribute must be one of"),
                           (["--replicas", "2"], "--replicas needs --distribute mirrored"),
                           (["--distribute", "mirrored", "--replicas", "0"], "positive integer")]:
        assert main(["train", "--out", str(tmp_path / "x")] + extra) == 2
        assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
