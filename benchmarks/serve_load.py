#!/usr/bin/env python3
"""Load benchmark of `algpt2 serve`: concurrent clients against both signatures.

Starts the server on a free loopback port over an exported SavedModel folder
(default: a fresh export of a small random model), runs `--clients` threads x
`--requests` requests of each signature, and prints p50/p99 latency and
requests/s per signature (reported, not asserted).

    python benchmarks/serve_load.py [--model-base-path saved_models/NAME --model-name NAME]

With `--openai`, it serves a Keras model over the OpenAI-compatible API
instead (`algpt2 serve --model`), once with batching and once without
(`--no-batching`), with `--litert` also on the LiteRT engine (`--engine litert
--quantize Q`, one request at a time), and every client streams its completions: requests/s,
generated tokens/s, p50 / p99 latency and p50 / p99 time to first token.

    python benchmarks/serve_load.py --openai [--preset algpt2-tiny] [--max-new-tokens 16]
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from algpt2_tf.export.formats import ENGINE_QUANTIZATIONS  # noqa: E402
from algpt2_tf.runtime.cpu_info import cpu_info  # noqa: E402
from algpt2_tf.training.launch import free_port  # noqa: E402


def export_small_model(folder):
    from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel
    from algpt2_tf.export import export_model

    model = ALGPT2LMHeadModel(ALGPT2Config.from_preset("algpt2-tiny"))
    path = os.path.join(folder, "tiny.keras")
    model.save(path)
    export_model(path, "savedmodel", os.path.join(folder, "tiny"), max_length=64, log=lambda *_: None)
    return os.path.join(folder, "tiny"), "tiny"


def post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            ok = response.status == 200
    except OSError:  # HTTPError included: counted as an error
        ok = False
    return time.perf_counter() - start, ok


def stream(url, body):
    """One streamed completion: (seconds, seconds to the first chunk, tokens, ok)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first, tokens = None, 0
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            for line in response:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if first is None:
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        ok = tokens > 0
    except OSError:
        ok = False
    return time.perf_counter() - start, first or 0.0, tokens, ok


def load(call, clients, requests):
    """`clients` threads each making `requests` calls: (the calls' results, seconds)."""
    def client(_):
        return [call() for _ in range(requests)]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for batch in pool.map(client, range(clients)) for r in batch]
    return results, time.perf_counter() - start


def percentile_ms(values, q):
    values = sorted(values)
    return 1000 * values[int(q * (len(values) - 1))]


def run_openai(url, body, clients, requests):
    results, elapsed = load(lambda: stream(url, body), clients, requests)
    latencies, firsts = [r[0] for r in results], [r[1] for r in results]
    return {"requests": len(results), "errors": sum(not r[3] for r in results),
            "requests_per_s": len(results) / elapsed,
            "tokens_per_s": sum(r[2] for r in results) / elapsed,
            "p50_ms": percentile_ms(latencies, 0.5), "p99_ms": percentile_ms(latencies, 0.99),
            "ttft_p50_ms": percentile_ms(firsts, 0.5), "ttft_p99_ms": percentile_ms(firsts, 0.99)}


