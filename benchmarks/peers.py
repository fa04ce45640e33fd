"""Decode speed against the engines CPU users pick for GPT-2, in one run.

    python benchmarks/peers.py [--rounds 3] [--quick] [--match TEXT ...] [--out PATH]

Greedy decoding of a 16-token prompt and 128 new tokens (the prefill counted), batch 1 and
batch 8, of the `gpt2` and `algpt2` presets (random weights: speed does not depend on their
values), each case in a fresh process with one warm-up run, the cases alternating, the
median of `--rounds` rounds:

- ours, Keras/XLA float32 and Keras int8 (`bench.py`'s decode worker, all cores);
- ours, LiteRT float32, int8 and int4 (the TFLite export, a build of as many rows as the batch and
  the 256-slot cache `engine="litert"` builds, made once per run, through LiteRT's
  `CompiledModel` with the caches bound in place; `bench.py`'s worker);
- CTranslate2 int8 and float32 of what `algpt2 convert --to-hf` makes of the model (an
  expanded GPT-2: its only way to run an ALGPT2), `intra_threads` = cores, its own
  quantization (`[peers]` extra);
- ONNX Runtime float32, int8 and int4 of the same HF export: one decode step with a KV cache
  exported by `torch.onnx` (the usual exporter, `optimum-onnx`, pins transformers 4.x), the
  int8 model by ONNX Runtime's `quantize_dynamic`, the int4 one by its `MatMulNBitsQuantizer`
  (symmetric, blocks of 128, `accuracy_level=4`: int8 products, its fastest on CPU; blocks of
  32 decoded `gpt2` 20% slower on Zen 4) after the export's `Gemm`s are written as `MatMul`
  + `Add` (the quantizer takes `MatMul` only; left as `Gemm`, GPT-2's projections stayed
  float32); all graph optimizations, intra-op threads = cores, the cache fed back as NumPy
  arrays (`[peers]` extra);
- keras-hub's GPT-2 (`gpt2` only: keras-hub has no ALGPT2).

A peer that is not installed is skipped with a line saying so.
Writes `benchmarks/results/peers_<cpu>.{json,md}` with the CPU and the load average before
and after. `--quick`: tiny shapes, batch 1, one round (the slow tier's smoke test; not a measurement).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks import bench  # noqa: E402
from benchmarks.case_process import RESULTS, run_in_process, write_results  # noqa: E402

PROMPT, NEW = 16, 128
QUICK_PROMPT, QUICK_NEW = 4, 8
LITERT_CACHE = 256  # the cache length of `engine="litert"` builds of both presets


def peer_available(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


# ------------------------------------------------------------------ CTranslate2
def hf_folder(preset, quick, out):
    """`algpt2 convert --to-hf` of the preset with random weights (with `quick`, resized as
    `bench.py` resizes it)."""
    from algpt2_tf.convert import to_hf
    from algpt2_tf.tokenizer import GPT2Tokenizer

    model = bench._our_model(preset, bench.TINY, quick)
    to_hf(model, out, GPT2Tokenizer())
    return out


def hf_export(preset, quick, root):
    """`root/hf-PRESET`, the HF export every peer runs (made once per run)."""
    hf = os.path.join(root, f"hf-{preset}")
    if not os.path.isdir(hf):
        hf_folder(preset, quick, hf)
    return hf


def ct2_folder(preset, quantization, quick, root):
    """The CTranslate2 model of the preset's HF export (made once per run)."""
    out = os.path.join(root, f"ct2-{preset}-{quantization}")
    if not os.path.isdir(out):
        import ctranslate2.converters

        ctranslate2.converters.TransformersConverter(hf_export(preset, quick, root)).convert(
            out, quantization=quantization)
    return out


