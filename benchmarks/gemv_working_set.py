#!/usr/bin/env python3
"""What limits batch-1 decoding: matrix-vector speed against the weights' total size.

Each case runs, in its own process, an XLA-compiled loop of float32 products
`x @ W^T` over N different `[3072, 768]` matrices (9.4 MB each, the size of
one GPT-2 MLP kernel), the way a decode step cycles through the shared block's
kernels, and reports the bandwidth it reached. The last case repeats N=1 with
one intra-op thread (XLA splits each product over the intra-op threads).

    python benchmarks/gemv_working_set.py [--quick] [--out benchmarks/results/gemv_working_set]
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from case_process import parse_args, run_in_process  # noqa: E402

from algpt2_tf.runtime.cpu_info import cpu_info, cpu_summary  # noqa: E402

ROWS, COLS = 3072, 768
CASES = [dict(matrices=n, threads=0) for n in (1, 2, 3, 4, 6)] + [dict(matrices=1, threads=1)]
QUICK_CASES = [dict(matrices=1, threads=0), dict(matrices=1, threads=1)]  # checks the harness


def run_case(matrices, threads, steps):
    """Times `steps` passes over `matrices` products; returns microseconds and GB/s per product."""
    import time

    import numpy as np
    import tensorflow as tf

    from algpt2_tf.runtime.xla_flags import prefer_wide_vectors

    prefer_wide_vectors()  # as Generator does
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    rng = np.random.default_rng(0)
    kernels = [tf.Variable(rng.normal(size=(ROWS, COLS)).astype("float32") * 0.02)
               for _ in range(matrices)]

    @tf.function(jit_compile=True)
    def loop(x):
        def body(i, x):
            for kernel in kernels:  # each output feeds the next: no product can be skipped
                x = x + tf.reduce_sum(tf.matmul(x, kernel, transpose_b=True)) * 1e-9
            return i + 1, x
        return tf.while_loop(lambda i, x: i < steps, body, (0, x))[1]

    x = tf.ones((1, COLS))
    loop(x)  # compile
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        loop(x).numpy()
        best = min(best, (time.perf_counter() - start) / (steps * matrices))
    return {"us_per_product": best * 1e6, "gb_per_s": ROWS * COLS * 4 / best / 1e9}


def main():
    args = parse_args(__doc__, "gemv_working_set")
    if args.case:
        print(json.dumps(run_case(**json.loads(args.case))))
        return
    rows = []
    for case in QUICK_CASES if args.quick else CASES:
        case = dict(case, steps=10 if args.quick else 300)
        result = dict(case, working_set_mb=case["matrices"] * ROWS * COLS * 4 / 1e6,
                      **run_in_process(__file__, case))
        print(result, flush=True)
        rows.append(result)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"cpu": cpu_info(), "rows": rows}, f, indent=1)
    lines = [f"CPU: {cpu_summary(cpu_info())}", "","| matrices | working set MB | intra-op threads | us per product | GB/s |",
             "|---:|---:|---|---:|---:|"]
    lines += [f"| {r['matrices']} | {r['working_set_mb']:.1f} | {r['threads'] or 'default'} | "
              f"{r['us_per_product']:.1f} | {r['gb_per_s']:.1f} |" for r in rows]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
