#!/usr/bin/env python3
"""Each decode speed trick switched off in turn, on the machine at hand: its gain per model and batch.

For `algpt2` and `gpt2` (GPT-2 124M shapes), batch 1 and 8, greedy decoding
of 128 tokens after a 16-token prompt: every trick of
`algpt2_tf.generation.decode_tricks.DecodeTricks` on (the defaults), each one off alone,
and all off; keras-hub's GPT-2 in the same run as the reference. Each
measurement is a fresh process (`bench.py --worker`; `wide_vectors` is
process-wide), the variants alternate, and figures are medians of
`--repeats`. A trick's gain is tokens/s with every trick on divided by
tokens/s with that one off.

    python benchmarks/decode_tricks.py              # writes results/decode_tricks_<cpu family>.*
    python benchmarks/decode_tricks.py --quick      # tiny shapes, one run, shared processes (CI smoke)
"""

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench  # noqa: E402  (the worker protocol and keras-hub's model)
from case_process import write_results  # noqa: E402

from algpt2_tf.generation.decode_tricks import DecodeTricks  # noqa: E402
from algpt2_tf.runtime.cpu_info import cpu_family, cpu_info, cpu_summary  # noqa: E402

MODELS = ("algpt2", "gpt2")
BATCHES = (1, 8)


def variants():
    """`(label, switches text)`: all on, each trick off alone, all off."""
    names = DecodeTricks.names()
    out = [("all on", "")]
    out += [(f"no {name}", f"{name}=0") for name in names]
    out.append(("all off", ",".join(f"{name}=0" for name in names)))
    return out


def plan(quick, models=MODELS, batches=BATCHES):
    new = 8 if quick else 128
    cases = []
    for batch in batches:
        cases.append(dict(kind="decode", model="peer", batch=batch, prompt=16, new_tokens=new,
                          quick=quick))
        for model in models:
            for label, switches in variants():
                cases.append(dict(kind="decode", model=model, batch=batch, prompt=16,
                                  new_tokens=new, quick=quick, tricks=switches, variant=label))
    return cases


def table(results):
    """One row per (model, batch, variant): tokens/s, gain of the trick, ratio to keras-hub."""
    peer = {r["case"]["batch"]: r["tokens_per_s"] for r in results if r["case"]["model"] == "peer"}
    all_on = {(r["case"]["model"], r["case"]["batch"]): r["tokens_per_s"] for r in results
              if r["case"].get("variant") == "all on"}
    rows = []
    for r in results:
        c = r["case"]
        variant = c.get("variant", "keras-hub")
        on = all_on.get((c["model"], c["batch"]))
        gain = on / r["tokens_per_s"] if on and variant != "all on" else None  # keras-hub: no on
        rows.append({"model": "keras-hub" if c["model"] == "peer" else c["model"],
                     "batch": c["batch"], "variant": variant, "tokens_per_s": r["tokens_per_s"],
                     "runs": r["runs"], "gain": gain,
                     "vs_keras_hub": r["tokens_per_s"] / peer[c["batch"]] if c["batch"] in peer
                     else None})
    return rows


def markdown(rows, info, repeats, new_tokens):
    lines = [f"CPU: {cpu_summary(info)}", "",
             f"Greedy decoding, 16-token prompt, {new_tokens} new tokens; median of {repeats} fresh "
             "processes. Gain = tokens/s with every trick on / tokens/s with this one off "
             "(> 1: the trick helps here).", "",
             "| model | batch | variant | tokens/s | gain of the trick | vs keras-hub |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        gain = f"{r['gain']:.2f}x" if r["gain"] else "-"
        ratio = f"{r['vs_keras_hub']:.2f}x" if r["vs_keras_hub"] else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | "
                     f"{r['tokens_per_s']:.1f} | {gain} | {ratio} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one run (CI smoke)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--out", help="output prefix (default: results/decode_tricks_<cpu family>)")
    args = parser.parse_args()
    info = cpu_info()
    out = args.out or os.path.join(HERE, "results", f"decode_tricks_{cpu_family(info)}")
    repeats = 1 if args.quick else args.repeats
    cases = plan(args.quick, args.models, args.batches)
    runs = [[] for _ in cases]
    # --quick checks the code of every case: those that can share a process do.
    measure = bench.measure_quick({"decode": cases}) if args.quick else bench.measure
    for rep in range(repeats):  # alternate the variants, repeat
        for i, case in enumerate(cases):
            runs[i].append(measure(case)["tokens_per_s"])
            print(f"[{rep + 1}/{repeats}] {case['model']} batch={case['batch']} "
                  f"{case.get('variant', '')}: {runs[i][-1]:.1f}", flush=True)
    results = [{"case": case, "tokens_per_s": statistics.median(r), "runs": r}
               for case, r in zip(cases, runs)]
    rows = table(results)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": info, "quick": args.quick,
              "repeats": repeats, "rows": rows}
    write_results(out, report, markdown(rows, info, repeats, cases[0]["new_tokens"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
