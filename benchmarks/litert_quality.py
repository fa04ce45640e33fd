"""LiteRT int8 and int4 builds against the float32 build of a trained model: held-out
perplexity and greedy agreement.

    python benchmarks/litert_quality.py --model algpt2-pd-books \
        --spec experiments/books_pretrained.json --out benchmarks/results/litert_quality_NAME

Builds the model's LiteRT engine three ways (`tflite.convert` with quantize "none", "int8",
"int4"; batch 1, a cache of `min(256, max_positions)`), scores the spec's held-out sets
through each build's `logits` signature with the spec's windows (`evaluation.sliding_windows`,
`losses.token_nll`: the numbers `algpt2 evaluate` gives the Keras model), greedy-decodes the
spec's generation prompts through each build's cached steps (`LiteRTDecoder`) and counts the
tokens equal to the float32 build's (the XLA path's own). Writes OUT.json and OUT.md.
Issue 20's bar for a quantization: token perplexity within 2% of float32.
"""

import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from algpt2_tf.export.formats import ENGINE_QUANTIZATIONS as QUANTIZATIONS  # noqa: E402
from benchmarks.case_process import write_results  # noqa: E402
from benchmarks.int8_quality import greedy_agreement, quality_inputs  # noqa: E402


def held_out(logits_runner, tokenizer, texts, seq_len, stride):
    """`evaluation.nll_metrics` of `texts` through a `logits` signature runner."""
    import numpy as np
    from keras import ops

    from algpt2_tf.evaluation import nll_metrics, sliding_windows
    from algpt2_tf.losses import token_nll

    total_nll = total_tokens = 0.0
    for text in texts:
        for ids, labels in sliding_windows(tokenizer.encode(text), seq_len, stride):
            row = np.asarray([ids], np.int32)
            logits = logits_runner(input_ids=row, attention_mask=np.ones_like(row))["logits"]
            nll, weight = token_nll(np.asarray([labels]), logits)
            total_nll += float(ops.sum(nll))
            total_tokens += float(ops.sum(weight))
    return nll_metrics(total_nll, total_tokens, texts)


def main():
    args, spec, texts = quality_inputs(__doc__.splitlines()[0])

    from ai_edge_litert.interpreter import Interpreter

    from algpt2_tf.causal_lm import ALGPT2LMHeadModel
    from algpt2_tf.export.litert import LiteRTDecoder
    from algpt2_tf.export.tflite import convert
    from algpt2_tf.runtime.cpu_info import cpu_info
    from algpt2_tf.saving import load_tokenizer_for, resolve_model_path

    prompts = spec.generation["prompts"]
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer_for(path)
    model = ALGPT2LMHeadModel.from_preset(path)
    max_length = min(256, model.config.max_positions)
    result = {"model": args.model, "spec": args.spec, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "cpu": cpu_info(), "greedy_steps": args.steps, "prompts": prompts,
              "seq_len": spec.eval_seq_len, "stride": spec.eval_stride, "builds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for quantize in QUANTIZATIONS:
            build = os.path.join(tmp, f"{quantize}.tflite")
            with open(build, "wb") as f:
                f.write(convert(model, max_length, quantize))
            runner = Interpreter(model_path=build).get_signature_runner("logits")
            decoder = LiteRTDecoder(build, os.path.join(tmp, f"{quantize}.cache"))
            result["builds"][quantize] = {
                "bytes": os.path.getsize(build),
                "held_out": {name: held_out(runner, tokenizer, docs, spec.eval_seq_len,
                                            spec.eval_stride) for name, docs in texts.items()},
                "greedy": [decoder.greedy(tokenizer.encode(p), args.steps) for p in prompts]}
            print(f"{quantize}: {result['builds'][quantize]['held_out']}", file=sys.stderr)
    builds = result["builds"]
    for quantize in QUANTIZATIONS[1:]:
        builds[quantize]["greedy_agreement"] = greedy_agreement(builds["none"]["greedy"],
                                                                builds[quantize]["greedy"])
        builds[quantize]["ratios"] = {
            name: builds[quantize]["held_out"][name]["token_perplexity"]
            / builds["none"]["held_out"][name]["token_perplexity"] for name in texts}
    cpu = result["cpu"]
    lines = [f"LiteRT builds of `{args.model}` (batch 1, {max_length}-slot cache), held-out sets "
             f"of `{args.spec}` (windows of {spec.eval_seq_len}, stride {spec.eval_stride}); "
             f"{cpu['vendor']} family {cpu['family']} model {cpu['model']}, {result['date']}.",
             "", "| set | float32 token ppl | int8 token ppl | int8 / float32 | int4 token ppl | "
             "int4 / float32 |", "|---|---:|---:|---:|---:|---:|"]
    for name in texts:
        ppl = {q: builds[q]["held_out"][name]["token_perplexity"] for q in QUANTIZATIONS}
        lines.append(f"| {name} | {ppl['none']:.3f} | {ppl['int8']:.3f} | "
                     f"{builds['int8']['ratios'][name]:.4f} | {ppl['int4']:.3f} | "
                     f"{builds['int4']['ratios'][name]:.4f} |")
    lines += ["", f"Greedy tokens identical to the float32 build ({len(prompts)} prompts x "
              f"{args.steps} tokens): int8 {builds['int8']['greedy_agreement']:.1%}, int4 "
              f"{builds['int4']['greedy_agreement']:.1%}. Build sizes: "
              + ", ".join(f"{'float32' if q == 'none' else q} {builds[q]['bytes'] / 1e6:.2f} MB"
                          for q in QUANTIZATIONS) + ".", ""]
    write_results(args.out, result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
