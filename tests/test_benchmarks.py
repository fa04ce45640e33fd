"""The benchmark scripts' quick modes (the figures themselves come from full runs, see benchmarks/)."""

import importlib
import json
import os
import subprocess
import sys

import pytest

from algpt2_tf.runtime.cpu_info import cpu_info, cpu_summary

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def benchmark_script(name):
    """The module of `benchmarks/<name>.py` (the scripts import one another by plain name)."""
    sys.path.insert(0, BENCHMARKS)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(BENCHMARKS)


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


def names_a_cpu(report):
    """Every results file names the CPU it ran on (a vendor and a family, from /proc/cpuinfo)."""
    cpu = report["cpu"]
    return bool(cpu["vendor"]) and isinstance(cpu["family"], int) and cpu["logical_cpus"] >= 1


def run_quick(script, tmp_path):
    """Runs `benchmarks/<script> --quick`; returns its JSON report and markdown table."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(repo, "benchmarks", script), "--quick",
                           "--out", str(tmp_path / "quick")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "quick.json").read_text())
    assert names_a_cpu(report)
    return report, (tmp_path / "quick.md").read_text()


@pytest.mark.slow
def test_gemv_working_set_quick(tmp_path):
    """`benchmarks/gemv_working_set.py --quick` times its two cases and writes JSON and a table."""
    report, table = run_quick("gemv_working_set.py", tmp_path)
    rows = report["rows"]
    assert [(r["matrices"], r["threads"]) for r in rows] == [(1, 0), (1, 1)]
    assert all(r["gb_per_s"] > 0 and r["us_per_product"] > 0 for r in rows)
    assert "| 1 | 9.4 | 1 |" in table


@pytest.mark.slow
def test_int8_gemv_quick(tmp_path):
    """`benchmarks/int8_gemv.py --quick` times float32 and int8 x int8 block steps, writes JSON and a table."""
    report, table = run_quick("int8_gemv.py", tmp_path)
    rows = report["rows"]
    assert [r["name"] for r in rows] == ["float32", "int8 x int8 m=1"]
    assert all(r["us_per_step"] > 0 for r in rows)
    assert rows[0]["speed_vs_float32"] == 1.0
    assert "| int8 x int8 m=1 |" in table


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
    picked = bench.select(bench.plan(quick=False, gpu=False), "fp32 .* xla|fused")
    assert [bench.label(c) for c in picked["train"]] == [
        f"{m} precision={p} batch=4 {v}" for p, v in (("fp32", "xla"), ("bf16", "fused"))
        for m in ("algpt2", "gpt2", "peer")]
    assert list(picked) == ["train", "forward"]  # forward's xla variants match too
    if not bench.gpu_visible():  # CI has no GPU: a clear error, exit code 2
        done = subprocess.run([sys.executable, os.path.join(repo, "benchmarks", "bench.py"), "--gpu"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        assert "sees no GPU" in done.stderr


@pytest.mark.slow
def test_decode_tricks_quick(tmp_path):
    """`benchmarks/decode_tricks.py --quick`: every switch off in turn, plus keras-hub, once."""
    from algpt2_tf.generation.decode_tricks import DecodeTricks

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
    assert names_a_cpu(report)
    assert (tmp_path / "tricks.md").read_text().startswith(f"CPU: {cpu_summary(cpu_info())}")


@pytest.mark.slow
def test_decode_profile_quick(tmp_path):
    """`benchmarks/decode_profile.py --quick`: a tiny model's greedy decode, by kind of work;
    the weight bytes its linear products read per token are the model's own."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(repo, "benchmarks", "decode_profile.py"),
                           "--quick", "--new-tokens", "32", "--out", str(tmp_path / "profile")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "profile.json").read_text())
    rows = {r["kind"]: r for r in report["rows"]}
    assert list(rows) == ["linear products", "attention products", "softmax head", "reductions",
                          "other", "outside thunks"]
    assert all(rows[k]["ms_per_token"] > 0 for k in ("linear products", "attention products",
                                                     "softmax head", "reductions")), report
    assert abs(sum(r["share"] for r in rows.values()) - 1) < 1e-9
    # 2 layers of the shared block (12 h^2 weights each, h = 64), the embedding's
    # projections in and out (2 x 128 x 64), float32; the prompt's pass adds a little.
    expected_mb = (2 * 12 * 64 * 64 + 2 * 128 * 64) * 4 / 1e6
    assert expected_mb <= report["linear_weight_mb_per_token"] <= 1.1 * expected_mb
    assert names_a_cpu(report)
    assert "| softmax head |" in (tmp_path / "profile.md").read_text()


