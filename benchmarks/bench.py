#!/usr/bin/env python3
"""Side-by-side benchmarks of algpt2-tf and keras-hub's GPT-2 (the peer), measured in one run.

Every measurement runs in its own subprocess (so peak RSS is per case), the
variants of a case alternate, and each figure is the median of `--repeats`
runs. Ratios compare against the peer measured in the same run.

`--quick` is a smoke test of every case's code, not a measurement: tiny shapes,
one run each, and the cases that need the same process settings (Keras
backend, float32 or bf16) share one process, so that its figures and peak RSS
are not per case.

    python benchmarks/bench.py              # full suite (CPU; tens of minutes on 2 cores)
    python benchmarks/bench.py --quick      # CI smoke: tiny shapes, one run each
    python benchmarks/bench.py --gpu        # the training case on a GPU, bf16, larger batch
    python benchmarks/bench.py --only train --match "fp32 .* xla|fused"  # some variants

Writes benchmarks/results/latest.json and latest.md (or --out PREFIX).
"""

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

GPT2_124M = dict(vocab_size=50257, hidden=768, layers=12, heads=12, positions=1024)
TINY = dict(vocab_size=50257, hidden=64, layers=2, heads=2, positions=128)


# ------------------------------------------------------------------ workers
def _our_model(preset, shape, quick):
    """The preset with dropout off; with `quick`, resized to `shape`."""
    from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel

    config = ALGPT2Config.from_preset(preset)
    overrides = dict(embedding_dropout=0.0, attention_dropout=0.0, residual_dropout=0.0)
    if quick:
        overrides.update(hidden_size=shape["hidden"], num_layers=shape["layers"],
                         num_heads=shape["heads"], intermediate_size=4 * shape["hidden"],
                         max_positions=shape["positions"],
                         num_layer_groups=1 if config.num_layer_groups == 1 else shape["layers"])
    values = config.to_dict()
    values.update(overrides)
    return ALGPT2LMHeadModel(ALGPT2Config.from_dict(values))


def _peer_model(shape):
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=shape["vocab_size"], num_layers=shape["layers"], num_heads=shape["heads"],
        hidden_dim=shape["hidden"], intermediate_dim=4 * shape["hidden"],
        max_sequence_length=shape["positions"], dropout=0.0)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def model_flops_per_token(model_kind, shape, seq_len, preset=None, quick=False):
    """Forward FLOPs per token: 2 x (weights applied per token) + attention scores."""
    if model_kind == "peer":
        h, layers, vocab, e = shape["hidden"], shape["layers"], shape["vocab_size"], shape["hidden"]
        factor = False
    else:
        from algpt2_tf import ALGPT2Config

        c = ALGPT2Config.from_preset(preset)
        h, layers, vocab = (shape["hidden"], shape["layers"], c.vocab_size) if quick else (
            c.hidden_size, c.num_layers, c.vocab_size)
        e = c.embedding_size or h
        factor = c.embedding_size is not None
    block = 12 * h * h  # qkv 3h^2 + out h^2 + mlp 8h^2
    attention = 2 * seq_len * h  # scores + weighted sum (causal average)
    head = e * vocab + (2 * h * e if factor else 0)
    return 2 * (layers * (block + attention) + head)


