import csv
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import crash_after_checkpoint_then_rerun, kill_at_first_checkpoint_then_rerun

from algpt2_tf import ALGPT2Config
from algpt2_tf.causal_lm import ALGPT2LMHeadModel
from algpt2_tf.cli import main
from algpt2_tf.saving import load_model
from algpt2_tf.training.trainer import TrainOptions, WarmupDecay, train


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALGPT2_CACHE", str(tmp_path / "cache"))


def options(tmp_path, config, corpus, out="run", **kw):
    values = dict(out=str(tmp_path / out), preset=None, config=config, train_files=[corpus],
                  seq_len=32, batch_size=4, steps=12, learning_rate=3e-3, warmup_steps=2,
                  checkpoint_every=4, keep_checkpoints=2, log_every=2, verbose=0, seed=7)
    values.update(kw)
    return TrainOptions(**values)


def lm_loss_curve(run_dir):
    """The logged `lm_loss` values of a run, in step order."""
    with open(run_dir / "metrics.csv") as f:
        return np.array([float(r["lm_loss"]) for r in csv.DictReader(f)])


def weights(path):
    return load_model(path, ALGPT2LMHeadModel).get_weights()


def test_training_writes_everything(tmp_path, small_config, corpus):
    result = train(options(tmp_path, small_config, corpus, valid_fraction=0.1), log=lambda *_: None)
    run = tmp_path / "run"
    assert result["model"] == str(run / "model.keras")
    assert sorted(os.listdir(run / "checkpoints")) == ["ckpt-00000008.npz", "ckpt-00000012.npz"]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    train_rows = [r for r in rows if r.get("loss")]
    assert [int(r["step"]) for r in train_rows] == [2, 4, 6, 8, 10, 12]
    assert float(train_rows[-1]["lm_loss"]) < float(train_rows[0]["lm_loss"])
    assert any(r.get("val_lm_loss") for r in rows)
    assert os.listdir(run / "logs")  # TensorBoard
    model = load_model(str(run), ALGPT2LMHeadModel)
    assert model.config.hidden_size == 32


def test_a_crash_after_a_checkpoint_then_a_rerun_equals_uninterrupted(tmp_path, small_config,
                                                                     corpus, monkeypatch):
    """The fast tier's twin of the `kill -9` test below: the run dies in-process right after
    its first checkpoint; the same options then resume to the weights of an unbroken run."""
    full = train(options(tmp_path, small_config, corpus, out="full", steps=8), log=lambda *_: None)
    part = crash_after_checkpoint_then_rerun(
        lambda: train(options(tmp_path, small_config, corpus, out="part", steps=8),
                      log=lambda *_: None), tmp_path / "part", monkeypatch)
    assert part["resumed_from"] == 4
    for a, b in zip(weights(full["model"]), weights(part["model"])):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, small_config, corpus):
    """kill -9 after the first checkpoint, rerun the same command: same final weights."""
    steps = 40
    full = train(options(tmp_path, small_config, corpus, out="full", steps=steps),
                 log=lambda *_: None)
    part_dir = tmp_path / "part"
    cmd = [sys.executable, "-m", "algpt2_tf.cli", "train", "--config", small_config,
           "--train-files", corpus, "--out", str(part_dir), "--seq-len", "32", "--batch-size", "4",
           "--steps", str(steps), "--learning-rate", "3e-3", "--warmup-steps", "2",
           "--checkpoint-every", "4", "--keep-checkpoints", "2", "--log-every", "2",
           "--verbose", "0", "--seed", "7"]
    done = kill_at_first_checkpoint_then_rerun(cmd, part_dir, timeout=120)
    assert "Resuming from step" in done.stdout
    for a, b in zip(weights(full["model"]), weights(str(part_dir))):
        np.testing.assert_allclose(a, b, atol=1e-5)
    rows = [int(r["step"]) for r in csv.DictReader(open(part_dir / "metrics.csv"))]
    assert rows == list(range(2, steps + 1, 2))


def test_sop_training_and_grad_accum(tmp_path, small_config, corpus):
    result = train(options(tmp_path, small_config, corpus, sop=True, grad_accum=2, steps=4,
                           checkpoint_every=2, optimizer="lamb", schedule="linear"),
                   log=lambda *_: None)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert {"sop_loss", "sop_accuracy"} <= set(rows[0])
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert os.path.exists(result["model"])