def worker_ct2(case):
    """Greedy decode with `ctranslate2.Generator` (compute type = the model's quantization)."""
    import ctranslate2
    import numpy as np

    path = os.path.join(case["path"], "vocabulary.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            vocabulary = json.load(f)
    else:  # older converters: one token per line
        with open(os.path.join(case["path"], "vocabulary.txt"), encoding="utf-8") as f:
            vocabulary = f.read().split("\n")
    rng = np.random.default_rng(0)
    prompts = [[vocabulary[i] for i in row]
               for row in rng.integers(0, 50000, (case["batch"], case["prompt"]))]
    generator = ctranslate2.Generator(case["path"], device="cpu",
                                      compute_type=case["quantization"],
                                      intra_threads=os.cpu_count())

    def run():
        return generator.generate_batch(prompts, max_length=case["new_tokens"],
                                        min_length=case["new_tokens"], sampling_topk=1,
                                        include_prompt_in_result=False)

    run()  # warm-up
    start = time.perf_counter()
    results = run()
    seconds = time.perf_counter() - start
    made = sum(len(r.sequences_ids[0]) for r in results)
    return {"tokens_per_s": made / seconds, "tokens": made, "peak_rss_mb": bench.peak_rss_mb()}


# ------------------------------------------------------------------ ONNX Runtime
def onnx_file(preset, quantization, quick, root):
    """The ONNX model (one decode step with a KV cache) of the preset's HF export, made once
    per run with `torch.onnx`; int8 and int4: ONNX Runtime's own quantizations of it."""
    out = os.path.join(root, f"onnx-{preset}-{quantization}.onnx")
    if os.path.exists(out):
        return out
    if quantization == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(gemm_as_matmul(onnx_file(preset, "float32", quick, root)),
                                         bits=4, block_size=128, is_symmetric=True,
                                         accuracy_level=4)
        quantizer.process()
        quantizer.model.save_model_to_file(out, use_external_data_format=False)
        return out
    if quantization == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(onnx_file(preset, "float32", quick, root), out,
                         weight_type=QuantType.QInt8)
        return out
    export_onnx_step(hf_export(preset, quick, root), out)
    return out


def gemm_as_matmul(path):
    """The ONNX model at `path` with each `Gemm` of a constant weight (`torch.onnx` writes
    GPT-2's projections as `Gemm`) written as `MatMul` + `Add`, the same products, reading
    the weight itself where the export passed it through an `Identity` (the expanded ALGPT2's
    layers share their weights); as `onnx.ModelProto`."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(path)
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    aliases = {node.output[0]: node.input[0] for node in model.graph.node
               if node.op_type == "Identity" and node.input[0] in weights}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = aliases.get(node.input[1], node.input[1]) if len(node.input) > 1 else None
        if (node.op_type != "Gemm" or weight not in weights or attrs.get("transA", 0)
                or attrs.get("transB", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        product = node.output[0] + "/matmul"
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product],
                                      name=node.name + "/matmul"))
        if len(node.input) > 2:
            nodes.append(helper.make_node("Add", [product, node.input[2]], list(node.output),
                                          name=node.name + "/add"))
        else:
            nodes[-1].output[0] = node.output[0]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def export_onnx_step(hf, out):
    """Exports the HF GPT-2 in `hf` as one step: (input_ids, past keys and values of every layer)
    -> (the last position's logits, the keys and values with this step's appended)."""
    import torch
    from transformers import DynamicCache, GPT2LMHeadModel

    lm = GPT2LMHeadModel.from_pretrained(hf, attn_implementation="eager").eval()
    layers, heads = lm.config.n_layer, lm.config.n_head
    head_dim = lm.config.n_embd // heads

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, *past):
            cache = DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.lm(input_ids=input_ids, past_key_values=cache, use_cache=True,
                          logits_to_keep=1)
            kept = out.past_key_values.layers
            return (out.logits[:, -1], *[t for layer in kept for t in (layer.keys, layer.values)])

    past_names = [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    present_names = [f"present_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    example = (torch.zeros((1, 2), dtype=torch.long),
               *[torch.zeros((1, heads, 3, head_dim)) for _ in past_names])
    axes = {"input_ids": {0: "batch", 1: "new"}, "logits": {0: "batch"}}
    axes.update({name: {0: "batch", 2: "past"} for name in past_names})
    axes.update({name: {0: "batch", 2: "total"} for name in present_names})
    with torch.no_grad():
        torch.onnx.export(Step(), example, out, input_names=["input_ids", *past_names],
                          output_names=["logits", *present_names], dynamic_axes=axes,
                          opset_version=17, dynamo=False)


def worker_ort(case):
    """Greedy decode with an ONNX Runtime session (all graph optimizations, intra-op threads
    = cores), the KV cache fed back step by step."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = os.cpu_count()
    session = ort.InferenceSession(case["path"], options, providers=["CPUExecutionProvider"])
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_")]
    heads, head_dim = past_inputs[0].shape[1], past_inputs[0].shape[3]
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 50000, (case["batch"], case["prompt"])).astype(np.int64)

    def run():
        feed = {i.name: np.zeros((case["batch"], heads, 0, head_dim), np.float32)
                for i in past_inputs}
        ids, made = prompt, 0
        for _ in range(case["new_tokens"]):
            logits, *present = session.run(None, {"input_ids": ids, **feed})
            ids = logits.argmax(-1)[:, None].astype(np.int64)
            feed = dict(zip(feed, present))
            made += ids.size
        return made

    run()  # warm-up
    start = time.perf_counter()
    made = run()
    seconds = time.perf_counter() - start
    return {"tokens_per_s": made / seconds, "tokens": made, "peak_rss_mb": bench.peak_rss_mb()}


