#!/usr/bin/env python3
"""Can XLA:CPU decode faster from int8 weights? Batch-1 products of the shared block, five ways.

Batch-1 decoding waits on the bytes of weights it reads (see
`gemv_working_set.py`), so int8 weights (a quarter of float32's bytes) should
decode up to 4x faster, as they do in LiteRT (XNNPACK's int8 kernels). This
measures what XLA:CPU, the compiler behind Keras' TensorFlow and JAX decode
loops, makes of them. Each case runs, in its own process, an XLA-compiled
loop whose step multiplies one row by the four kernels of an `algpt2` block
(768 x 2304, 768 x 768, 768 x 3072, 3072 x 768: 28 MB in float32, 7 MB in
int8), each output feeding the next:

  float32             `x @ W`, the float model's product.
  int8 dequantized    `x @ (float(W_int8) * scale)`, what Keras' weight-only
                      int8 computes; the conversion is loop-invariant, so XLA
                      may hoist it out of the loop (not checked here).
  int8 in-loop reduce the conversion kept inside the loop (made to depend on
                      the step) as one fused multiply-and-sum over int8 bytes.
  int8 x int8 m=1     the row quantized to int8 too (one scale per row), an
                      int8 product with int32 sums: XLA's own code.
  int8 x int8 m=8     the same row padded to 8 rows, with YNNPACK's dots on
                      (`--xla_cpu_experimental_ynn_fusion_type=individual_dot`;
                      YNNPACK takes no one-row products).

    python benchmarks/int8_gemv.py [--quick] [--out benchmarks/results/int8_gemv]
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from case_process import parse_args, run_in_process  # noqa: E402

from algpt2_tf.runtime.cpu_info import cpu_info, cpu_summary  # noqa: E402

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # an algpt2 block's kernels
YNN_DOTS = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
CASES = [dict(name="float32"), dict(name="int8 dequantized"), dict(name="int8 in-loop reduce"),
         dict(name="int8 x int8 m=1"), dict(name="int8 x int8 m=8", xla_flags=YNN_DOTS)]
QUICK_CASES = [CASES[0], CASES[3]]  # checks the harness


def run_case(name, steps, xla_flags=""):
    """Times `steps` decode-like steps of `name`; returns microseconds per step.

    `xla_flags` is part of the case only for the parent, which set them in this
    process's environment.
    """
    import time

    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    kernels = [rng.normal(size=shape).astype("float32") * 0.02 for shape in SHAPES]
    scales = [np.abs(k).max(axis=0) / 127.0 for k in kernels]  # one per output unit
    float_kernels = [tf.constant(k) for k in kernels]
    int8_kernels = [tf.constant(np.round(k / s).astype("int8")) for k, s in zip(kernels, scales)]
    scales = [tf.constant(s.astype("float32")) for s in scales]

    def int8_by_int8(x, kernel, scale, rows):
        row_scale = tf.reduce_max(tf.abs(x), axis=-1, keepdims=True) / 127.0
        q = tf.cast(tf.round(x / row_scale), tf.int8)
        q = tf.pad(q, [[0, rows - 1], [0, 0]])
        sums = tf.linalg.matmul(q, kernel, output_type=tf.int32)[:1]
        return tf.cast(sums, tf.float32) * row_scale * scale

    def product(i, x, k):
        if name == "float32":
            return tf.matmul(x, float_kernels[k])
        if name == "int8 dequantized":
            return tf.matmul(x, tf.cast(int8_kernels[k], tf.float32) * scales[k])
        if name == "int8 in-loop reduce":
            step_zero = tf.cast(tf.minimum(i, 0), tf.int8)  # always 0, but not loop-invariant
            kernel = tf.cast(int8_kernels[k] + step_zero, tf.float32)
            return tf.reduce_sum(kernel * tf.transpose(x), axis=0, keepdims=True) * scales[k]
        return int8_by_int8(x, int8_kernels[k], scales[k], rows=8 if name.endswith("m=8") else 1)

    @tf.function(jit_compile=True)
    def loop(x):
        def body(i, x):
            h = x
            for k in range(len(SHAPES)):  # each output feeds the next: nothing can be skipped
                h = product(i, h, k)
                if k == 0:  # q, k and v summed: the next kernel takes 768 inputs
                    h = tf.reduce_sum(tf.reshape(h, (1, 3, -1)), axis=1)
                h = h / (tf.reduce_max(tf.abs(h)) + 1.0)
            return i + 1, x + h * 1e-3
        return tf.while_loop(lambda i, x: i < steps, body, (0, x))[1]

    x = tf.constant(rng.normal(size=(1, SHAPES[0][0])).astype("float32"))
    loop(x)  # compile
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        loop(x).numpy()
        best = min(best, (time.perf_counter() - start) / steps)
    return {"us_per_step": best * 1e6}


def main():
    args = parse_args(__doc__, "int8_gemv")
    if args.case:
        print(json.dumps(run_case(**json.loads(args.case))))
        return
    rows = []
    for case in QUICK_CASES if args.quick else CASES:
        case = dict(case, steps=5 if args.quick else 200)
        rows.append(dict(case, **run_in_process(__file__, case, case.get("xla_flags", ""))))
        print(rows[-1], flush=True)
    float_us = rows[0]["us_per_step"]
    for row in rows:
        row["speed_vs_float32"] = float_us / row["us_per_step"]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"cpu": cpu_info(), "shapes": SHAPES, "rows": rows}, f, indent=1)
    lines = [f"CPU: {cpu_summary(cpu_info())}", "",
             "One row through an `algpt2` block's four kernels per step (28 MB float32, 7 MB int8).", "",
             "| case | us per step | speed vs float32 |", "|---|---:|---:|"]
    lines += [f"| {r['name']} | {r['us_per_step']:.1f} | {r['speed_vs_float32']:.2f}x |" for r in rows]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
