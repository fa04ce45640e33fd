#!/usr/bin/env python3
"""A paper estimate: ALGPT2-xl and GPT-2 xl trained data-parallel on 8 and 64 accelerators.

Arithmetic, not a measurement: the parameter counts are exact (the
presets' `num_parameters`); the rest follows from stated assumptions, each
a flag:

- memory per device, data parallel (every device holds the whole model):
  float32 weights, gradients and two AdamW moments (16 bytes per
  parameter), plus activations in bf16 for the per-device batch, with every
  layer's input kept and one layer recomputed at a time (activation
  checkpointing per layer; without it the activations of all layers stay:
  `s*b*h*(34 + 5*a*s/h)` bytes per layer, Korthikanti et al. 2022);
- compute per token: 6 x the multiply-adds of the unrolled model (every
  virtual layer computes, shared or not) plus attention's `6*2*s*h` per
  layer; 8/6 of that with recomputation;
- step time: compute / (devices x peak x utilization), with the
  all-reduce not overlapped (an upper bound);
- communication: a ring all-reduce sends `2 (n-1)/n` x the gradient bytes
  (float32 here) from every device each step.

    python benchmarks/xl_estimate.py     # writes results/xl_estimate.{md,json}
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from algpt2_tf.config import ALGPT2Config  # noqa: E402

GB = 1e9


def estimate(preset, devices, args):
    c = ALGPT2Config.from_preset(preset)
    params = c.num_parameters()
    s, h, a, layers = args.seq_len, c.hidden_size, c.num_heads, c.num_layers
    per_device = args.global_batch // devices
    # Multiply-adds per token of one virtual layer (QKV, output, MLP) and of the head.
    layer_macs = 4 * h * h + 2 * h * c.intermediate_size
    head_macs = (h * c.embedding_size + c.embedding_size * c.vocab_size) if c.factorized \
        else h * c.vocab_size
    flops_per_token = 6 * (layers * layer_macs + head_macs) + 6 * 2 * s * h * layers
    flops_per_token *= 8 / 6  # the forward pass again, for the recomputed layers
    step_flops = flops_per_token * args.global_batch * s
    compute_s = step_flops / (devices * args.peak_tflops * 1e12 * args.utilization)
    grad_bytes = params * 4
    sent = 2 * (devices - 1) / devices * grad_bytes
    link = args.nvlink_gbs if devices <= 8 else args.network_gbs
    comm_s = sent / (link * GB)
    state = params * 16
    kept_inputs = layers * s * per_device * h * 2  # bf16 layer inputs
    one_layer = s * per_device * h * (34 + 5 * a * s / h)
    return {"preset": preset, "devices": devices, "parameters": params,
            "per_device_batch": per_device, "weights_and_adam_gb": state / GB,
            "activations_gb": (kept_inputs + one_layer) / GB,
            "activations_without_checkpointing_gb": layers * one_layer / GB,
            "gradient_gb": grad_bytes / GB, "all_reduce_sent_gb": sent / GB,
            "compute_s": compute_s, "all_reduce_s": comm_s,
            "step_s": compute_s + comm_s, "comm_share": comm_s / (compute_s + comm_s),
            "tokens_per_s": args.global_batch * s / (compute_s + comm_s)}


def markdown(report):
    a = report["assumptions"]
    lines = ["| model | devices | params | weights + AdamW GB / device | activations GB / device "
             "(checkpointed; without) | all-reduce GB sent / device / step | compute s / step | "
             "all-reduce s / step | communication share |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(
            f"| {r['preset']} | {r['devices']} | {r['parameters'] / 1e6:,.1f}M | "
            f"{r['weights_and_adam_gb']:.2f} | {r['activations_gb']:.1f}; "
            f"{r['activations_without_checkpointing_gb']:.0f} | {r['all_reduce_sent_gb']:.2f} | "
            f"{r['compute_s']:.2f} | {r['all_reduce_s']:.3f} | {r['comm_share']:.0%} |")
    lines += ["", f"Global batch {a['global_batch']} x {a['seq_len']} tokens; bf16 peak "
              f"{a['peak_tflops']:g} TFLOP/s per device at {a['utilization']:.0%} utilization "
              f"(assumed); all-reduce at {a['nvlink_gbs']:g} GB/s within 8 devices, "
              f"{a['network_gbs']:g} GB/s per device beyond; not overlapped with compute. "
              "`python benchmarks/xl_estimate.py`."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="bf16 dense peak per device (H100/H200 SXM: 989)")
    parser.add_argument("--utilization", type=float, default=0.4)
    parser.add_argument("--nvlink-gbs", type=float, default=450.0,
                        help="all-reduce bandwidth per device inside one 8-device host")
    parser.add_argument("--network-gbs", type=float, default=50.0,
                        help="per device across hosts (400 Gb/s)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "xl_estimate"))
    args = parser.parse_args()
    rows = [estimate(preset, devices, args) for preset in ("algpt2-xl", "gpt2-xl")
            for devices in (8, 64)]
    assumptions = {k: getattr(args, k) for k in ("global_batch", "seq_len", "peak_tflops",
                                                 "utilization", "nvlink_gbs", "network_gbs")}
    report = {"assumptions": assumptions, "rows": rows}
    text = markdown(report)
    print(text)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
