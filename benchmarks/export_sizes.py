#!/usr/bin/env python3
"""Sizes of every export format for a preset (random weights; sizes do not depend on values).

    python benchmarks/export_sizes.py [--preset algpt2] [--max-length 256]
"""

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="algpt2")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "export_sizes.json"))
    args = parser.parse_args()

    from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel
    from algpt2_tf.export import export_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        ALGPT2LMHeadModel(ALGPT2Config.from_preset(args.preset)).save(path)
        for fmt, quantize in (("keras", "none"), ("savedmodel", "none"), ("tflite", "none"),
                              ("tflite", "fp16"), ("tflite", "int8")):
            report = export_model(path, fmt, os.path.join(tmp, f"{fmt}-{quantize}"),
                                  quantize=quantize, max_length=args.max_length,
                                  log=lambda *_: None)
            print(report.summary(), flush=True)
            rows.append({"format": fmt, "quantize": quantize, "size_bytes": report.size_bytes,
                         "max_abs_diff": report.max_abs_diff,
                         "greedy_agreement": report.greedy_agreement})
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"preset": args.preset, "max_length": args.max_length, "rows": rows}, f, indent=2)
    print("| format | size (MB) | size (MiB) |\n|---|---:|---:|")
    for r in rows:
        name = r["format"] + ("" if r["quantize"] == "none" else f" {r['quantize']}")
        print(f"| {name} | {r['size_bytes'] / 1e6:.2f} | {r['size_bytes'] / 2**20:.2f} |")


if __name__ == "__main__":
    main()
