"""Cold start: wall time and peak memory of `algpt2 generate` from a fresh process, per engine.

    python benchmarks/cold_start.py [--model algpt2-pd-books] [--rounds 3] [--quick] [--out PATH]
    python benchmarks/cold_start.py --preset algpt2     # a freshly initialized preset model

Each case is one `algpt2 generate --model M --prompt P --max-new-tokens 1 --sampler greedy`
run as a new process (`/usr/bin/time`-style: wall seconds from start to exit, the first
token included, and the child's peak RSS from `resource.getrusage`), in a cache folder of
the benchmark's own:

- `xla`: `--engine xla` (imports TensorFlow, loads the model, compiles the loop);
- `xla second`: the same again, its compiled programs read from the cache folder
  (`algpt2_tf.runtime.xla_cache`);
- `litert first`: `--engine litert` on an empty cache (builds the LiteRT engine once);
- `litert cached`: `--engine auto` once the build is cached (no TensorFlow).

`--preset NAME` measures a model of an architecture preset (no weights ship for one: a
seeded fresh initialization, saved once to the benchmark's folder with the GPT-2 tokenizer).

And `algpt2 serve --model M` (the OpenAI server, XLA engine, default batch shapes warmed
up): seconds from the command's start until `/v1/models` answers, on an empty cache folder
(`serve first start`) and again on the one it left (`serve second start`); and
`--engine litert` on the round's cached LiteRT build (`serve litert cached`).

Rounds alternate the `xla` and `litert cached` cases (the first build runs once per
round, on a fresh cache); the table gives each case's median and the machine's load
average during the run. `--quick`: one round (the slow tier's smoke test).
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.case_process import RESULTS, write_results  # noqa: E402

PROMPT = "She opened the door and"


def run_once(model, engine, cache):
    """`(wall seconds, stderr)` of one fresh `algpt2 generate` process."""
    env = dict(os.environ, ALGPT2_CACHE=cache)
    started = time.perf_counter()
    done = subprocess.run(["algpt2", "generate", "--model", model, "--prompt", PROMPT,
                           "--max-new-tokens", "1", "--sampler", "greedy", "--engine", engine],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"algpt2 generate --engine {engine} failed:\n{done.stderr[-2000:]}")
    return wall, done.stderr


def serve_ready_s(model, cache, engine="xla", timeout=600):
    """Seconds from starting `algpt2 serve --model M --engine E` until `/v1/models` answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, ALGPT2_CACHE=cache)
    started = time.perf_counter()
    server = subprocess.Popen(["algpt2", "serve", "--model", model, "--engine", engine, "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        while time.perf_counter() - started < timeout:
            if server.poll() is not None:
                raise RuntimeError(f"algpt2 serve exited:\n{server.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1):
                    return time.perf_counter() - started
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"algpt2 serve was not ready after {timeout} s")
    finally:
        server.terminate()  # a clean stop: it records its compiled programs
        server.wait(timeout=60)


def measure(model, rounds, serve=True):
    """Every case `rounds` times, alternating; returns `{case: [wall seconds, ...]}`."""
    found = {"litert first": [], "xla": [], "xla second": [], "litert cached": []}
    if serve:
        found.update({"serve first start": [], "serve second start": [],
                      "serve litert cached": []})
    root = tempfile.mkdtemp(prefix="algpt2-cold-")
    try:
        for r in range(rounds):
            cache = os.path.join(root, f"round{r}")  # empty: the first LiteRT run builds
            found["litert first"].append(run_once(model, "litert", cache)[0])
            found["xla"].append(run_once(model, "xla", cache)[0])
            found["xla second"].append(run_once(model, "xla", cache)[0])
            wall, err = run_once(model, "auto", cache)
            if "engine litert" not in err:
                raise RuntimeError(f"--engine auto did not take the cached LiteRT build:\n{err}")
            found["litert cached"].append(wall)
            if serve:  # the LiteRT build of this round's cache: no TensorFlow, one request at a time
                found["serve litert cached"].append(serve_ready_s(model, cache, "litert"))
                cache = os.path.join(root, f"serve{r}")  # empty: nothing compiled yet
                found["serve first start"].append(serve_ready_s(model, cache))
                found["serve second start"].append(serve_ready_s(model, cache))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return found


def peak_rss_alone(model, engine, cache):
    """The peak RSS (MB) of one case: a helper process runs it and reports its children's
    `ru_maxrss`, which is the largest child's, so one case per helper."""
    code = ("import resource, subprocess, sys, os\n"
            "subprocess.run(sys.argv[1:], env=dict(os.environ), capture_output=True, check=True)\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    env = dict(os.environ, ALGPT2_CACHE=cache)
    out = subprocess.run([sys.executable, "-c", code, "algpt2", "generate", "--model", model,
                          "--prompt", PROMPT, "--max-new-tokens", "1", "--sampler", "greedy",
                          "--engine", engine], env=env, capture_output=True, text=True,
                         check=True).stdout
    return float(out.strip())


def saved_preset(preset, folder):
    """A seeded fresh model of `preset` saved as `folder/PRESET.keras` (in a child process, so
    this one never imports TensorFlow)."""
    path = os.path.join(folder, f"{preset}.keras")
    code = ("import sys, keras\n"
            "from algpt2_tf import ALGPT2LMHeadModel\n"
            "keras.utils.set_random_seed(0)\n"
            "ALGPT2LMHeadModel.from_preset(sys.argv[1], load_weights=False).save(sys.argv[2])\n")
    subprocess.run([sys.executable, "-c", code, preset, path], check=True, capture_output=True)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="algpt2-pd-books")
    parser.add_argument("--preset", help="measure a fresh model of this architecture preset "
                                         "instead of --model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round (a smoke test)")
    parser.add_argument("--no-serve", action="store_true", help="generate's cases only")
    parser.add_argument("--out", help="results path without extension (default: "
                                      "benchmarks/results/cold_start_<cpu>)")
    args = parser.parse_args()
    from algpt2_tf.runtime.cpu_info import cpu_info

    cpu = cpu_info()
    rounds = 1 if args.quick else args.rounds
    models = tempfile.mkdtemp(prefix="algpt2-cold-models-")
    try:
        model = saved_preset(args.preset, models) if args.preset else args.model
        label = f"a fresh `{args.preset}` preset model" if args.preset else args.model
        load_before = os.getloadavg()
        found = measure(model, rounds, serve=not args.no_serve)
        cache = tempfile.mkdtemp(prefix="algpt2-cold-rss-")
        try:  # exact peaks, one child tree per case
            rss = {"litert first": peak_rss_alone(model, "litert", cache),
                   "xla": peak_rss_alone(model, "xla", cache),
                   "xla second": peak_rss_alone(model, "xla", cache),
                   "litert cached": peak_rss_alone(model, "auto", cache)}
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    finally:
        shutil.rmtree(models, ignore_errors=True)
    load_after = os.getloadavg()
    rows = {case: {"wall_s": walls, "median_wall_s": statistics.median(walls),
                   "peak_rss_mb": rss.get(case)} for case, walls in found.items()}
    report = {"model": label, "prompt": PROMPT, "rounds": rounds, "cpu": cpu,
              "load_average_before": load_before, "load_average_after": load_after,
              "cases": rows}
    cpu_name = f"{cpu['vendor']} {cpu['model_name']} family {cpu['family']} model {cpu['model']}"
    lines = [f"# Cold start: `algpt2 generate --model M --max-new-tokens 1`, M = {label}", "",
             f"CPU: {cpu_name}, {cpu['logical_cpus']} logical CPUs; load average (1, 5, 15 min) "
             f"{', '.join(f'{x:.2f}' for x in load_before)} before, "
             f"{', '.join(f'{x:.2f}' for x in load_after)} after; median of {rounds} "
             "round(s), fresh processes, cases alternating.", "",
             "| case | median wall s (generate: to exit, first token included; serve: until "
             "it answers) | runs | peak RSS MB |",
             "|---|---:|---|---:|"]
    for case, row in rows.items():
        rss_mb = "-" if row["peak_rss_mb"] is None else f"{row['peak_rss_mb']:.0f}"
        lines.append(f"| {case} | {row['median_wall_s']:.2f} | "
                     f"{', '.join(f'{w:.2f}' for w in row['wall_s'])} | {rss_mb} |")
    slug = f"{cpu['vendor'].lower().replace('authentic', '').replace('genuine', '')}_" \
           f"f{cpu['family']}m{cpu['model']}"
    suffix = f"_{args.preset}" if args.preset else ""
    out = args.out or os.path.join(RESULTS, f"cold_start_{slug}{suffix}")
    write_results(out, report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
