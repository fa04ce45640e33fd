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


def test_console_script_is_installed():
    done = subprocess.run(["algpt2", "info", "--preset", "gpt2-tiny"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["config"]["embedding_size"] is None


def test_generate_streams_and_reads_stdin(tmp_path):
    model = ALGPT2LMHeadModel(ALGPT2Config(max_positions=64, hidden_size=32, num_layers=2,
                                           num_heads=2, intermediate_size=64, embedding_size=16))
    path = str(tmp_path / "m.keras")
    model.save(path)
    expected = model.generate("Once upon a time", max_new_tokens=8, sampler="greedy").text[0]
    args = [sys.executable, "-m", "algpt2_tf.cli", "generate", "--model", path,
            "--max-new-tokens", "8", "--sampler", "greedy"]
    done = subprocess.run(args + ["--prompt", "Once upon a time"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == expected + "\n"
    piped = subprocess.run(args + ["--prompt", "-"], input="Once upon a time", capture_output=True,
                           text=True)
    assert piped.stdout == expected + "\n"
    sampled = [subprocess.run(args[:-2] + ["--sampler", "top_p", "--top-p", "0.9", "--temperature",
                                           "0.8", "--seed", "4", "--prompt", "Hi"],
                              capture_output=True, text=True).stdout for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0].startswith("Hi")
    bad = subprocess.run(args[:-2] + ["--sampler", "beam", "--prompt", "x"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "sampler" in bad.stderr
    long = subprocess.run(args[:-4] + ["--max-new-tokens", "500", "--prompt", "x"],
                          capture_output=True, text=True)
    assert long.returncode == 2 and "max_positions" in long.stderr


@pytest.mark.slow
def test_main_job_trains_on_the_default_corpus(tmp_path):
    """The README's main job, shortened: no data argument, the built-in corpus."""
    env = dict(os.environ, ALGPT2_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-m", "algpt2_tf.cli", "train", "--preset", "algpt2-tiny",
                           "--out", str(tmp_path / "demo"), "--steps", "60", "--warmup-steps", "10",
                           "--checkpoint-every", "30", "--verbose", "0"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"Model written to {tmp_path / 'demo' / 'model.keras'}" in done.stdout
    import csv
    rows = list(csv.DictReader(open(tmp_path / "demo" / "metrics.csv")))
    assert float(rows[-1]["lm_loss"]) < float(rows[0]["lm_loss"]) - 1.0


@pytest.mark.slow
def test_benchmark_harness_quick(tmp_path):
    """`make bench-quick`: every case runs once on tiny shapes (no speed assertions)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "quick"
    done = subprocess.run([sys.executable, os.path.join(repo, "benchmarks", "bench.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "quick.json").read_text())
    cases = {row["case"] for row in report["rows"]}
    assert cases == {"train", "forward", "decode", "tflite_decode"}
    assert all(row["tokens_per_s"] > 0 for row in report["rows"])
    assert report["matmul_peak_flops"] > 0
    assert "| train |" in (tmp_path / "quick.md").read_text()


@pytest.mark.slow
def test_gemv_working_set_quick(tmp_path):
    """`benchmarks/gemv_working_set.py --quick` times its two cases and writes JSON and a table."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "gemv"
    done = subprocess.run([sys.executable, os.path.join(repo, "benchmarks", "gemv_working_set.py"),
                           "--quick", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "gemv.json").read_text())
    assert [(r["matrices"], r["threads"]) for r in rows] == [(1, 0), (1, 1)]
    assert all(r["gb_per_s"] > 0 and r["us_per_product"] > 0 for r in rows)
    assert "| 1 | 9.4 | 1 |" in (tmp_path / "gemv.md").read_text()


def test_benchmark_gpu_variant_plan_and_guard():
    """`bench.py --gpu` plans only bf16 training, GPU-sized, and refuses to start without a GPU."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(repo, "benchmarks"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    cases = bench.plan(quick=False, gpu=True)
    assert list(cases) == ["train"]
    assert {(c["precision"], c["batch"], c["seq_len"]) for c in cases["train"]} == {("bf16", 32, 512)}
    assert {c["model"] for c in cases["train"]} == {"algpt2", "gpt2", "peer"}
    if not bench.gpu_visible():  # CI has no GPU: a clear error, exit code 2
        done = subprocess.run([sys.executable, os.path.join(repo, "benchmarks", "bench.py"), "--gpu"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        assert "sees no GPU" in done.stderr
