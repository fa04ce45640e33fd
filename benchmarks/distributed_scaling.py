#!/usr/bin/env python3
"""Data-parallel scaling: training tokens/s of 1 vs 2 local JAX processes at the same global batch.

For each preset, the same training step (AdamW, global batch x seq-len
tokens, float32, synthetic ids) runs as one process and as two processes of
one `jax-data-parallel` run (`algpt2_tf.training.launch.launch_local`, each process
half of every global batch; gradients all-reduced over gloo). A step's time
is the median of the steps after the warm-up ones. Efficiency = tokens/s of
2 processes / tokens/s of 1. Each measurement is a fresh set of processes;
the two layouts alternate over `--repeats`.

On one 2-core machine both layouts share the same two cores, so this
measures what distribution costs (the all-reduce of every gradient, and
two processes' threads on the cores), not more compute: efficiency near 1.0
means communication is cheap next to the step; each added host brings its
own cores on a real cluster. The gradient bytes all-reduced per step are
the trainable parameters x 4 (float32), so a shared block sends far less
than GPT-2.

    python benchmarks/distributed_scaling.py            # writes results/distributed_scaling_<cpu>.*
    python benchmarks/distributed_scaling.py --quick    # tiny shapes, one run (CI smoke)
"""

import argparse
import io
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

PRESETS = ("algpt2", "gpt2")


def worker(args):
    """One process of a measured run: prints one JSON line (the chief)."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    from algpt2_tf.training import distribute

    dist = distribute.start("jax-data-parallel", cluster=distribute.Cluster.resolve(),
                            batch_size=args.batch)
    import keras
    import numpy as np
    import tensorflow as tf

    from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel

    config = ALGPT2Config.from_preset(args.preset)
    if args.quick:
        config = ALGPT2Config.from_dict({**config.to_dict(), "hidden_size": 64, "num_heads": 2,
                                         "intermediate_size": 128, "num_layers": 2,
                                         "num_layer_groups": min(2, config.num_layer_groups),
                                         "vocab_size": 512})
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq_len))
    batch = {"input_ids": ids.astype("int32"), "attention_mask": np.ones_like(ids, "int32")}
    steps = args.warmup + args.steps
    dataset = dist.local_batches(tf.data.Dataset.from_tensors(batch).repeat(steps), args.batch)
    keras.utils.set_random_seed(0)
    model = ALGPT2LMHeadModel(config)
    model.compile(optimizer=keras.optimizers.AdamW(1e-4))

    class Clock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.times = [time.perf_counter()]

        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])  # wait for the step
            self.times.append(time.perf_counter())

    clock = Clock()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, callbacks=[clock], verbose=0)
    step_times = np.diff(clock.times)[args.warmup:]
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    dist.finish()
    if dist.is_chief:
        print("RESULT " + json.dumps({
            "preset": args.preset, "processes": dist.num_processes, "batch": args.batch,
            "seq_len": args.seq_len, "step_s": float(np.median(step_times)),
            "tokens_per_s": args.batch * args.seq_len / float(np.median(step_times)),
            "trainable_parameters": trainable, "gradient_mb_per_step": trainable * 4 / 2**20}),
            flush=True)


def measure(preset, processes, args):
    """Runs one measured run; returns the chief's result."""
    from algpt2_tf.training.launch import launch_local

    argv = ["--worker", "--preset", preset, "--batch", str(args.batch),
            "--seq-len", str(args.seq_len), "--steps", str(args.steps),
            "--warmup", str(args.warmup)] + (["--quick"] if args.quick else [])
    program = [sys.executable, os.path.abspath(__file__)]
    log = io.StringIO()
    status = launch_local(argv, processes, environ=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
                          out=log, program=program)
    output = log.getvalue()
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in output.splitlines()
               if "RESULT " in line]
    if status or not results:
        raise RuntimeError(f"{preset} x {processes} failed ({status}):\n{output[-3000:]}")
    return results[0]


def markdown(report):
    """The results table: a CPU line, one row per preset, then how it was measured."""
    from algpt2_tf.runtime.cpu_info import cpu_summary

    lines = [f"CPU: {cpu_summary(report['cpu'])}", "",
             "| preset | trainable params | gradient MB / step | 1 process tok/s | "
             "2 processes tok/s | efficiency (2 / 1) |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        lines.append(f"| {row['preset']} | {row['trainable_parameters']:,} | "
                     f"{row['gradient_mb_per_step']:.1f} | {row['one']:.1f} | {row['two']:.1f} | "
                     f"{row['efficiency']:.2f} |")
    lines += ["", f"Training tokens/s of 1 vs 2 local JAX processes (`jax-data-parallel`) at the "
              f"same global batch {report['batch']} x {report['seq_len']}, float32 AdamW, median "
              f"step of {report['steps']} after {report['warmup']} warm-up steps, median of "
              f"{report['repeats']} run(s) each: `python benchmarks/distributed_scaling.py`."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--batch", type=int, default=8, help="the global batch")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="measured steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps not measured")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat")
    parser.add_argument("--out", help="results file stem (default results/distributed_scaling_"
                        "<cpu family>, or none with --quick)")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.repeats, args.steps, args.warmup, args.seq_len = 1, 3, 1, 32
    from algpt2_tf.runtime.cpu_info import cpu_family, cpu_info

    info = cpu_info()
    rows = []
    for preset in args.presets:
        times = {1: [], 2: []}
        last = None
        for _ in range(args.repeats):
            for processes in (1, 2):
                last = measure(preset, processes, args)
                times[processes].append(last["tokens_per_s"])
                print(f"{preset} x {processes}: {last['tokens_per_s']:.1f} tok/s", flush=True)
        one, two = statistics.median(times[1]), statistics.median(times[2])
        rows.append({"preset": preset, "trainable_parameters": last["trainable_parameters"],
                     "gradient_mb_per_step": last["gradient_mb_per_step"], "one": one,
                     "two": two, "efficiency": two / one, "runs": times})
    report = {"cpu": info, "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
              "warmup": args.warmup, "repeats": args.repeats, "rows": rows}
    text = markdown(report)
    print(text)
    stem = args.out or (None if args.quick else os.path.join(
        HERE, "results", f"distributed_scaling_{cpu_family(info)}"))
    if stem:
        with open(stem + ".json", "w") as f:
            json.dump(report, f, indent=2)
        with open(stem + ".md", "w") as f:
            f.write(text)
    return rows


if __name__ == "__main__":
    main()
