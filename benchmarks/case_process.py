"""The small benchmarks' shared frame: a command line, and each case in its own process.

A case runs as `python SCRIPT --case JSON` in a fresh process (so compilation
caches, XLA flags and memory never carry over between cases) and prints its
result as one JSON line.
"""

import argparse
import json
import os
import subprocess
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(doc, results_name):
    """`--out` (default `benchmarks/results/<results_name>`), `--quick` and the internal `--case`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(RESULTS, results_name))
    parser.add_argument("--quick", action="store_true", help="two short cases (a harness check)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, as JSON
    return parser.parse_args()


def run_in_process(script, case, xla_flags=""):
    """Runs `case` through `script --case` in a fresh process; returns its JSON result.

    `xla_flags` are appended to the environment's `XLA_FLAGS` for that process only.
    """
    env = dict(os.environ)
    if xla_flags:
        env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), xla_flags) if f)
    out = subprocess.run([sys.executable, script, "--case", json.dumps(case)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def write_results(out, report, table):
    """Writes `report` to `out`.json and the markdown `table` to `out`.md, and prints the table."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(table)
    print(table)