def worker_train(case):
    import keras
    import numpy as np
    import tensorflow as tf

    StepTimer = _step_timer_class()

    if case.get("fuse"):
        from algpt2_tf.runtime.xla_flags import enable_elementwise_fusion

        enable_elementwise_fusion()  # before the first graph is built
    if case["precision"] == "bf16":
        keras.config.set_dtype_policy("mixed_bfloat16")
    batch, seq = case["batch"], case["seq_len"]
    shape = TINY if case["quick"] else GPT2_124M
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50000, (batch * 4, seq)).astype("int32")
    if case["model"] == "peer":
        model = _peer_model(shape)
        model.compile(optimizer=keras.optimizers.AdamW(1e-4),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=case["xla"])
        x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
        ds = tf.data.Dataset.from_tensor_slices((x, ids[:, 1:])).batch(batch).repeat()
        tokens_per_step = batch * (seq - 1)
    else:
        model = _our_model(case["model"], shape, case["quick"])
        model.compile(optimizer=keras.optimizers.AdamW(1e-4), jit_compile=case["xla"])
        ds = tf.data.Dataset.from_tensor_slices(
            {"input_ids": ids, "attention_mask": np.ones_like(ids)}).batch(batch).repeat()
        tokens_per_step = batch * (seq - 1)
    steps = case["steps"]
    if case["forward_only"]:
        fn = tf.function(lambda x: model(x, training=False), jit_compile=case["xla"])
        batch_x = next(iter(ds))[0] if case["model"] == "peer" else next(iter(ds))
        fn(batch_x)
        start = time.perf_counter()
        for _ in range(steps):
            out = fn(batch_x)
        np.asarray(out["logits"] if isinstance(out, dict) else out).sum()
        elapsed = time.perf_counter() - start
        return {"tokens_per_s": steps * tokens_per_step / elapsed}
    # One fit call; the first step (tracing, compilation) is not timed, and each
    # later step is timed by a callback: fit()'s own set-up cost is excluded.
    timer = StepTimer()
    model.fit(ds, steps_per_epoch=steps + 1, epochs=1, verbose=0, callbacks=[timer])
    step_time = statistics.median(timer.times[1:])
    return {"tokens_per_s": tokens_per_step / step_time}


def _step_timer_class():
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self.start)

    return StepTimer


def worker_decode(case):
    import numpy as np

    batch, prompt, new = case["batch"], case["prompt"], case["new_tokens"]
    shape = TINY if case["quick"] else GPT2_124M
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, 50000, (batch, prompt)).astype("int32")
    if case["model"] == "peer":
        model = _peer_model(shape)
        model.compile(sampler="greedy")
        total = prompt + new
        token_ids = np.zeros((batch, total), "int32")
        token_ids[:, :prompt] = prompts
        mask = np.zeros_like(token_ids, dtype=bool)
        mask[:, :prompt] = True
        inputs = {"token_ids": token_ids, "padding_mask": mask}

        def run():
            model.generate(inputs, max_length=total, stop_token_ids=None)
    else:
        from algpt2_tf.generation.generator import Generator

        preset = case["model"].removesuffix("-int8")
        model = _our_model(preset, shape, case["quick"])
        if case["model"].endswith("-int8"):
            model.quantize("int8")  # Keras' own int8 (ALGPT2LMHeadModel.quantize)
        tricks = None
        if "tricks" in case:  # benchmarks/decode_tricks.py: switches as "name=0,..."
            from algpt2_tf.generation.decode_tricks import DecodeTricks

            tricks = DecodeTricks().with_switches(case["tricks"])
        generator = Generator(model, tricks=tricks)

        def run():
            generator.generate(prompts, max_new_tokens=new, stop_ids=())
    run()  # compile
    start = time.perf_counter()
    run()
    return {"tokens_per_s": batch * new / (time.perf_counter() - start)}


