"""Keras int8 against float32 on a trained model: held-out perplexity, greedy agreement, size.

    python benchmarks/int8_quality.py --model RUN_OR_KERAS --spec experiments/SPEC.json \
        --out benchmarks/results/int8_quality_NAME

Evaluates the model twice on the spec's held-out sets with the spec's protocol (the float32
model as saved, then `model.quantize("int8")`), greedy-decodes the spec's generation prompts
with both and counts identical tokens, and writes OUT.json and OUT.md. Issue 20's bar: token
perplexity within 2% of float32.
"""

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks.case_process import write_results  # noqa: E402


def greedy(model, tokenizer, prompts, steps):
    ids = [tokenizer.encode(p) for p in prompts]
    return [model.generate([i], max_new_tokens=steps, stop_ids=[]).new_ids[0] for i in ids]


def keras_bytes(model):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.keras")
        model.save(path)
        return os.path.getsize(path)


def quality_inputs(description):
    """A quantization-quality script's command line (this one's, `litert_quality.py`'s), and
    the spec and held-out texts it names: `(args, spec, {set: documents})`."""
    from algpt2_tf.experiments.runner import held_out_texts
    from algpt2_tf.experiments.spec import load_spec

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="a run folder or .keras file (float32)")
    parser.add_argument("--spec", required=True, help="the experiment spec of its held-out sets")
    parser.add_argument("--steps", type=int, default=48, help="greedy tokens per prompt")
    parser.add_argument("--out", required=True, help="output path without extension")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    return args, spec, held_out_texts(spec)


def greedy_agreement(reference, other):
    """The share of greedy tokens of `other` (a list of continuations) equal to
    `reference`'s at the same place."""
    pairs = [(a, b) for f, q in zip(reference, other) for a, b in zip(f, q)]
    return sum(a == b for a, b in pairs) / len(pairs)


def main():
    args, spec, texts = quality_inputs(__doc__.splitlines()[0])

    from algpt2_tf.experiments.runner import held_out_metrics
    from algpt2_tf.causal_lm import ALGPT2LMHeadModel
    from algpt2_tf.saving import load_model, load_tokenizer_for

    prompts = spec.generation["prompts"]
    tokenizer = load_tokenizer_for(args.model)
    model = load_model(args.model, ALGPT2LMHeadModel)
    result = {"model": args.model, "spec": args.spec, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "greedy_steps": args.steps, "prompts": prompts}
    for name in ("float32", "int8"):
        if name == "int8":
            model.quantize("int8")
        result[name] = {"held_out": held_out_metrics(spec, model, tokenizer, texts),
                        "greedy": greedy(model, tokenizer, prompts, args.steps),
                        "keras_bytes": keras_bytes(model)}
    result["greedy_agreement"] = greedy_agreement(result["float32"]["greedy"],
                                                  result["int8"]["greedy"])
    result["ratios"] = {name: result["int8"]["held_out"][name]["token_perplexity"]
                        / result["float32"]["held_out"][name]["token_perplexity"]
                        for name in texts}
    lines = [f"Keras int8 vs float32: `{args.model}`, held-out sets of `{args.spec}`.", "",
             "| set | float32 token ppl | int8 token ppl | int8 / float32 | float32 bits/byte | "
             "int8 bits/byte |", "|---|---:|---:|---:|---:|---:|"]
    for name in texts:
        f, q = result["float32"]["held_out"][name], result["int8"]["held_out"][name]
        lines.append(f"| {name} | {f['token_perplexity']:.3f} | {q['token_perplexity']:.3f} | "
                     f"{result['ratios'][name]:.4f} | {f['bits_per_byte']:.4f} | "
                     f"{q['bits_per_byte']:.4f} |")
    lines += ["", f"Greedy tokens identical to float32: {result['greedy_agreement']:.1%} "
              f"({len(prompts)} prompts x {args.steps} tokens). `.keras` size: "
              f"{result['float32']['keras_bytes'] / 1e6:.2f} MB float32, "
              f"{result['int8']['keras_bytes'] / 1e6:.2f} MB int8.", ""]
    write_results(args.out, result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
