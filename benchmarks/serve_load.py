#!/usr/bin/env python3
"""Load benchmark of `algpt2 serve`: concurrent clients against both signatures.

Starts the server on a free loopback port over an exported SavedModel folder
(default: a fresh export of a small random model), runs `--clients` threads x
`--requests` requests of each signature, and prints p50/p99 latency and
requests/s per signature (reported, not asserted).

    python benchmarks/serve_load.py [--model-base-path saved_models/NAME --model-name NAME]
"""

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def run(url, body, clients, requests):
    def client(_):
        return [post(url, body) for _ in range(requests)]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for batch in pool.map(client, range(clients)) for r in batch]
    elapsed = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    return {"requests": len(results), "errors": sum(not r[1] for r in results),
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
            "requests_per_s": len(results) / elapsed}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-base-path")
    parser.add_argument("--model-name")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "serve_load.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base, name = ((args.model_base_path, args.model_name) if args.model_base_path
                      else export_small_model(tmp))
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "algpt2_tf.cli", "serve",
                                   "--model-base-path", base, "--model-name", name,
                                   "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}/v1/models/{name}"
            deadline = time.time() + 120
            while True:
                try:
                    urllib.request.urlopen(url, timeout=2).read()
                    break
                except OSError:
                    if time.time() > deadline or server.poll() is not None:
                        raise SystemExit("the server did not start")
                    time.sleep(0.2)
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
