"""The benchmark scripts' quick modes (the figures themselves come from full runs, see benchmarks/)."""

import json
import os
import subprocess
import sys

import pytest

from algpt2_tf.cpu_info import cpu_info, cpu_summary


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
    backends = {(r["what"], r["backend"]) for r in report["backend_rows"]}
    assert backends == {(w, b) for w in ("forward", "decode")  # (--quick: no train case)
                        for b in ("tensorflow", "torch", "jax")}
    assert all(r["tokens_per_s"] > 0 for r in report["backend_rows"])
    table = (tmp_path / "quick.md").read_text()
    assert "| train |" in table and "| algpt2-tiny | decode | jax |" in table
    assert report["cpu"]["vendor"] == cpu_info()["vendor"]  # every results file names its CPU
    assert table.startswith(f"CPU: {cpu_summary(cpu_info())}")


@pytest.mark.slow
def test_gemv_working_set_quick(tmp_path):
    """`benchmarks/gemv_working_set.py --quick` times its two cases and writes JSON and a table."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "gemv"
    done = subprocess.run([sys.executable, os.path.join(repo, "benchmarks", "gemv_working_set.py"),
                           "--quick", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gemv.json").read_text())
    rows = report["rows"]
    assert report["cpu"] == cpu_info()
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


@pytest.mark.slow
def test_decode_tricks_quick(tmp_path):
    """`benchmarks/decode_tricks.py --quick`: every switch off in turn, plus keras-hub, once."""
    from algpt2_tf.decode_tricks import DecodeTricks

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "tricks"
    done = subprocess.run([sys.executable, os.path.join(repo, "benchmarks", "decode_tricks.py"),
                           "--quick", "--models", "algpt2", "--batches", "1", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "tricks.json").read_text())
    variants = [row["variant"] for row in report["rows"]]
    assert variants == (["keras-hub", "all on"] + [f"no {n}" for n in DecodeTricks.names()]
                        + ["all off"])
    assert all(row["tokens_per_s"] > 0 for row in report["rows"])
    assert all(row["gain"] > 0 for row in report["rows"][2:])
    assert report["cpu"] == cpu_info()
    assert (tmp_path / "tricks.md").read_text().startswith(f"CPU: {cpu_summary(cpu_info())}")
