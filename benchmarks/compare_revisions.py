#!/usr/bin/env python3
"""Before/after: the same `bench.py` cases and the served batch-1 step, two checkouts alternating.

Each checkout (a `git worktree` of the revision) is measured with its own
`benchmarks/bench.py` and `benchmarks/serve_load.py` and its own package
(`PYTHONPATH` set to it), one repeat at a time, the two alternating for
`--rounds` rounds, so both see the same machine. It reports the median of each
case per checkout and the ratio after / before.

    git worktree add /tmp/before 76d3b18
    python benchmarks/compare_revisions.py /tmp/before . --rounds 3 \
        --out benchmarks/results/reshape_before_after

The served step is `serve_load.py --openai --clients 1` (unbatched: one client,
one request at a time, streamed), reported as generated tokens/s.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from algpt2_tf.runtime.cpu_info import cpu_info, cpu_summary  # noqa: E402
from bench import label  # noqa: E402  (benchmarks/bench.py, beside this file)
from case_process import write_results  # noqa: E402

DEFAULT_MATCH = r"^(algpt2 (batch=1|batch=8|precision=fp32 batch=4 xla)|gpt2 batch=1)$"
SERVED = "served batch-1 step (OpenAI API, unbatched)"


def run_checkout(checkout, argv, out):
    """Runs one benchmark script of `checkout` with its own package; returns its JSON report."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    subprocess.run([sys.executable, *argv, "--out", out], cwd=checkout, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    with open(out if out.endswith(".json") else out + ".json") as f:
        return json.load(f)


def bench_once(checkout, only, match, folder, quick=False):
    report = run_checkout(checkout, ["benchmarks/bench.py", "--only", *only, "--match", match,
                                     "--repeats", "1", *(["--quick"] if quick else [])],
                          os.path.join(folder, "bench"))
    return {f"{r['case']['kind']}: {label(r['case'])}": r["tokens_per_s"]
            for r in report["raw"]}


def served_once(checkout, preset, new_tokens, requests, folder):
    report = run_checkout(checkout, ["benchmarks/serve_load.py", "--openai", "--preset", preset,
                                     "--clients", "1", "--requests", str(requests),
                                     "--max-new-tokens", str(new_tokens)],
                          os.path.join(folder, "serve.json"))
    return {SERVED: report["unbatched"]["tokens_per_s"]}


def summarize(runs):
    """`runs`: {checkout name: [{case: tokens/s}, ...]} -> one row per case with medians and ratio."""
    before, after = runs["before"], runs["after"]
    cases = [c for c in before[0] if all(c in r for r in before + after)]
    rows = []
    for case in cases:
        b = [r[case] for r in before]
        a = [r[case] for r in after]
        rows.append({"case": case, "before": b, "after": a, "before_median": statistics.median(b),
                     "after_median": statistics.median(a),
                     "ratio": statistics.median(a) / statistics.median(b)})
    return rows


def markdown(rows):
    lines = ["| case | before tokens/s (median; runs) | after tokens/s (median; runs) | after / before |",
             "|---|---:|---:|---:|"]
    for r in rows:
        runs_b = ", ".join(f"{v:.1f}" for v in r["before"])
        runs_a = ", ".join(f"{v:.1f}" for v in r["after"])
        lines.append(f"| {r['case']} | {r['before_median']:.1f} ({runs_b}) | "
                     f"{r['after_median']:.1f} ({runs_a}) | {r['ratio']:.3f}x |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="checkout of the earlier revision")
    parser.add_argument("after", help="checkout of the later revision")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="+", default=["decode", "train"],
                        help="bench.py case kinds")
    parser.add_argument("--match", default=DEFAULT_MATCH, help="bench.py --match")
    parser.add_argument("--serve-preset", default="algpt2",
                        help="the served model's preset ('' leaves the served step out)")
    parser.add_argument("--serve-tokens", type=int, default=64)
    parser.add_argument("--serve-requests", type=int, default=4)
    parser.add_argument("--quick", action="store_true",
                        help="bench.py's tiny shapes (a smoke test of this script, not a measurement)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "before_after"))
    args = parser.parse_args()
    for checkout in (args.before, args.after):
        if not os.path.isfile(os.path.join(checkout, "benchmarks", "bench.py")):
            parser.error(f"{checkout}: no benchmarks/bench.py there (give a checkout's root)")
    runs = {"before": [], "after": []}
    commits = {name: subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True).stdout.strip()
               for name, path in (("before", args.before), ("after", args.after))}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, checkout in (("before", args.before), ("after", args.after)):
                figures = bench_once(checkout, args.only, args.match, tmp, args.quick)
                if args.serve_preset:
                    figures.update(served_once(checkout, args.serve_preset, args.serve_tokens,
                                               args.serve_requests, tmp))
                runs[name].append(figures)
                print(f"[round {round_ + 1}/{args.rounds}] {name} ({commits[name]}): "
                      + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()), flush=True)
    rows = summarize(runs)
    info = cpu_info()
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": info, "commits": commits,
              "rounds": args.rounds, "match": args.match, "serve_preset": args.serve_preset,
              "rows": rows}
    write_results(args.out, report,
                  f"CPU: {cpu_summary(info)}; before {commits['before']}, after "
                  f"{commits['after']}, {args.rounds} alternating rounds\n\n" + markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