@pytest.mark.slow
def test_distributed_scaling_quick(tmp_path):
    """`benchmarks/distributed_scaling.py --quick`: 1 and 2 JAX processes of each preset, once."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(repo, "benchmarks",
                                                        "distributed_scaling.py"),
                           "--quick", "--presets", "algpt2", "--out", str(tmp_path / "scaling")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "scaling.json").read_text())
    (row,) = report["rows"]
    assert row["preset"] == "algpt2" and row["one"] > 0 and row["two"] > 0
    assert 0 < row["efficiency"] < 2.5  # two processes on two cores: at most about twice one
    from algpt2_tf.config import ALGPT2Config

    # --quick trains the preset at tiny shapes (hidden 64, 2 layers, 512 ids): every weight.
    tiny = ALGPT2Config.from_dict({**ALGPT2Config.from_preset("algpt2").to_dict(),
                                   "hidden_size": 64, "num_heads": 2, "intermediate_size": 128,
                                   "num_layers": 2, "num_layer_groups": 1, "vocab_size": 512})
    assert row["trainable_parameters"] == tiny.num_parameters()
    assert names_a_cpu(report)
    assert (tmp_path / "scaling.md").read_text().startswith(f"CPU: {cpu_summary(cpu_info())}")


def test_xl_estimate_follows_from_the_configs(tmp_path):
    """`benchmarks/xl_estimate.py`: exact parameter counts, gradient bytes = params x 4, ring
    all-reduce volume, and GPT-2 xl's 41x larger all-reduce than ALGPT2-xl's."""
    from algpt2_tf.config import ALGPT2Config

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(repo, "benchmarks", "xl_estimate.py"),
                           "--out", str(tmp_path / "xl")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {(r["preset"], r["devices"]): r
            for r in json.loads((tmp_path / "xl.json").read_text())["rows"]}
    for (preset, devices), row in rows.items():
        params = ALGPT2Config.from_preset(preset).num_parameters()
        assert row["parameters"] == params
        assert row["gradient_gb"] == params * 4 / 1e9
        assert abs(row["all_reduce_sent_gb"] - 2 * (devices - 1) / devices * params * 4 / 1e9) < 1e-9
        assert row["weights_and_adam_gb"] == params * 16 / 1e9
    ratio = rows[("gpt2-xl", 64)]["gradient_gb"] / rows[("algpt2-xl", 64)]["gradient_gb"]
    assert 40 < ratio < 42
    assert rows[("algpt2-xl", 64)]["comm_share"] < rows[("gpt2-xl", 64)]["comm_share"]


@pytest.mark.slow
def test_cold_start_quick(tmp_path):
    """One round of the cold-start benchmark: every case runs, the cached LiteRT engine is
    the one `--engine auto` takes, and the table and JSON hold each case."""
    out = tmp_path / "cold"
    done = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "cold_start.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "cold.json").read_text())
    assert set(report["cases"]) == {"litert first", "xla", "xla second", "litert cached",
                                    "serve first start", "serve second start",
                                    "serve litert cached"}
    for name, case in report["cases"].items():
        assert len(case["wall_s"]) == 1 and case["median_wall_s"] > 0
        assert name.startswith("serve") or case["peak_rss_mb"] > 0
    assert "| litert cached |" in (tmp_path / "cold.md").read_text()


@pytest.mark.slow
def test_peers_quick(tmp_path):
    """One round of the peers benchmark on tiny shapes: every engine decodes (CTranslate2 on
    the HF export too), and the table gives each case with its ratio to the fastest peer."""
    out = tmp_path / "peers"
    done = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "peers.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "peers.json").read_text())
    engines = {label.split(" | ")[1] for label in report["cases"]}
    assert {"ours Keras/XLA float32", "ours Keras int8", "ours LiteRT float32", "ours LiteRT int8",
            "ours LiteRT int4", "CTranslate2 int8 (HF export)", "CTranslate2 float32 (HF export)",
            "ONNX Runtime int8 (HF export)", "ONNX Runtime float32 (HF export)",
            "ONNX Runtime int4 (HF export)",
            "keras-hub GPT-2"} <= engines
    for case in report["cases"].values():
        assert len(case["tokens_per_s"]) == 1 and case["median"] > 0
    table = (tmp_path / "peers.md").read_text()
    assert "| algpt2 b1 | CTranslate2 int8 (HF export) |" in table
    assert "| gpt2 b1 | ONNX Runtime int8 (HF export) |" in table


def test_peers_plan_and_table():
    """The fast twin of the peers' quick run: the plan holds every engine at both batch sizes
    (LiteRT builds of each batch too, keras-hub on `gpt2` only), and the table gives each case's ratio to
    the fastest peer of its model and batch, ours never counted as a peer."""
    peers = benchmark_script("peers")
    full = dict(peers.plan(quick=False))
    for group in ("algpt2 b1", "algpt2 b8", "gpt2 b1", "gpt2 b8"):
        engines = {label.split(" | ")[1] for label in full if label.startswith(group + " |")}
        assert {"ours Keras/XLA float32", "ours Keras int8", "CTranslate2 int8 (HF export)",
                "ONNX Runtime int8 (HF export)", "ONNX Runtime float32 (HF export)",
                "ONNX Runtime int4 (HF export)"} <= engines
        assert {"ours LiteRT int8", "ours LiteRT float32", "ours LiteRT int4"} <= engines
        assert full[f"{group} | ours LiteRT int8"]["max_length"] == 256  # the engine's cache
        assert ("keras-hub GPT-2" in engines) == group.startswith("gpt2")
    assert all(case["prompt"] == 16 and case["new_tokens"] == 128 for case in full.values())
    batches = {case["batch"] for case in dict(peers.plan(False, batches=(1, 2, 4))).values()}
    assert batches == {1, 2, 4}  # --batches
    quick = dict(peers.plan(quick=True))
    assert {case["batch"] for case in quick.values()} == {1} and "gpt2 b1 | ours LiteRT int8" in quick
    rows = {"gpt2 b1 | ours Keras/XLA float32": 90.0, "gpt2 b1 | ONNX Runtime int8 (HF export)": 200.0,
            "gpt2 b1 | CTranslate2 int8 (HF export)": 100.0, "algpt2 b1 | ours LiteRT int8": 400.0,
            "algpt2 b1 | CTranslate2 int8 (HF export)": 160.0}
    rows = {label: {"median": v, "tokens_per_s": [v], "peak_rss_mb": 100} for label, v in rows.items()}
    report = {"prompt_tokens": 16, "new_tokens": 128, "rounds": 1, "quick": False,
              "cpu": cpu_info(), "load_average_before": (0, 0, 0), "load_average_after": (1, 1, 1),
              "skipped": ["x is not installed"]}
    table = peers.markdown(rows, report)
    assert "| gpt2 b1 | ours Keras/XLA float32 | 90.0 | 90.0 | 0.45 | 100 |" in table
    assert "| gpt2 b1 | ONNX Runtime int8 (HF export) | 200.0 | 200.0 | 1.00 |" in table
    assert "| algpt2 b1 | ours LiteRT int8 | 400.0 | 400.0 | 2.50 |" in table
    assert table.rstrip().endswith("- x is not installed")


@pytest.mark.slow  # 36-50 s, most of it importing torch and transformers
def test_peers_onnx_step_decodes_as_the_hf_model(tmp_path):
    """The ONNX Runtime peer's model is the HF export's: from an empty cache (the prefill) and
    then one token at a time with the cache fed back, its last-position logits equal the HF
    model's on the whole sequence, batch 2; with its `Gemm`s written as `MatMul` + `Add` (what
    the int4 case quantizes), the same logits."""
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import GPT2LMHeadModel

    peers = benchmark_script("peers")
    path = peers.onnx_file("algpt2", "float32", True, str(tmp_path))
    lm = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf-algpt2")).eval()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    past = [i for i in session.get_inputs() if i.name.startswith("past_")]
    feed = {i.name: np.zeros((2, past[0].shape[1], 0, past[0].shape[3]), np.float32)
            for i in past}
    sequence = np.random.default_rng(1).integers(0, lm.config.vocab_size, (2, 6))
    step_ids = sequence
    for _ in range(4):
        logits, *present = session.run(None, {"input_ids": step_ids.astype(np.int64), **feed})
        with torch.no_grad():
            expected = lm(torch.tensor(sequence)).logits[:, -1].numpy()
        np.testing.assert_allclose(logits, expected, atol=1e-4)
        step_ids = logits.argmax(-1)[:, None]
        sequence = np.concatenate([sequence, step_ids], axis=1)
        feed = dict(zip(feed, present))
    rewritten = peers.gemm_as_matmul(path)
    assert not [n for n in rewritten.graph.node if n.op_type == "Gemm"]
    matmul = ort.InferenceSession(rewritten.SerializeToString(),
                                  providers=["CPUExecutionProvider"])
    prompt = {"input_ids": sequence.astype(np.int64),
              **{i.name: np.zeros((2, past[0].shape[1], 0, past[0].shape[3]), np.float32)
                 for i in past}}
    np.testing.assert_allclose(matmul.run(None, prompt)[0], session.run(None, prompt)[0],
                               atol=1e-4)


def test_cold_start_measures_a_preset_as_a_saved_fresh_model(tmp_path):
    """`cold_start.py --preset NAME` saves a seeded fresh model of the preset (in a child
    process) that `algpt2` commands load: the same weights every time."""
    cold_start = benchmark_script("cold_start")
    import numpy as np

    from algpt2_tf import ALGPT2Config
    from algpt2_tf.causal_lm import ALGPT2LMHeadModel
    from algpt2_tf.saving import load_model

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = load_model(cold_start.saved_preset("algpt2-tiny", str(tmp_path / "a")), ALGPT2LMHeadModel)
    second = load_model(cold_start.saved_preset("algpt2-tiny", str(tmp_path / "b")), ALGPT2LMHeadModel)
    assert first.config.to_dict() == ALGPT2Config.from_preset("algpt2-tiny").to_dict()
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_compare_revisions_table_and_guard(tmp_path):
    """`compare_revisions.py`: medians per checkout and after / before for the cases both
    measured every round; a path that is no checkout is refused before anything runs."""
    compare_revisions = benchmark_script("compare_revisions")
    runs = {"before": [{"decode: a": 10.0, "only before": 1.0}, {"decode: a": 30.0},
                       {"decode: a": 20.0}],
            "after": [{"decode: a": 22.0}, {"decode: a": 18.0}, {"decode: a": 40.0}]}
    rows = compare_revisions.summarize(runs)
    assert [r["case"] for r in rows] == ["decode: a"]
    assert rows[0]["before_median"] == 20.0 and rows[0]["after_median"] == 22.0
    assert abs(rows[0]["ratio"] - 1.1) < 1e-9
    assert "| decode: a | 20.0 (10.0, 30.0, 20.0) | 22.0 (22.0, 18.0, 40.0) | 1.100x |" in \
        compare_revisions.markdown(rows)
    done = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "compare_revisions.py"),
                           str(tmp_path), os.path.dirname(BENCHMARKS)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no benchmarks/bench.py there" in done.stderr


@pytest.mark.slow
def test_compare_revisions_quick(tmp_path):
    """One round of this checkout against itself: bench.py's tiny batch-1 decode and the
    served step of a tiny model, each measured in both, with the ratio."""
    repo = os.path.dirname(BENCHMARKS)
    out = tmp_path / "cmp"
    done = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "compare_revisions.py"),
                           repo, repo, "--rounds", "1", "--quick", "--only", "decode",
                           "--match", "^algpt2 batch=1$", "--serve-preset", "algpt2-tiny",
                           "--serve-tokens", "4", "--serve-requests", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "cmp.json").read_text())
    cases = {r["case"]: r for r in report["rows"]}
    assert set(cases) == {"decode: algpt2 batch=1", compare_revisions_served()}
    for row in cases.values():
        assert row["before_median"] > 0 and row["after_median"] > 0 and row["ratio"] > 0
    assert "after / before" in (tmp_path / "cmp.md").read_text()


def compare_revisions_served():
    return benchmark_script("compare_revisions").SERVED


@pytest.mark.slow
def test_serve_load_openai_with_litert_quick(tmp_path):
    """`serve_load.py --openai --litert` on a tiny model: the xla engine batched and not, and
    the LiteRT engine, each answering every streamed request, with the ratios."""
    out = tmp_path / "serve.json"
    done = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "serve_load.py"), "--openai",
                           "--litert", "--preset", "algpt2-tiny", "--clients", "1",
                           "--requests", "2", "--max-new-tokens", "4", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    for mode in ("unbatched", "batched", "litert"):
        assert report[mode]["requests"] == 2 and report[mode]["errors"] == 0
        assert report[mode]["tokens_per_s"] > 0
    assert report["litert_vs_unbatched_tokens_per_s"] > 0
    assert "| litert |" in done.stdout
