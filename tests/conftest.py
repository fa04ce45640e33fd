import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# No persistent XLA compilation cache in the test processes (the `algpt2` command turns one on
# for generate and serve: `xla_cache.use` leaves a folder the user's flags name, here none);
# tests/test_cli.py checks the cache in processes of their own.
if "--tf_xla_persistent_cache_directory=" not in os.environ.get("TF_XLA_FLAGS", ""):
    os.environ["TF_XLA_FLAGS"] = (os.environ.get("TF_XLA_FLAGS", "")
                                  + " --tf_xla_persistent_cache_directory=").strip()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from algpt2_tf import ALGPT2Config  # noqa: E402
from algpt2_tf.training.launch import free_port  # noqa: E402,F401  (tests import it from here)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


def tiny_config(**overrides):
    """A config small enough for fast unit tests (ALGPT2-shaped by default)."""
    values = dict(vocab_size=97, max_positions=32, hidden_size=32, num_layers=3, num_heads=4,
                  intermediate_size=64, embedding_size=8, num_layer_groups=1,
                  embedding_dropout=0.0, attention_dropout=0.0, residual_dropout=0.0,
                  sop_head=True)
    values.update(overrides)
    return ALGPT2Config(**values)


def gpt2_tiny_config(**overrides):
    return tiny_config(embedding_size=None, num_layer_groups=3, sop_head=False, **overrides)


def decode_test_model(kind, max_positions=64):
    """A tiny `algpt2`- or `gpt2`-shaped model with large initial weights (decoding
    tests: distinct tokens, not one repeated id), seeded."""
    from algpt2_tf import ALGPT2LMHeadModel

    keras.utils.set_random_seed(3)
    make = tiny_config if kind == "algpt2" else gpt2_tiny_config
    return ALGPT2LMHeadModel(make(max_positions=max_positions, initializer_range=0.2))


def saved_with_litert_build(folder, name, seed):
    """A tiny model with the GPT-2 vocabulary (so the CLI's tokenizer fits) saved as
    `folder/name`, and its float32 LiteRT build in `folder/cache`: `(model, cache, build)`.
    32 positions: one cache length, so a build takes a few seconds."""
    from algpt2_tf import ALGPT2LMHeadModel
    from algpt2_tf.export.litert_engine import cached_build

    keras.utils.set_random_seed(seed)
    model = ALGPT2LMHeadModel(tiny_config(vocab_size=50257, max_positions=32, sop_head=False,
                                          initializer_range=0.2))
    model.save(str(folder / name))
    cache = str(folder / "cache")
    return model, cache, cached_build(str(folder / name), cache=cache, log=lambda *_: None)


def randomize_weights(model, rng, scale=0.2):
    """Random values in every weight of `model` (LayerNorm gains around 1, biases and
    low-rank deltas included), so no weight mapping passes by accident; returns `model`."""
    for v in model.weights:
        shift = 1.0 if "gamma" in v.path else 0.0
        v.assign(rng.normal(0, scale, v.shape).astype("float32") + shift)
    return model


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture(autouse=True, scope="module")
def _free_memory_after_each_file():
    """Frees what a test file built (models, compiled loops, Keras' global state) when it
    ends: a worker runs many files, and their leftovers add up (two workers of one CI run
    grew past 10 GB each until the kernel killed one)."""
    yield
    # The file's objects first, then Keras' state (`clear_session()` collects only after it resets
    # TensorFlow's graph and kernel cache): two `make test` runs had file teardowns of 20-55 s
    # with `clear_session()` alone; the run in this order had none over 5 s.
    gc.collect()
    keras.backend.clear_session(free_memory=False)
    gc.collect()
    # What survives is the worker's for good (modules, TensorFlow's registries): out of every
    # later collection's sweep. A full collection walks every tracked object; in one worker
    # that had run eight files, two of them (py-spy: inside `gc_collect_main`) took 32-34 s.
    gc.freeze()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def small_config(tmp_path):
    """A tiny ALGPT2 config (with an SOP head) as a JSON file, for `algpt2 train --config`."""
    config = ALGPT2Config(max_positions=64, hidden_size=32, num_layers=2, num_heads=2,
                          intermediate_size=64, embedding_size=16, sop_head=True,
                          embedding_dropout=0.0, attention_dropout=0.0, residual_dropout=0.0)
    path = tmp_path / "config.json"
    config.to_json_file(path)
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    """A glob of twelve small text files (Python's own documentation topics)."""
    from pydoc_data import topics

    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in sorted(topics.topics)[:12]:
        (folder / f"{name}.txt").write_text(topics.topics[name], encoding="utf-8")
    return str(folder / "*.txt")


def shared_file(*parts):
    """Path under ../shared/data, or skip the test when it is absent."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is not available")
    return path


def crash_after_checkpoint_then_rerun(run, out, monkeypatch, step=4):
    """The in-process twin of `kill_at_first_checkpoint_then_rerun`: calls `run()` (a
    `train(...)` writing to `out`) with a crash right after its checkpoint of `step`, checks
    that it raised and left no final model, then calls `run()` again and returns its result."""
    from algpt2_tf.training.trainer import CheckpointManager

    save = CheckpointManager.save

    def crash_after_step(self, at, model, optimizer):
        written = save(self, at, model, optimizer)
        if at == step:
            raise RuntimeError("the machine went away")
        return written

    monkeypatch.setattr(CheckpointManager, "save", crash_after_step)
    with pytest.raises(RuntimeError, match="went away"):
        run()
    monkeypatch.setattr(CheckpointManager, "save", save)
    assert not os.path.exists(os.path.join(str(out), "model.keras"))
    return run()


def kill_at_first_checkpoint_then_rerun(cmd, run_dir, checkpoint="ckpt-00000004.npz", timeout=180,
                                       env=None):
    """Starts the `algpt2 train` command `cmd`, `kill -9`s it as soon as
    `run_dir/checkpoints/checkpoint` exists, reruns it to the end and returns
    that rerun's `CompletedProcess` (the resume tests compare its model)."""
    import signal
    import subprocess
    import time

    env = env or os.environ.copy()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    first = os.path.join(str(run_dir), "checkpoints", checkpoint)
    while not os.path.exists(first):
        assert proc.poll() is None and time.time() < deadline, f"training ended before {checkpoint}"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(str(run_dir), "model.keras")), \
        "the run finished before the kill"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done