# ------------------------------------------------------------------ the plan
def plan(quick, batches=(1, 8)):
    """`[(label, case)]`: every case of the table, in the order a round runs them."""
    prompt, new = (QUICK_PROMPT, QUICK_NEW) if quick else (PROMPT, NEW)
    cases = []
    for preset in ("algpt2", "gpt2"):
        for batch in (1,) if quick else batches:
            common = dict(prompt=prompt, new_tokens=new, batch=batch, quick=quick)
            cases.append((f"{preset} b{batch} | ours Keras/XLA float32",
                          dict(common, kind="decode", model=preset)))
            cases.append((f"{preset} b{batch} | ours Keras int8",
                          dict(common, kind="decode", model=f"{preset}-int8")))
            for quantize in ("none", "int8", "int4"):  # a build of `batch` rows
                name = "float32" if quantize == "none" else quantize
                # The cache `engine="litert"` builds (`min(256, max_positions)` slots), not
                # one sized to the request: the cache's slots cost time at every step.
                cases.append((f"{preset} b{batch} | ours LiteRT {name}",
                              dict(common, kind="tflite_decode", model=preset,
                                   quantize=quantize, runtime="compiled",
                                   max_length=None if quick else LITERT_CACHE)))
            for quantization in ("int8", "float32"):
                cases.append((f"{preset} b{batch} | CTranslate2 {quantization} (HF export)",
                              dict(common, kind="ct2", preset=preset,
                                   quantization=quantization)))
            for quantization in ("int4", "int8", "float32"):
                cases.append((f"{preset} b{batch} | ONNX Runtime {quantization} (HF export)",
                              dict(common, kind="ort", preset=preset,
                                   quantization=quantization)))
            if preset == "gpt2":
                cases.append((f"{preset} b{batch} | keras-hub GPT-2",
                              dict(common, kind="decode", model="peer")))
    return cases


def run_case(case, root):
    if case["kind"] == "ct2":
        path = ct2_folder(case["preset"], case["quantization"], case["quick"], root)
        return run_in_process(__file__, dict(case, path=path))
    if case["kind"] == "ort":
        path = onnx_file(case["preset"], case["quantization"], case["quick"], root)
        return run_in_process(__file__, dict(case, path=path))
    if case["kind"] == "tflite_decode":  # built once per run, as the peers' exports
        path = os.path.join(root, f"litert-{case['model']}-b{case['batch']}-{case['quantize']}"
                                  ".tflite")
        if not os.path.exists(path):
            bench.measure(dict(case, kind="tflite_build", path=path))
        return bench.measure(dict(case, kind="tflite_run", path=path))
    return bench.measure(case)