def worker_backend(case):
    """Forward, train or batch-1 decode of `case["preset"]` on the Keras backend
    `case["backend"]` (this process was started with KERAS_BACKEND set).

    Each backend runs its natural compiled path: forward through
    `backend.compiled_inference` (XLA on TensorFlow, `jax.jit`, PyTorch eager
    without gradients), `fit` with `jit_compile="auto"`, and generation's
    decode loop (TensorFlow's XLA loop; the host loop elsewhere, with
    `torch.compile` when `case["torch_compile"]`). `first_call_s` is the first
    call's time (compilation included); tokens/s is from a later call.
    """
    import keras
    import numpy as np

    from algpt2_tf.generation.generator import generator_for
    from algpt2_tf.generation.host_loop import HostLoopGenerator
    from algpt2_tf.runtime import backend

    assert backend.name() == case["backend"], (backend.name(), case["backend"])
    model = _our_model(case["preset"], None, False)
    rng = np.random.default_rng(0)
    if case["what"] == "decode":
        prompt, new = case["prompt"], case["new_tokens"]
        ids = rng.integers(0, 50000, (1, prompt)).astype("int32").tolist()
        generator = (HostLoopGenerator(model, torch_compile=True) if case.get("torch_compile")
                     else generator_for(model))
        start = time.perf_counter()
        first = generator.generate(ids, max_new_tokens=new, stop_ids=()).new_ids
        first_call = time.perf_counter() - start
        start = time.perf_counter()
        again = generator.generate(ids, max_new_tokens=new, stop_ids=()).new_ids
        elapsed = time.perf_counter() - start
        assert first == again
        return {"tokens_per_s": new / elapsed, "first_call_s": first_call,
                "tokens": first[0][:8]}
    batch, seq, steps = case["batch"], case["seq_len"], case["steps"]
    ids = rng.integers(0, 50000, (batch, seq)).astype("int32")
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if case["what"] == "forward":
        model({"input_ids": ids[:, :1]})  # the weights exist before the compiled function reads them
        forward = backend.compiled_inference(lambda x: model(x)["logits"], model.variables)
        start = time.perf_counter()
        keras.ops.convert_to_numpy(forward(inputs))
        first_call = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            out = forward(inputs)
        keras.ops.convert_to_numpy(out)
        return {"tokens_per_s": steps * batch * seq / (time.perf_counter() - start),
                "first_call_s": first_call}
    model.compile(optimizer=keras.optimizers.AdamW(1e-4))
    timer = _step_timer_class()()
    data = {k: np.tile(v, (steps + 1, 1)) for k, v in inputs.items()}
    model.fit(data, batch_size=batch, epochs=1, verbose=0, shuffle=False, callbacks=[timer])
    return {"tokens_per_s": batch * (seq - 1) / statistics.median(timer.times[1:]),
            "first_call_s": timer.times[0]}