def start_server(args, port, ready_url, env=None):
    server = subprocess.Popen([sys.executable, "-m", "algpt2_tf.cli", "serve", *args,
                               "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # --engine litert builds its engine first (90 s for algpt2)
    while True:
        try:
            urllib.request.urlopen(ready_url, timeout=2).read()
            return server
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise SystemExit("the server did not start")
            time.sleep(0.2)


def main_openai(args):
    from algpt2_tf import ALGPT2Config, ALGPT2LMHeadModel

    report = {"preset": args.preset, "clients": args.clients, "litert_quantize": args.quantize,
              "requests_per_client": args.requests, "max_new_tokens": args.max_new_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        ALGPT2LMHeadModel(ALGPT2Config.from_preset(args.preset)).save(path)
        body = {"model": "model", "prompt": "The quick brown fox", "stream": True,
                "max_tokens": args.max_new_tokens, "temperature": 1.0, "seed": 0,
                "stream_options": {"include_usage": True}}
        modes = [("unbatched", ["--engine", "xla", "--no-batching"]),
                 ("batched", ["--engine", "xla"])]
        if args.litert:
            modes.append(("litert", ["--engine", "litert", "--quantize", args.quantize]))
        env = dict(os.environ, ALGPT2_CACHE=os.path.join(tmp, "cache"))
        for mode, extra in modes:
            port = free_port()
            server = start_server(["--model", path, *extra], port,
                                  f"http://127.0.0.1:{port}/v1/models", env)
            try:
                url = f"http://127.0.0.1:{port}/v1/completions"
                run_openai(url, body, args.clients, 1)  # compile every batch shape first
                report[mode] = run_openai(url, body, args.clients, args.requests)
            finally:
                server.terminate()
                server.wait(30)
    report["batched_vs_unbatched_tokens_per_s"] = (report["batched"]["tokens_per_s"]
                                                   / report["unbatched"]["tokens_per_s"])
    report["batched_vs_unbatched_p99"] = report["batched"]["p99_ms"] / report["unbatched"]["p99_ms"]
    if args.litert:
        report["litert_vs_unbatched_tokens_per_s"] = (report["litert"]["tokens_per_s"]
                                                      / report["unbatched"]["tokens_per_s"])
        report["litert_vs_unbatched_p99"] = (report["litert"]["p99_ms"]
                                             / report["unbatched"]["p99_ms"])
    report["cpu"] = cpu_info()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"{args.preset}, {args.clients} clients x {args.requests} streamed completions of "
          f"{args.max_new_tokens} tokens:\n")
    print("| serving | requests/s | tokens/s | p50 ms | p99 ms | TTFT p50 ms | TTFT p99 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, _ in modes:
        r = report[mode]
        print(f"| {mode} | {r['requests_per_s']:.1f} | {r['tokens_per_s']:.1f} | {r['p50_ms']:.0f} | "
              f"{r['p99_ms']:.0f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
              f"{r['errors']} |")
    print(f"\nbatched / unbatched: {report['batched_vs_unbatched_tokens_per_s']:.2f}x tokens/s, "
          f"p99 latency {report['batched_vs_unbatched_p99']:.2f}x")
    if args.litert:
        print(f"litert / xla unbatched: {report['litert_vs_unbatched_tokens_per_s']:.2f}x "
              f"tokens/s, p99 latency {report['litert_vs_unbatched_p99']:.2f}x")
    return 0 if all(report[mode]["errors"] == 0 for mode, _ in modes) else 1


def run(url, body, clients, requests):
    results, elapsed = load(lambda: post(url, body), clients, requests)
    latencies = [r[0] for r in results]
    return {"requests": len(results), "errors": sum(not r[1] for r in results),
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": percentile_ms(latencies, 0.99),
            "requests_per_s": len(results) / elapsed}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-base-path")
    parser.add_argument("--model-name")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--openai", action="store_true",
                        help="the OpenAI-compatible API, batching on and off")
    parser.add_argument("--preset", default="algpt2-tiny", help="--openai: the served model")
    parser.add_argument("--litert", action="store_true",
                        help="--openai: also --engine litert (one request at a time)")
    parser.add_argument("--quantize", choices=ENGINE_QUANTIZATIONS, default="none",
                        help="--litert: the LiteRT build's weights")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.openai:
        args.out = args.out or os.path.join(HERE, "results", f"serve_openai_{args.preset}.json")
        return main_openai(args)
    args.out = args.out or os.path.join(HERE, "results", "serve_load.json")
    with tempfile.TemporaryDirectory() as tmp:
        base, name = ((args.model_base_path, args.model_name) if args.model_base_path
                      else export_small_model(tmp))
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1/models/{name}"
        server = start_server(["--model-base-path", base, "--model-name", name], port, url)
        try:
            cases = {
                "serving_default": {"inputs": {"input_ids": [[464, 2068]],
                                               "attention_mask": [[1, 1]]}},
                "generate": {"signature_name": "generate", "inputs": {
                    "prompts": ["The quick brown fox"], "max_new_tokens": args.max_new_tokens,
                    "temperature": 1.0, "top_k": 1, "top_p": 1.0, "seed": 0}},
            }
            report = {k: run(url + ":predict", body, args.clients, args.requests)
                      for k, body in cases.items()}
        finally:
            server.terminate()
            server.wait(30)
    report["clients"], report["requests_per_client"] = args.clients, args.requests
    report["cpu"] = cpu_info()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print("| signature | requests | errors | p50 ms | p99 ms | requests/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for k in cases:
        r = report[k]
        print(f"| {k} | {r['requests']} | {r['errors']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['requests_per_s']:.1f} |")
    return 0 if all(report[k]["errors"] == 0 for k in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