def cpu_slug(cpu):
    return (f"{cpu['vendor'].lower().replace('authentic', '').replace('genuine', '')}_"
            f"f{cpu['family']}m{cpu['model']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round")
    parser.add_argument("--match", action="append",
                        help="only the cases whose label contains this text (repeat: any of them)")
    parser.add_argument("--out", help="results path without extension (default: "
                                      "benchmarks/results/peers_<cpu>)")
    parser.add_argument("--batches", default="1,8",
                        help="the batch sizes, comma-separated (default 1,8)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one peer's case
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        print(json.dumps((worker_ct2 if case["kind"] == "ct2" else worker_ort)(case)))
        return
    from algpt2_tf.runtime.cpu_info import cpu_info

    cpu = cpu_info()
    rounds = 1 if args.quick else args.rounds
    skipped = []
    batches = tuple(int(b) for b in args.batches.split(","))
    cases = [(label, case) for label, case in plan(args.quick, batches)
             if not args.match or any(text in label for text in args.match)]
    for module, kind, why in (("ctranslate2", "ct2", "pip install -e '.[peers]'"),
                              ("onnxruntime", "ort", "pip install -e '.[peers]'"),
                              ("onnx", "ort", "pip install -e '.[peers]'"),
                              ("onnx_ir", "ort", "pip install -e '.[peers]'"),
                              ("torch", "ort", "the export runs through torch.onnx"),
                              ("keras_hub", "peer", "pip install keras-hub")):
        if not peer_available(module):
            skipped.append(f"{module} is not installed ({why}): its cases are skipped")
            cases = [(label, case) for label, case in cases
                     if case["kind"] != kind and case.get("model") != kind]
    for line in skipped:
        print(f"peers.py: {line}", file=sys.stderr)
    load_before = os.getloadavg()
    found = {label: [] for label, _ in cases}
    rss = {}
    root = tempfile.mkdtemp(prefix="algpt2-peers-")
    try:
        for r in range(rounds):
            for label, case in cases:
                result = run_case(case, root)
                found[label].append(result["tokens_per_s"])
                rss[label] = max(rss.get(label, 0), result.get("peak_rss_mb", 0))
                print(f"round {r + 1}: {label}: {result['tokens_per_s']:.1f} tokens/s",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()
    rows = {label: {"tokens_per_s": runs, "median": statistics.median(runs),
                    "peak_rss_mb": rss[label], "case": case}
            for (label, case) in cases for runs in [found[label]]}
    report = {"prompt_tokens": cases[0][1]["prompt"] if cases else None,
              "new_tokens": cases[0][1]["new_tokens"] if cases else None, "rounds": rounds,
              "quick": args.quick, "cpu": cpu, "load_average_before": load_before,
              "load_average_after": load_after, "skipped": skipped, "cases": rows}
    write_results(args.out or os.path.join(RESULTS, f"peers_{cpu_slug(cpu)}"), report,
                  markdown(rows, report))


def markdown(rows, report):
    cpu = report["cpu"]
    lines = [f"# Decode speed against the peers (greedy, {report['prompt_tokens']}-token prompt, "
             f"{report['new_tokens']} new tokens)", "",
             f"CPU: {cpu['vendor']} {cpu['model_name']} family {cpu['family']} model "
             f"{cpu['model']}, {cpu['logical_cpus']} logical CPUs; load average (1, 5, 15 min) "
             f"{', '.join(f'{x:.2f}' for x in report['load_average_before'])} before, "
             f"{', '.join(f'{x:.2f}' for x in report['load_average_after'])} after; median of "
             f"{report['rounds']} round(s), a fresh process per case, cases alternating."
             + (" QUICK: tiny shapes, a smoke test, not a measurement." if report["quick"] else ""),
             "", "| model, batch | engine | tokens/s (median) | runs | x fastest peer | peak RSS MB |",
             "|---|---|---:|---|---:|---:|"]
    for label, row in rows.items():
        group, engine = label.split(" | ")
        peers = [r["median"] for other, r in rows.items()
                 if other.startswith(group + " |") and "ours" not in other]
        ratio = f"{row['median'] / max(peers):.2f}" if peers else "-"
        lines.append(f"| {group} | {engine} | {row['median']:.1f} | "
                     f"{', '.join(f'{v:.1f}' for v in row['tokens_per_s'])} | {ratio} | "
                     f"{row['peak_rss_mb']:.0f} |")
    lines += [""] + [f"- {line}" for line in report["skipped"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
