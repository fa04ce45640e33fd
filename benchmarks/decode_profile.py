#!/usr/bin/env python3
"""Where batch-1 decoding spends its time: one greedy generation's XLA:CPU work, by kind.

Runs `Generator.generate` (greedy, 16-token prompt) for a preset with random
weights under TensorFlow's profiler, then sums the compiled function's thunk
times (the profile's events named after an HLO instruction, on any thread) by
what each thunk computes, found in the profile's own copy of the optimized HLO:

  linear products     matrix-vector products with a weight matrix (the
                      block's four kernels, the embedding projection);
                      their weight bytes per token and the rate they were
                      read at are reported too
  attention products  the products with the key/value caches (batch dims)
  softmax head        products (or fused products) with a vocabulary-sized
                      output: the tied softmax over the embedding table
  reductions          reduce and reduce-window thunks (argmax, softmax, norms)
  other               element-wise fusions, copies, cache updates, loops

Shares are of the profiled call's wall time; what no thunk covers is
"outside thunks" (scheduling between thunks, the loop's control, the call).

    python benchmarks/decode_profile.py [--preset algpt2] [--new-tokens 128] [--quick]
                                        [--out benchmarks/results/decode_profile_<cpu family>]
"""

import argparse
import collections
import glob
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import bench  # noqa: E402  (its models: the preset, or resized to its tiny shape)
from case_process import write_results  # noqa: E402

KINDS = ("linear products", "attention products", "softmax head", "reductions", "other")
BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 2, 8: 4, 9: 8, 10: 2, 11: 4, 12: 8, 16: 2}  # xla.PrimitiveType


def classify(module, vocab_size):
    """`{instruction name: (kind, weight bytes read) or None}` for every instruction of an
    HloModuleProto; None for loops, conditionals and calls (their thunks hold others)."""
    by_id = {i.id: i for c in module.computations for i in c.instructions}
    computations = {c.id: c for c in module.computations}

    def dot_kind(dot):
        if vocab_size in dot.shape.dimensions:
            return "softmax head", 0
        if dot.dot_dimension_numbers.lhs_batch_dimensions:
            return "attention products", 0
        weights = [by_id[o] for o in dot.operand_ids if len(by_id[o].shape.dimensions) == 2]
        size = max((_bytes(w.shape) for w in weights), default=0)
        return "linear products", size

    def kind(instruction):
        if instruction.opcode in ("while", "conditional", "call"):
            return None
        if instruction.opcode == "dot":
            return dot_kind(instruction)
        inner = [instruction]
        if instruction.opcode == "fusion":
            inner = [i for c in instruction.called_computation_ids
                     for i in computations[c].instructions]
        dots = [i for i in inner if i.opcode == "dot"]
        if dots:
            return dot_kind(dots[0])
        if any(i.opcode in ("reduce", "reduce-window") for i in inner):
            return "reductions", 0
        return "other", 0

    return {i.name: kind(i) for c in module.computations for i in c.instructions}


def _bytes(shape):
    count = 1
    for d in shape.dimensions:
        count *= d
    return count * BYTES.get(shape.element_type, 4)


def read_profile(folder, vocab_size):
    """Per-kind thunk seconds and linear-product weight bytes from a profiler folder."""
    from tensorflow.compiler.xla.service import hlo_pb2
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    (path,) = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    kinds = {}
    for plane in space.planes:
        if plane.name == "/host:metadata":
            for meta in plane.event_metadata.values():
                for stat in meta.stats:
                    proto = hlo_pb2.HloProto()
                    proto.ParseFromString(stat.bytes_value)
                    kinds.update(classify(proto.hlo_module, vocab_size))
    if not kinds:
        raise RuntimeError(f"{path} holds no XLA module: nothing compiled ran while profiling")
    seconds, weight_bytes = collections.Counter(), 0
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        names = {k: v.name for k, v in plane.event_metadata.items()}
        # Thunks run on the intra-op threads, and some on the calling thread: every
        # thread's events named after an instruction count.
        for line in plane.lines:
            for event in line.events:
                found = kinds.get(names.get(event.metadata_id, ""))
                if found:
                    seconds[found[0]] += event.duration_ps / 1e12
                    weight_bytes += found[1]
    return seconds, weight_bytes


def run(preset, new_tokens, quick):
    import numpy as np
    import tensorflow as tf

    from algpt2_tf.generation.generator import Generator

    model = bench._our_model(preset, bench.TINY, quick)  # quick: the harness on a tiny shape
    config = model.config
    prompt = [np.random.default_rng(0).integers(0, config.vocab_size, 16).tolist()]
    generator = Generator(model)
    generator.generate(prompt, new_tokens, stop_ids=())  # compile
    start = time.perf_counter()
    generator.generate(prompt, new_tokens, stop_ids=())
    plain = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        tf.profiler.experimental.start(folder)
        start = time.perf_counter()
        generator.generate(prompt, new_tokens, stop_ids=())
        wall = time.perf_counter() - start
        tf.profiler.experimental.stop()
        seconds, weight_bytes = read_profile(folder, config.vocab_size)
    rows = [{"kind": kind, "ms_per_token": seconds[kind] * 1e3 / new_tokens,
             "share": seconds[kind] / wall} for kind in KINDS]
    rows.append({"kind": "outside thunks", "ms_per_token": (wall - sum(seconds.values())) * 1e3
                 / new_tokens, "share": 1 - sum(seconds.values()) / wall})
    linear = seconds["linear products"]
    return {"preset": preset, "new_tokens": new_tokens, "quick": quick,
            "tokens_per_s": new_tokens / plain, "profiled_tokens_per_s": new_tokens / wall,
            "linear_weight_mb_per_token": weight_bytes / new_tokens / 1e6,
            "linear_gb_per_s": weight_bytes / linear / 1e9 if linear else 0.0, "rows": rows}


def markdown(report, summary):
    lines = [f"CPU: {summary}", "",
             f"`{report['preset']}`, greedy, batch 1, 16-token prompt, {report['new_tokens']} new "
             f"tokens: {report['tokens_per_s']:.1f} tokens/s ({report['profiled_tokens_per_s']:.1f} "
             "under the profiler). Linear products read "
             f"{report['linear_weight_mb_per_token']:.1f} MB of weights per token at "
             f"{report['linear_gb_per_s']:.1f} GB/s.", "",
             "| kind | ms per token | share of the call |", "|---|---:|---:|"]
    lines += [f"| {r['kind']} | {r['ms_per_token']:.2f} | {100 * r['share']:.1f}% |"
              for r in report["rows"]]
    return "\n".join(lines) + "\n"


def main():
    from algpt2_tf.runtime.cpu_info import cpu_family, cpu_info, cpu_summary

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="algpt2")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="a tiny shape (a harness check)")
    parser.add_argument("--out", help="output prefix (default: results/decode_profile_<cpu family>)")
    args = parser.parse_args()
    info = cpu_info()
    out = args.out or os.path.join(HERE, "results", f"decode_profile_{cpu_family(info)}")
    report = dict(run(args.preset, args.new_tokens, args.quick), cpu=info,
                  date=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_results(out, report, markdown(report, cpu_summary(info)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