def worker_tflite(case):
    """Converts (`worker_tflite_build`), then decodes in a child process (`worker_tflite_run`),
    so that the peak RSS reported is the interpreter's and not the converter's."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.tflite")
        worker_tflite_build(dict(case, path=path))
        return measure(dict(case, kind="tflite_run", path=path))


def worker_tflite_build(case):
    """Writes the TFLite export of the case's random-weight model to `case["path"]` (a cache
    of `max_length` slots, default prompt + new tokens)."""
    from algpt2_tf.export.tflite import convert

    shape = TINY if case["quick"] else GPT2_124M
    model = _our_model(case["model"], shape, case["quick"])
    with open(case["path"], "wb") as f:
        f.write(convert(model, case.get("max_length") or case["prompt"] + case["new_tokens"],
                        case["quantize"], batch=case.get("batch", 1)))
    return {"bytes": os.path.getsize(case["path"])}


def worker_tflite_run(case):
    """`runtime`: "interpreter" (ai_edge_litert's Interpreter) or "compiled"
    (LiteRT's CompiledModel with an XNNPACK weight cache, `LiteRTDecoder`)."""
    import tempfile

    import numpy as np

    prompt, new = case["prompt"], case["new_tokens"]
    rows = (case.get("batch", 1), prompt)
    ids = np.random.default_rng(0).integers(0, 50000, rows).astype("int32")
    # The decoders need no TensorFlow, and importing the package imports none: it does not
    # count in this process's peak RSS.
    from algpt2_tf.export.steps import InterpreterSteps

    if case.get("runtime") == "compiled":
        from algpt2_tf.export.litert import LiteRTDecoder

        decoder = LiteRTDecoder(case["path"], os.path.join(tempfile.mkdtemp(), "weights.cache"))
    else:
        from ai_edge_litert.interpreter import Interpreter

        decoder = InterpreterSteps(Interpreter(model_path=case["path"],
                                               num_threads=os.cpu_count()))
    # Warm-up: one whole run, as every other case (XLA, the peers) has; it was 2 tokens. After
    # those, `algpt2` int4 b1's first 128-token run was 822, 831, 797 tokens/s in three
    # processes, the five after it 675-892 (AMD EPYC Zen 4, 2026-12-06).
    decoder.greedy_rows(ids.tolist(), new)
    # Timed as the peers time theirs: the prefill and `new - 1` decode steps make `new` tokens.
    start = time.perf_counter()
    decoder.greedy_rows(ids.tolist(), new)
    assert "tensorflow" not in sys.modules
    return {"tokens_per_s": len(ids) * new / (time.perf_counter() - start)}


def worker_matmul_peak(case):
    import tensorflow as tf

    n = 512 if case["quick"] else 2048
    a = tf.random.normal([n, n])
    b = tf.random.normal([n, n])
    fn = tf.function(lambda: tf.matmul(a, b))
    fn()
    reps = 5 if case["quick"] else 20
    start = time.perf_counter()
    for _ in range(reps):
        out = fn()
    out.numpy()
    return {"flops_per_s": 2 * n ** 3 * reps / (time.perf_counter() - start)}


WORKERS = {"train": worker_train, "forward": worker_train, "decode": worker_decode,
           "backend": worker_backend,
           "tflite_decode": worker_tflite, "tflite_build": worker_tflite_build,
           "tflite_run": worker_tflite_run,
           "matmul_peak": worker_matmul_peak}


def peak_rss_mb():
    """This process's peak RSS. VmHWM starts afresh at exec; ru_maxrss would
    carry over the peak of the (forked) parent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(case):
    result = WORKERS[case["kind"]](case)
    result.setdefault("peak_rss_mb", peak_rss_mb())
    return result


# ------------------------------------------------------------------ parent
def measure(case):
    """Runs `case` in a fresh process; returns its result."""
    return measure_together([case])[0]


def measure_together(cases):
    """Runs `cases` one after another in one fresh process (they must share its
    settings: see `process_settings`); returns their results in order."""
    (settings,) = {process_settings(c) for c in cases}
    env = dict(os.environ)
    if settings[0] != "tensorflow":  # a Keras backend is chosen before Keras is imported
        env.update(KERAS_BACKEND=settings[0], JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cases)],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"cases {cases} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def process_settings(case):
    """What a case sets for its whole process: the Keras backend, bf16 (the dtype
    policy and the XLA fusion flags are global and set once) and, for decoding,
    the `wide_vectors` trick (an XLA flag, read at the first compile)."""
    bf16 = case.get("precision") == "bf16" or bool(case.get("fuse"))
    wide = True
    if "tricks" in case:
        from algpt2_tf.generation.decode_tricks import DecodeTricks

        wide = DecodeTricks().with_switches(case["tricks"]).wide_vectors
    return case.get("backend", "tensorflow"), bf16, wide


def measure_quick(cases):
    """`--quick`: every case of `cases` (kind -> variants) run once, the cases with
    the same `process_settings` in one process (a smoke test: start-up is most of a
    tiny case's time); returns a function from a case to its result."""
    groups = {}
    for case in (c for variants in cases.values() for c in variants):
        groups.setdefault(process_settings(case), []).append(case)
    results = {}
    for group in groups.values():
        for case, out in zip(group, measure_together(group)):
            results[json.dumps(case, sort_keys=True)] = out
    return lambda case: results[json.dumps(case, sort_keys=True)]


def plan(quick, gpu):
    seq, batch, steps = (32, 2, 2) if quick else (256, 4, 3)
    if gpu:
        seq, batch, steps = 512, 32, 10
    train = []
    for precision in ("fp32", "bf16"):
        variants = [(False, False), (True, False)]  # (xla, fuse)
        if precision == "bf16" and not gpu:  # XLA-fused element-wise ops around oneDNN matmuls
            variants.append((False, True))
        if quick and precision == "bf16":  # the smoke run: the bf16 code path once per model
            variants = variants[-1:]
        for model in ("algpt2", "gpt2", "peer"):
            for xla, fuse in variants:
                train.append(dict(kind="train", model=model, precision=precision, xla=xla,
                                  fuse=fuse, batch=batch, seq_len=seq, steps=steps,
                                  forward_only=False, quick=quick))
    if gpu:
        return {"train": [c for c in train if c["precision"] == "bf16"]}
    forward = [dict(kind="forward", model=m, precision="fp32", xla=x, batch=batch, seq_len=seq,
                    steps=steps, forward_only=True, quick=quick)
               for m in ("algpt2", "gpt2", "peer") for x in (False, True)]
    new = 8 if quick else 128
    decode = [dict(kind="decode", model=m, batch=b, prompt=16, new_tokens=new, quick=quick)
              for b in (1, 8) for m in ("algpt2", "algpt2-int8", "gpt2", "peer")
              if not (quick and m == "algpt2-int8" and b == 8)]
    tflite = [dict(kind="tflite_decode", model="algpt2", quantize=q, runtime=r, prompt=16,
                   new_tokens=new, quick=quick)
              for q in ("none", "int8") for r in ("interpreter", "compiled")
              if not quick or (q, r) in (("none", "interpreter"), ("int8", "compiled"))]
    backends = []
    for preset in ("algpt2-tiny",) if quick else ("algpt2-tiny", "algpt2"):
        for what in ("forward", "decode") if quick else ("forward", "train", "decode"):
            for name in ("tensorflow", "torch", "jax"):
                case = dict(kind="backend", backend=name, preset=preset, what=what, batch=batch,
                            seq_len=seq, steps=steps, prompt=16, new_tokens=new)
                backends.append(case)
                if what == "decode" and name == "torch" and not quick:  # compiles for minutes
                    backends.append(dict(case, torch_compile=True))
    return {"train": train, "forward": forward, "decode": decode, "tflite_decode": tflite,
            "backend": backends, "matmul_peak": [dict(kind="matmul_peak", quick=quick)]}


def select(cases, pattern):
    """The cases of `plan` whose `label` matches `pattern` (re.search); kinds left empty go."""
    chosen = {kind: [c for c in variants if re.search(pattern, label(c))]
              for kind, variants in cases.items()}
    return {kind: variants for kind, variants in chosen.items() if variants}


def label(case):
    if case["kind"] == "backend":
        compiled = " torch.compile" if case.get("torch_compile") else ""
        return f"{case['preset']} {case['what']} {case['backend']}{compiled}"
    parts = [case.get("model", "")]
    for key in ("precision", "batch", "quantize", "runtime"):
        if key in case:
            parts.append(f"{key}={case[key]}")
    if case.get("fuse"):
        parts.append("fused")
    elif "xla" in case:
        parts.append("xla" if case["xla"] else "no-xla")
    return " ".join(p for p in parts if p)


def summarize(results, peak_flops, quick):
    """Best-of-XLA per model/precision, ratios against the peer of the same group."""
    rows = []
    groups = {}
    for r in results:
        c = r["case"]
        if c["kind"] == "backend":
            continue  # backend_rows
        key = (c["kind"], c.get("precision"), c.get("batch"), c.get("quantize"), c.get("runtime"))
        groups.setdefault(key, []).append(r)
    batch1_peer = [r for r in results
                   if r["case"]["kind"] == "decode" and r["case"]["batch"] == 1
                   and r["case"]["model"] == "peer"]
    for key, items in groups.items():
        best = {}
        for r in items:
            m = r["case"].get("model")
            if m not in best or r["tokens_per_s"] > best[m]["tokens_per_s"]:
                best[m] = r
        peer = best.get("peer")
        if key[0] == "tflite_decode" and batch1_peer:  # against the Keras peer's batch-1 decode
            peer = batch1_peer[0]
        for m, r in sorted(best.items()):
            row = {"case": key[0], "label": label(r["case"]), "tokens_per_s": r["tokens_per_s"],
                   "peak_rss_mb": r["peak_rss_mb"],
                   "vs_peer": (r["tokens_per_s"] / peer["tokens_per_s"]) if peer else None}
            if key[0] in ("train", "forward") and peak_flops:
                shape = TINY if quick else GPT2_124M
                per_token = model_flops_per_token(m if m == "peer" else "ours", shape,
                                                  r["case"]["seq_len"], None if m == "peer" else m,
                                                  quick)
                factor = 3 if key[0] == "train" else 1
                row["mfu"] = per_token * factor * r["tokens_per_s"] / peak_flops
            rows.append(row)
    return rows


def backend_rows(results):
    """One row per (preset, what, backend): tokens/s, first call, ratio to TensorFlow."""
    backend = [r for r in results if r["case"]["kind"] == "backend"]
    reference = {(r["case"]["preset"], r["case"]["what"]): r["tokens_per_s"] for r in backend
                 if r["case"]["backend"] == "tensorflow"}
    return [{"preset": r["case"]["preset"], "what": r["case"]["what"],
             "backend": r["case"]["backend"] + (" torch.compile" if r["case"].get("torch_compile")
                                                else ""),
             "tokens_per_s": r["tokens_per_s"], "first_call_s": r["first_call_s"],
             "peak_rss_mb": r["peak_rss_mb"],
             "vs_tensorflow": r["tokens_per_s"] / reference[(r["case"]["preset"],
                                                             r["case"]["what"])]}
            for r in backend]


def backend_markdown(rows):
    lines = ["| model | case | backend | tokens/s | vs TensorFlow | first call s | peak RSS MB |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['what']} | {r['backend']} | {r['tokens_per_s']:.1f} | "
                     f"{r['vs_tensorflow']:.2f}x | {r['first_call_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def markdown(rows, peak_flops):
    lines = ["| case | variant (best of XLA on/off/fused) | tokens/s | vs keras-hub | peak RSS MB | MFU |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['vs_peer']:.2f}x" if r["vs_peer"] is not None else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        lines.append(f"| {r['case']} | {r['label']} | {r['tokens_per_s']:.1f} | {ratio} | "
                     f"{r['peak_rss_mb']:.0f} | {mfu} |")
    if peak_flops:  # not measured when --only leaves the matmul_peak case out
        lines.append("")
        lines.append(f"Measured matmul peak: {peak_flops / 1e9:.1f} GFLOP/s (float32).")
    return "\n".join(lines) + "\n"


def gpu_visible():
    """Whether TensorFlow sees a GPU (checked in a child, so the parent stays TF-free)."""
    probe = "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    lines = out.stdout.split()
    return out.returncode == 0 and bool(lines) and lines[-1].isdigit() and int(lines[-1]) > 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one run each (CI smoke)")
    parser.add_argument("--gpu", action="store_true", help="only the bf16 training case, GPU-sized")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", help="case kinds to run (train forward decode "
                        "tflite_decode backend matmul_peak)")
    parser.add_argument("--match", help="only the cases whose label (as printed, e.g. "
                        "'algpt2 precision=fp32 batch=4 xla') matches this regular expression")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "latest"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps([run_worker(case) for case in json.loads(args.worker)]))
        return 0
    if args.gpu and not gpu_visible():
        print("--gpu: TensorFlow sees no GPU here (tf.config.list_physical_devices('GPU') is "
              "empty); the GPU-sized training case would run on the CPU for hours.", file=sys.stderr)
        return 2
    repeats = 1 if args.quick else args.repeats
    cases = plan(args.quick, args.gpu)
    if args.only:
        cases = {k: v for k, v in cases.items() if k in args.only}
    if args.match:
        cases = select(cases, args.match)
    results = []
    peak = None
    run = measure_quick(cases) if args.quick else measure
    for kind, variants in cases.items():
        runs = {i: [] for i in range(len(variants))}
        for rep in range(repeats):  # alternate the variants, repeat
            for i, case in enumerate(variants):
                out = run(case)
                runs[i].append(out)
                print(f"[{kind} {rep + 1}/{repeats}] {label(case)}: "
                      f"{out.get('tokens_per_s', out.get('flops_per_s', 0)):.1f}", flush=True)
        for i, case in enumerate(variants):
            metric = "flops_per_s" if kind == "matmul_peak" else "tokens_per_s"
            value = statistics.median(r[metric] for r in runs[i])
            rss = max(r["peak_rss_mb"] for r in runs[i])
            if kind == "matmul_peak":
                peak = value
            else:
                results.append({"case": case, "tokens_per_s": value, "peak_rss_mb": rss,
                                "runs": [r[metric] for r in runs[i]],
                                "first_call_s": statistics.median(
                                    r.get("first_call_s", 0.0) for r in runs[i])})
    rows = summarize(results, peak, args.quick)
    by_backend = backend_rows(results)
    from algpt2_tf.runtime.cpu_info import cpu_info, cpu_summary

    info = cpu_info()
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": info, "quick": args.quick,
              "gpu": args.gpu,
              "repeats": repeats, "cpu_count": os.cpu_count(), "matmul_peak_flops": peak,
              "rows": rows, "backend_rows": by_backend, "raw": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    table = f"CPU: {cpu_summary(info)}\n\n" + (markdown(rows, peak or 0) if rows else "")
    if by_backend:
        table += "\nKeras backends (algpt2 presets; batch-1 decode):\n\n" + backend_markdown(by_backend)
    with open(args.out + ".md", "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