def test_mixed_precision_training(tmp_path, small_config, corpus, monkeypatch):
    from algpt2_tf.runtime import cpu_info

    # As on an AMD Zen 3 (AVX2, no bfloat16 units): training warns, once, naming the CPU.
    zen3 = {"vendor": "AuthenticAMD", "model_name": "AMD EPYC 7B13", "family": 25, "model": 1,
            "features": ["avx2", "fma"], "cache_kb": {}, "logical_cpus": 2}
    monkeypatch.setattr(cpu_info, "cpu_info", lambda: zen3)
    lines = []
    result = train(options(tmp_path, small_config, corpus, mixed_precision="bf16", steps=4),
                   log=lines.append)
    model = load_model(result["model"], ALGPT2LMHeadModel)
    assert model.embedding.token_embeddings.dtype == "float32"
    assert keras.config.dtype_policy().name == "float32"
    warned = [line for line in lines if "no bfloat16 units" in line]
    assert len(warned) == 1 and "AMD EPYC 7B13" in warned[0]
    # With bfloat16 units (AVX512-BF16), no warning.
    monkeypatch.setattr(cpu_info, "cpu_info", lambda: dict(zen3, features=["avx512_bf16"]))
    lines = []
    train(options(tmp_path, small_config, corpus, out="run2", mixed_precision="bf16", steps=2),
          log=lines.append)
    assert not any("no bfloat16 units" in line for line in lines)


def test_bf16_loss_curve_tracks_float32(tmp_path, small_config, corpus):
    curves = {}
    for precision in (None, "bf16"):
        run = f"run-{precision}"
        train(options(tmp_path, small_config, corpus, out=run, mixed_precision=precision,
                      steps=40, learning_rate=1e-2, log_every=4), log=lambda *_: None)
        curves[precision] = lm_loss_curve(tmp_path / run)
    assert curves[None][-1] < curves[None][0] - 0.5  # it learns
    np.testing.assert_allclose(curves["bf16"], curves[None], rtol=0.05)


def test_fuse_elementwise_and_jit_compile_exclude_each_other(tmp_path, small_config, corpus):
    with pytest.raises(ValueError, match="--fuse-elementwise and --jit-compile"):
        train(options(tmp_path, small_config, corpus, fuse_elementwise=True, jit_compile=True))
    assert not (tmp_path / "run").exists()


def _clustered_ops(dump_dir):
    """Op types inside / outside XLA clusters in TF's mark_for_compilation graph dumps."""
    import glob
    import re

    clustered, unclustered = set(), set()
    for path in glob.glob(os.path.join(dump_dir, "mark_for_compilation_annotated*.pbtxt")):
        for node in open(path).read().split("\nnode {")[1:]:
            op = re.search(r'op: "([^"]+)"', node).group(1)
            (clustered if "_XlaCluster" in node else unclustered).add(op)
    return clustered, unclustered


