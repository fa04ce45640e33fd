import json
import os
import subprocess
import sys

import pytest

from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel
from algpt2_tf.cli import main


def test_info_table_and_preset(capsys):
    assert main(["info"]) == 0
    table = capsys.readouterr().out
    assert "| algpt2 | 768 | 12 | 12 | 128 | 1 | 13,852,418 |" in table
    assert "| gpt2 | 768 | 12 | 12 | - | 12 | 124,439,808 |" in table
    assert main(["info", "--preset", "algpt2-xl"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == ALGPT2Config.from_preset("algpt2-xl").num_parameters()
    assert main(["info", "--preset", "nope"]) == 2
    assert "Unknown preset" in capsys.readouterr().err


def user_env(**extra):
    """The environment of a user who set no TensorFlow log level."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(extra)
    return env


def test_console_script_is_installed():
    done = subprocess.run(["algpt2", "info", "--preset", "gpt2-tiny"], capture_output=True,
                          text=True, env=user_env())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["config"]["embedding_size"] is None
    assert done.stderr == ""


@pytest.mark.parametrize("args", [["--help"], ["info"], ["train", "--help"]])
def test_help_and_info_import_no_tensorflow(args):
    code = ("import sys; sys.argv = ['algpt2'] + %r; import algpt2_command\n"
            "try:\n    algpt2_command.main()\nexcept SystemExit:\n    pass\n"
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)" % args)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=user_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "False False"
    assert done.stderr == ""


def test_generate_streams_and_reads_stdin(tmp_path, capsys, monkeypatch):
    """The command line in this process (the console script's runs, fresh processes as a user
    runs them: the compiled-programs test below)."""
    import io

    model = ALGPT2LMHeadModel(ALGPT2Config(max_positions=64, hidden_size=32, num_layers=2,
                                           num_heads=2, intermediate_size=64, embedding_size=16))
    path = str(tmp_path / "m.keras")
    model.save(path)
    expected = model.generate("Once upon a time", max_new_tokens=8, sampler="greedy").text[0]
    args = ["generate", "--model", path, "--max-new-tokens", "8", "--sampler", "greedy"]
    monkeypatch.setenv("ALGPT2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Once upon a time")))
    assert main(args + ["--prompt", "-"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    sampled = []
    for _ in range(2):
        assert main(args[:-2] + ["--sampler", "top_p", "--top-p", "0.9", "--temperature", "0.8",
                                 "--seed", "4", "--prompt", "Hi"]) == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1] and sampled[0].startswith("Hi")
    assert main(args[:-2] + ["--sampler", "beam", "--prompt", "x"]) == 2
    assert "sampler" in capsys.readouterr().err
    assert main(args[:-4] + ["--max-new-tokens", "500", "--prompt", "x"]) == 2
    assert "max_positions" in capsys.readouterr().err


def test_generate_keeps_its_compiled_programs_and_compiles_a_damaged_one_again(tmp_path):
    """`algpt2 generate` (the console script, as a user runs it: the greedy text of the
    library, no TensorFlow start-up lines) keeps XLA's compiled programs in
    `$ALGPT2_CACHE/xla` (a manifest of their digests); the next process reads them (no entry
    rewritten); a damaged entry is removed and compiled again, never read (TensorFlow would
    fail on it)."""
    import glob

    from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel

    model = ALGPT2LMHeadModel(ALGPT2Config(max_positions=64, hidden_size=32, num_layers=2,
                                           num_heads=2, intermediate_size=64, embedding_size=16))
    path = str(tmp_path / "m.keras")
    model.save(path)
    env = user_env(ALGPT2_CACHE=str(tmp_path / "cache"))
    env.pop("TF_XLA_FLAGS", None)  # the tests' own processes keep no cache
    folder = tmp_path / "cache" / "xla"

    def generate():
        done = subprocess.run(["algpt2", "generate", "--model", path, "--engine", "xla",
                               "--prompt", "Once upon a time", "--max-new-tokens", "6",
                               "--sampler", "greedy"], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stderr == "algpt2 generate: engine xla\n"
        return done.stdout

    def entries():
        manifest = json.loads((folder / "manifest.json").read_text())
        files = {os.path.basename(p): os.stat(p).st_mtime_ns
                 for p in glob.glob(str(folder / "xla_compile_cache__*.pb"))}
        assert files and set(files) == set(manifest)
        return files

    text = generate()
    assert text == model.generate("Once upon a time", max_new_tokens=6,
                                  sampler="greedy").text[0] + "\n"
    first = entries()
    assert len(first) > 1
    damaged = sorted(first)[0]
    with open(folder / damaged, "r+b") as f:
        f.truncate(10)
    # One process more (not two: each is a TensorFlow start-up): the entries it did not find
    # damaged are read, not compiled again (not rewritten); the damaged one is compiled again.
    assert generate() == text
    again = entries()
    assert {name: when for name, when in again.items() if name != damaged} == {
        name: when for name, when in first.items() if name != damaged}
    assert damaged in again and again[damaged] != first[damaged]
    assert os.path.getsize(folder / damaged) > 10


def test_the_compiled_program_cache_keeps_its_newest_entries_under_its_bound(tmp_path):
    """`xla_cache.record` drops the least recently written entries past `max_bytes` (from the
    folder and the manifest), so `prepare`'s hashing at each start stays bounded; what it keeps
    still checks out."""
    from algpt2_tf.runtime import xla_cache

    for i in range(4):
        path = tmp_path / f"xla_compile_cache__{i}__1__XLA_CPU_JIT.pb"
        path.write_bytes(bytes([i]) * 100)
        os.utime(path, ns=(10**18 + i, 10**18 + i))  # entry 0 the oldest
    assert xla_cache.record(str(tmp_path), max_bytes=250) == 2
    kept = sorted(p.name for p in tmp_path.glob("xla_compile_cache__*.pb"))
    assert kept == [f"xla_compile_cache__{i}__1__XLA_CPU_JIT.pb" for i in (2, 3)]
    assert sorted(json.loads((tmp_path / "manifest.json").read_text())) == kept
    assert xla_cache.prepare(str(tmp_path)) == 2


@pytest.mark.slow
def test_main_job_trains_on_the_default_corpus(tmp_path):
    """The README's main job, shortened: no data argument, the built-in corpus."""
    env = user_env(ALGPT2_CACHE=str(tmp_path / "cache"))
    done = subprocess.run(["algpt2", "train", "--preset", "algpt2-tiny",
                           "--out", str(tmp_path / "demo"), "--steps", "60", "--warmup-steps", "10",
                           "--checkpoint-every", "30", "--verbose", "0"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"Model written to {tmp_path / 'demo' / 'model.keras'}" in done.stdout
    # A user sees what matters: no TensorFlow start-up lines, no cuInit error, no Keras warning.
    assert done.stderr == "", done.stderr
    import csv
    rows = list(csv.DictReader(open(tmp_path / "demo" / "metrics.csv")))
    assert float(rows[-1]["lm_loss"]) < float(rows[0]["lm_loss"]) - 1.0
