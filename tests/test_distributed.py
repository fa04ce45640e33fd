"""Data-parallel training (`algpt2_tf/training/distribute.py`): 2 logical CPU devices under `mirrored`,
and 2 local JAX processes under `jax-data-parallel` (`algpt2 launch`), give the single-device
run's gradients, weights and metrics, write once, and resume exactly."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import free_port, kill_at_first_checkpoint_then_rerun

from algpt2_tf.causal_lm import ALGPT2LMHeadModel
from algpt2_tf.saving import load_model
from algpt2_tf.training.trainer import TrainOptions, train

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")

ONE_STEP = """
import json
import numpy as np
from algpt2_tf.training.distribute import make_strategy, scope
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


@pytest.mark.slow  # its fast-tier twin: the one-step test above (the same sums, in-process)
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
    for a, b in zip(load_model(single["model"], ALGPT2LMHeadModel).get_weights(), load_model(str(run_dir), ALGPT2LMHeadModel).get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    rows = {name: open(tmp_path / name / "metrics.csv").read().splitlines()
            for name in ("single", "mirrored")}
    assert rows["single"][0] == rows["mirrored"][0] and len(rows["single"]) == len(rows["mirrored"])


def test_bad_distribute_options_exit_2(tmp_path, capsys):
    from algpt2_tf.cli import main

    for extra, message in [
            (["--distribute", "ring"], "--distribute must be one of"),
            (["--replicas", "2"], "--replicas needs --distribute mirrored"),
            (["--distribute", "mirrored", "--replicas", "0"], "positive integer"),
            (["--distribute", "multi-worker"], "Invalid reduction dimension 0"),
            (["--distribute", "jax-data-parallel"], "needs the JAX backend"),
            (["--coordinator", "localhost:1", "--num-processes", "2"],
             "need --distribute jax-data-parallel"),
            (["--num-processes", "2", "--process-id", "0"], "need a coordinator"),
            (["--num-processes", "2", "--process-id", "2", "--coordinator", "h:1"],
             "outside 0...1")]:
        assert main(["train", "--out", str(tmp_path / "x")] + extra) == 2
        assert message in capsys.readouterr().err
    for command, message in [([], "Give the command after --"),
                             (["--", "generate", "--model", "m", "--prompt", "x"], "runs `train --distribute"),
                             (["--", "train", "--stepz", "1"], "not a valid algpt2 command"),
                             (["--", "train", "--out", "x"], "runs `train --distribute"),
                             (["--", "--backend", "torch", "train", "--out", "x", "--distribute",
                               "jax-data-parallel"], "needs --backend jax")]:
        assert main(["launch", "--nproc", "2"] + command) == 2
        assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


# ------------------------------------------------------------ JAX processes
def jax_train_args(config, corpus, out, steps):
    return ["train", "--config", config, "--train-files", corpus, "--valid-fraction", "0.2",
            "--out", str(out), "--seq-len", "32", "--batch-size", "4", "--steps", str(steps),
            "--learning-rate", "3e-3", "--warmup-steps", "2", "--sop", "--checkpoint-every", "4",
            "--log-every", "2", "--verbose", "0", "--seed", "7"]


class Launch:
    """`algpt2 launch --nproc 2 -- ARGS` in the background, its output collected."""

    def __init__(self, args, env):
        self.lines = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "algpt2_command", "launch", "--nproc", "2", "--", *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout),
                                       daemon=True)
        self.reader.start()

    def pid(self, index, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in list(self.lines):
                found = re.match(rf"algpt2 launch: process {index} of 2: pid (\d+)", line)
                if found:
                    return int(found.group(1))
            time.sleep(0.01)
        raise AssertionError("launch printed no pids:\n" + "".join(self.lines))

    def wait(self, timeout=600):
        self.proc.wait(timeout)
        self.reader.join(10)
        return self.proc.returncode, "".join(self.lines)


def final_lines(output):
    """Each process's closing `Process I of 2: step N, {metrics}` line, by process."""
    return {int(m.group(1)): m.group(2)
            for m in re.finditer(r"^\[\d\] Process (\d) of 2: (.*)$", output, re.M)}


@pytest.mark.slow
def test_two_jax_processes_train_like_one_write_once_and_resume_after_a_kill(
        tmp_path, small_config, corpus):
    """`algpt2 launch --nproc 2 -- train --distribute jax-data-parallel`: kill -9 process 1
    after the first checkpoint, the launch stops process 0 too; the same command resumes; the
    weights equal one process's run over the same global batches (1e-4), both processes
    report the same metrics, and only the chief wrote (one metrics row per step, TensorBoard
    files from the chiefs alone)."""
    env = dict(ENV, ALGPT2_CACHE=str(tmp_path / "cache"))
    steps = 24
    single_dir, run_dir = tmp_path / "single", tmp_path / "two"
    done = subprocess.run([sys.executable, "-m", "algpt2_command", "--backend", "jax",
                           *jax_train_args(small_config, corpus, single_dir, steps)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    args = jax_train_args(small_config, corpus, run_dir, steps) + [
        "--distribute", "jax-data-parallel"]
    first = Launch(args, env)
    chiefs = [first.pid(0)]
    worker = first.pid(1)
    checkpoint = run_dir / "checkpoints" / "ckpt-00000004.npz"
    deadline = time.time() + 300
    while not checkpoint.exists():
        assert first.proc.poll() is None and time.time() < deadline, "".join(first.lines)
        time.sleep(0.005)
    os.kill(worker, signal.SIGKILL)
    status, output = first.wait()
    assert status == 128 + signal.SIGKILL, output
    assert "process 1 failed with status 137; stopped the others" in output
    assert not (run_dir / "model.keras").exists(), "the run finished before the kill"

    second = Launch(args, env)
    chiefs.append(second.pid(0))
    status, output = second.wait()
    assert status == 0, output
    assert "Resuming from step" in output
    closing = final_lines(output)
    assert closing[0] == closing[1] and closing[0].startswith(f"step {steps},")

    for a, b in zip(load_model(str(single_dir), ALGPT2LMHeadModel).get_weights(), load_model(str(run_dir), ALGPT2LMHeadModel).get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    # One writer: each training row once (a kill right after a checkpoint can cost that
    # step's validation row, so those are not counted).
    train_rows = {name: [row.split(",")[0] for row in open(tmp_path / name / "metrics.csv")
                         if row.split(",")[1]] for name in ("single", "two")}
    assert train_rows["two"] == train_rows["single"]
    events = glob.glob(str(run_dir / "logs" / "*" / "events.out.tfevents.*"))
    assert events and {int(e.split(".")[-3]) for e in events} <= set(chiefs)


def test_a_process_that_meets_nobody_fails_clearly_within_its_timeout(tmp_path, small_config,
                                                                      corpus):
    env = dict(ENV, ALGPT2_CACHE=str(tmp_path / "cache"))
    port = free_port()
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "algpt2_command", "--backend", "jax",
         *jax_train_args(small_config, corpus, tmp_path / "run", 8),
         "--distribute", "jax-data-parallel", "--coordinator", f"localhost:{port}",
         "--num-processes", "2", "--process-id", "1", "--connect-timeout", "5"],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert (f"process 1 of 2 could not meet the others at the coordinator localhost:{port} "
            "within 5 s") in done.stderr
    assert time.time() - started < 120
    assert not (tmp_path / "run").exists()