@pytest.mark.slow
def test_fused_bf16_training_clusters_elementwise_ops_only(tmp_path, small_config, corpus):
    """`--fuse-elementwise`: XLA clusters hold the element-wise ops, no matmul or reduction;
    the loss curve is that of unfused bf16 training."""
    dump = tmp_path / "graphs"
    env = dict(os.environ, ALGPT2_CACHE=str(tmp_path / "cache"),
               TF_XLA_FLAGS="--tf_xla_clustering_debug", TF_DUMP_GRAPH_PREFIX=str(dump))
    args = ["--out", str(tmp_path / "fused"), "--config", small_config, "--train-files", corpus,
            "--seq-len", "32", "--batch-size", "4", "--steps", "40", "--learning-rate", "1e-2",
            "--warmup-steps", "2", "--log-every", "4", "--checkpoint-every", "20", "--seed", "7",
            "--verbose", "0", "--mixed-precision", "bf16"]
    done = subprocess.run([sys.executable, "-m", "algpt2_tf.cli", "train", *args,
                           "--fuse-elementwise"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    clustered, unclustered = _clustered_ops(dump)
    assert {"Tanh", "TanhGrad", "Mul", "Cast", "Rsqrt"} <= clustered  # GELU, LayerNorm, casts
    assert not {"MatMul", "BatchMatMulV2", "Sum", "Mean"} & clustered
    assert {"MatMul", "BatchMatMulV2", "Sum"} <= unclustered  # oneDNN / TF kernels run them

    train(options(tmp_path, small_config, corpus, out="plain", mixed_precision="bf16",
                  steps=40, learning_rate=1e-2, log_every=4, checkpoint_every=20),
          log=lambda *_: None)
    curves = [lm_loss_curve(tmp_path / run) for run in ("fused", "plain")]
    assert curves[0][-1] < curves[0][0] - 0.5  # it learns
    np.testing.assert_allclose(curves[0], curves[1], rtol=0.05)


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, small_config, corpus):
    from algpt2_tf.training.trainer import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        train(options(tmp_path, small_config, corpus, learning_rate=1e9, clip_norm=None,
                      warmup_steps=0, steps=40, checkpoint_every=1, schedule="constant"),
              log=lambda *_: None)
    run = tmp_path / "run"
    assert not (run / "model.keras").exists()
    for name in os.listdir(run / "checkpoints"):
        with np.load(run / "checkpoints" / name) as saved:
            assert all(np.isfinite(saved[k]).all() for k in saved.files), name


def test_schedule_warmup_then_decay():
    schedule = WarmupDecay(1.0, warmup_steps=10, total_steps=110, kind="cosine", min_ratio=0.1)
    values = [float(schedule(s)) for s in (0, 9, 10, 60, 110, 500)]
    assert values[0] == pytest.approx(0.1) and values[1] == pytest.approx(1.0)
    assert values[2] == pytest.approx(1.0) and values[3] == pytest.approx(0.55)
    assert values[4] == pytest.approx(0.1) and values[5] == pytest.approx(0.1)
    linear = WarmupDecay(1.0, 0, 100, kind="linear", min_ratio=0.0)
    assert float(linear(50)) == pytest.approx(0.5)


def test_weight_decay_skips_norms_biases_and_embeddings(tmp_path, small_config, corpus):
    from algpt2_tf import ALGPT2LMHeadModel
    from algpt2_tf.training.trainer import make_optimizer

    opt = make_optimizer(options(tmp_path, small_config, corpus), 10)
    model = ALGPT2LMHeadModel(ALGPT2Config.from_json_file(small_config))
    opt.build(model.trainable_variables)
    decayed = {v.path for v in model.trainable_variables if opt._use_weight_decay(v)}
    assert any(p.endswith("qkv/kernel") for p in decayed)
    assert not any(p.endswith(("gamma", "beta", "bias", "embeddings")) for p in decayed)


def run_cli(*args):
    return main(list(args))


def test_cli_bad_input_exits_2_and_keeps_the_run(tmp_path, small_config, corpus, capsys):
    base = ["train", "--config", small_config, "--train-files", corpus, "--seq-len", "32",
            "--batch-size", "4", "--steps", "4", "--checkpoint-every", "2", "--verbose", "0"]
    out = str(tmp_path / "run")
    assert run_cli(*base, "--out", out) == 0
    before = {n: os.path.getmtime(os.path.join(out, "checkpoints", n))
              for n in os.listdir(os.path.join(out, "checkpoints"))}
    cases = [
        (["--out", out, "--seed", "99"], "different run"),
        (["--out", str(tmp_path / "x"), "--preset", "nope"], "preset"),
        (["--out", str(tmp_path / "x"), "--train-files", str(tmp_path / "missing*.txt")], "missing"),
        (["--out", str(tmp_path / "x"), "--seq-len", "4096"], "max_positions"),
        (["--out", str(tmp_path / "x"), "--epochs", "1"], "not both"),
        (["--out", str(tmp_path / "x"), "--batch-size", "100000"], "fewer than one batch"),
        (["--out", str(tmp_path / "x"), "--optimizer", "sgd"], "optimizer"),
    ]
    for extra, message in cases:
        assert run_cli(*base, *extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert run_cli(*base, "--out", str(tmp_path / "y"), "--train-files", str(empty)) == 2
    assert "empty" in capsys.readouterr().err
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    assert run_cli(*base, "--out", str(tmp_path / "y"), "--train-files", str(tmp_path / "bad.txt")) == 2
    assert "UTF-8" in capsys.readouterr().err
    after = {n: os.path.getmtime(os.path.join(out, "checkpoints", n))
             for n in os.listdir(os.path.join(out, "checkpoints"))}
    assert before == after
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")
    # The finished run reruns as a no-op.
    assert run_cli(*base, "--out", out) == 0
    assert "already complete" in capsys.readouterr().out
