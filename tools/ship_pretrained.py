"""Ships a trained experiment arm as a pretrained model of the package, with its model card.

    python tools/ship_pretrained.py --spec experiments/books_pretrained.json \
        --run experiments/runs/books_pretrained --arm algpt2_books --baseline gpt2_teacher \
        --name algpt2-pd-books

Copies the arm's `model.keras` and tokenizer into `algpt2_tf/pretrained_models/NAME/`,
evaluates the model (and its Keras int8 form) on the experiment's held-out sets with the
experiment's protocol, measures the small held-out slices that `tests/test_pretrained.py`
re-measures, and writes `evaluation.json` and `MODEL_CARD.md` from those figures and the
run's `result.json`. Rerunning it reproduces the card's numbers.

    python tools/ship_pretrained.py --spec experiments/books_pretrained.json \
        --recard algpt2-pd-books --eval-spec experiments/scaling.json \
        --compare experiments/runs/scaling:gpt2_lamb_16x,algpt2_factorized_16x,shared_mlp672_16x

`--recard NAME` measures the model already shipped as NAME again (its run's weights need not
exist any more; its training facts come from its `evaluation.json`) and rewrites its card;
with `--run RUN --baseline ARM` it measures that arm's model in RUN (an experiment folder that
has its weights) on the same sets, else the card keeps the baseline's recorded figures.
`--eval-spec` takes the held-out sets and protocol from another experiment (the scaling
experiment's add WritingPrompts); `--compare RUN:ARM,...` adds those arms' figures from that
experiment's results (the same sets and protocol) to the card's table.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SLICE_TOKENS = 4096
"""Tokens of each held-out set that the CI check evaluates (`tests/test_pretrained.py`)."""
SLICE_PROTOCOL = dict(seq_len=128, stride=64, batch_size=32)


def best_run(run, arm):
    """`(result, run folder)` of `arm`'s run with the lowest validation loss (the sweep's rule)."""
    from algpt2_tf.experiments.report import best_by_valid_loss, load_results
    from algpt2_tf.experiments.runner import run_dir_name

    results = [r for r in load_results(run)[1] if r["arm"] == arm]
    if not results:
        raise SystemExit(f"{run} has no finished run of arm {arm!r} (no result.json).")
    best = best_by_valid_loss(results)
    return best, os.path.join(run, "arms", arm, run_dir_name(best["learning_rate"], best["seed"]))


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def checked_spec(path, run):
    """The spec at `path`, which the experiment folder `run` must have run."""
    from algpt2_tf.experiments.spec import load_spec

    spec = load_spec(path)
    with open(os.path.join(run, "spec.json")) as f:
        if json.load(f) != spec.source:
            raise SystemExit(f"{run} ran another spec than {path}.")
    return spec


def figures_from_run(args, spec):
    """The training facts of `args.arm`'s best run, and the folder its model is in."""
    result, run_dir = best_run(args.run, args.arm)
    baseline = best_run(args.run, args.baseline)[0] if args.baseline else None
    return {"name": args.name, "arm": args.arm, "run": os.path.relpath(run_dir),
            "spec": args.spec, "experiment": args.run, "baseline_arm": args.baseline,
            "training_tokens": result["training_tokens"], "steps": result["steps"],
            "tokens_per_second": result["tokens_per_second"],
            "train_seconds_estimate": result["training_tokens"] / result["tokens_per_second"],
            "resumed_from_step": result.get("resumed_from_step", 0), "hardware": cpu_name(),
            "baseline": baseline and {"arm": args.baseline, "parameters": baseline["parameters"],
                                      "eval": baseline["eval"]},
            "compress": result.get("compress"), "samples": result.get("samples"),
            "generation": spec.generation}, run_dir


def compared(entries):
    """Rows of other experiments' arms (`RUN:ARM,ARM`): `[{label, parameters, eval}]`."""
    rows = []
    for entry in entries or []:
        run, _, arms = entry.partition(":")
        for arm in filter(None, arms.split(",")):
            result = best_run(run, arm)[0]
            rows.append({"label": f"`{arm}` ({os.path.basename(os.path.normpath(run))} "
                                  f"experiment, {result['training_tokens']:,} tokens)",
                         "arm": arm, "experiment": run, "parameters": result["parameters"],
                         "eval": result["eval"]})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="the experiment's spec file")
    parser.add_argument("--run", help="the experiment folder it ran in")
    parser.add_argument("--arm", help="the arm to ship")
    parser.add_argument("--baseline", help="an arm to compare with in the card")
    parser.add_argument("--name", help="the pretrained model's name")
    parser.add_argument("--recard", metavar="NAME",
                        help="measure the shipped model NAME again and rewrite its card")
    parser.add_argument("--eval-spec", help="take the held-out sets and protocol from this "
                                            "spec (default: --spec)")
    parser.add_argument("--compare", nargs="+", metavar="RUN:ARM,ARM",
                        help="more arms for the card's table, from another experiment folder")
    args = parser.parse_args()
    if args.recard is None and not (args.run and args.arm and args.name):
        parser.error("ship with --run, --arm and --name, or rewrite a card with --recard NAME")

    import keras

    from algpt2_tf.evaluation import evaluate_texts
    from algpt2_tf.experiments.runner import held_out_metrics, held_out_texts
    from algpt2_tf.experiments.spec import load_spec
    from algpt2_tf.pretrained import PRETRAINED_DIR, evaluation, held_out_slice, pretrained_dir
    from algpt2_tf.causal_lm import ALGPT2LMHeadModel
    from algpt2_tf.saving import load_model, load_tokenizer_for

    if args.recard:
        spec = load_spec(args.spec)
        figures = {k: v for k, v in evaluation(args.recard).items()
                   if k not in ("eval", "int8_eval", "ci_slice", "ci_slices", "compared",
                                "compare_args",
                                "protocol", "eval_spec", "greedy", "config", "parameters",
                                "file_bytes")}
        figures.setdefault("spec", args.spec)
        model_dir = pretrained_dir(args.recard)
        args.name = args.recard
        if args.baseline:
            if not args.run:
                parser.error("--recard with --baseline ARM needs --run, the folder ARM ran in")
            result, baseline_dir = best_run(args.run, args.baseline)
            figures["baseline"] = {"arm": args.baseline, "parameters": result["parameters"],
                                   "experiment": args.run, "run": os.path.relpath(baseline_dir)}
    else:
        spec = checked_spec(args.spec, args.run)
        figures, model_dir = figures_from_run(args, spec)
    eval_spec = load_spec(args.eval_spec) if args.eval_spec else spec
    texts = held_out_texts(eval_spec)
    tokenizer = load_tokenizer_for(model_dir)
    model = load_model(model_dir, ALGPT2LMHeadModel)
    figures.update(
        parameters=int(model.count_params()), config=model.config.to_dict(),
        eval_spec=args.eval_spec or args.spec,
        eval=held_out_metrics(eval_spec, model, tokenizer, texts),
        protocol={"seq_len": eval_spec.eval_seq_len, "stride": eval_spec.eval_stride},
        compared=compared(args.compare), compare_args=args.compare or [])
    if (figures.get("baseline") or {}).get("run"):  # --recard --run --baseline: measured here
        baseline = load_model(figures["baseline"]["run"], ALGPT2LMHeadModel)
        figures["baseline"]["eval"] = held_out_metrics(
            eval_spec, baseline, load_tokenizer_for(figures["baseline"]["run"]), texts)
        del baseline
    figures["ci_slices"] = {}
    for name, documents in texts.items():
        slice_text = held_out_slice(documents, tokenizer, SLICE_TOKENS)
        ci = evaluate_texts(model, tokenizer, [slice_text], verbose=0, **SLICE_PROTOCOL)
        figures["ci_slices"][name] = {"max_tokens": SLICE_TOKENS, **SLICE_PROTOCOL,
                                      "token_perplexity": ci["token_perplexity"],
                                      "tokens": ci["tokens"]}
    first = next(iter(texts))
    figures["ci_slice"] = {"set": first, **figures["ci_slices"][first]}
    prompt = figures["generation"]["prompts"][0]
    figures["greedy"] = {"prompt": prompt, "max_new_tokens": 24, "text": model.generate(
        [prompt], max_new_tokens=24, sampler="greedy", tokenizer=tokenizer).text[0]}
    model.quantize("int8")
    figures["int8_eval"] = held_out_metrics(eval_spec, model, tokenizer, texts)

    final = os.path.join(PRETRAINED_DIR, args.name)
    os.makedirs(PRETRAINED_DIR, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{args.name}-", dir=PRETRAINED_DIR)
    shutil.copy(os.path.join(model_dir, "model.keras"), os.path.join(staging, "model.keras"))
    tokenizer.save(os.path.join(staging, "tokenizer"))
    figures["file_bytes"] = os.path.getsize(os.path.join(staging, "model.keras"))
    with open(os.path.join(staging, "evaluation.json"), "w") as f:
        json.dump(figures, f, indent=2)
    with open(os.path.join(staging, "MODEL_CARD.md"), "w") as f:
        f.write(model_card(figures, spec, eval_spec))
    os.chmod(staging, 0o755)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(staging, final)
    keras.backend.clear_session()
    print(f"Shipped {args.name} -> {final}")
    return 0


def _row(label, params, ev, sets):
    cells = []
    for name in sets:
        entry = ev.get(name)
        cells += ([f"{entry['word_perplexity']:,.2f}", f"{entry['bits_per_byte']:.4f}"] if entry
                  else ["not measured", "-"])
    return f"| {label} | {params:,} | " + " | ".join(cells) + " |"


def model_card(f, spec, eval_spec):
    c = f["config"]
    experiment = f.get("experiment") or f["run"].split(os.sep + "arms" + os.sep)[0]
    baseline_arm = f.get("baseline_arm") or (f["baseline"] or {}).get("arm")
    sets = list(f["eval"])
    train_names = [os.path.basename(s.path) for s in spec.train_files]
    eval_names = {name: [os.path.basename(s.path) + (f" (articles {s.wikitext_articles[0]:.0%}-"
                                                     f"{s.wikitext_articles[1]:.0%})"
                                                     if s.wikitext_articles else "")
                         for s in sources] for name, sources in eval_spec.eval_sets.items()}
    rows = [_row(f"**{f['name']}** (float32)", f["parameters"], f["eval"], sets),
            _row(f"{f['name']}, Keras int8", f["parameters"], f["int8_eval"], sets)]
    if f["baseline"]:
        rows.append(_row(f"GPT-2 shape, same data and tokens (`{f['baseline']['arm']}`)",
                         f["baseline"]["parameters"], f["baseline"]["eval"], sets))
    rows += [_row(r["label"], r["parameters"], r["eval"], sets) for r in f.get("compared", [])]
    header = ("| model | parameters | " + " | ".join(f"{n} word ppl | {n} bits/byte" for n in sets)
              + " |\n|---|---:|" + "---:|---:|" * len(sets))
    slices = "; ".join(f"{name} {v['token_perplexity']:.4f} on its first {v['tokens']:,} scored "
                       f"tokens" for name, v in f["ci_slices"].items())
    gpt2_params = max([r["parameters"] for r in f.get("compared", [])]
                      + ([f["baseline"]["parameters"]] if f["baseline"] else []), default=0)
    small = [r for r in f.get("compared", []) if r["parameters"] <= 0.3 * gpt2_params]
    if small:
        better = {n: [f"`{r['arm']}`" for r in small if n in r["eval"] and
                      r["eval"][n]["word_perplexity"] < f["eval"][n]["word_perplexity"]]
                  for n in sets}
        rows_note = ("\n\nCompared models within 30% of GPT-2's parameters with a lower word perplexity "
                     "than this model: " + "; ".join(f"{n}: {', '.join(v) or 'none'}"
                                                    for n, v in better.items()) + ".")
    else:
        rows_note = ""
    missing = [n for n in sets if f["baseline"] and n not in f["baseline"]["eval"]]
    note = (f" The GPT-2-shape model of the same data and tokens was not measured on "
            f"{', '.join(missing)} (its weights were not kept); the rows after it are models of the "
            f"experiments named, measured on these sets with this protocol." if missing else "")
    samples = f.get("samples") or []
    g = f["generation"]
    sample_lines = [f"- *{s['prompt']}* → {' '.join(s['continuation'].split())}" for s in samples]
    hours = f["train_seconds_estimate"] / 3600
    init = (f"compressed (`{f['compress']['init']}`) from the GPT-2-shape model below, trained "
            f"first on the same tokens; then trained as an ALGPT2" if f.get("compress")
            else "random (trained from scratch)")
    return f"""# {f['name']}

A small ALGPT2 language model of 19th-century-style English prose, trained by this project's own
code on public-domain books and part of WikiText-2. It is a books model: it is not GPT-2 and
knows little beyond its {f['training_tokens']:,} training tokens.

## Model details
- Architecture: ALGPT2 (`algpt2_tf.ALGPT2LMHeadModel`): {c['num_layers']} virtual layers that
  share {c['num_layer_groups']} decoder block(s) (ALBERT cross-layer sharing), hidden
  {c['hidden_size']}, {c['num_heads']} heads, MLP {c['intermediate_size']}, factorized
  embedding E={c['embedding_size']}, tied softmax, per-layer LayerNorms: {c['per_layer_norms']},
  context {c['max_positions']} tokens. {f['parameters']:,} parameters; `model.keras` is
  {f['file_bytes'] / 1e6:.1f} MB (float32).
- Tokenizer: byte-level BPE with {c['vocab_size']:,} ids, trained on the training files
  (`tokenizer/`).
- Initialization: {init}.
- Code license: MIT (this repository). Weights: trained on the data below; the WikiText-2 share
  is CC BY-SA 3.0 text, so treat the weights as a derivative of it.
- Load it: `ALGPT2LMHeadModel.from_preset("{f['name']}")`, or `--model {f['name']}` in any command.

## Training data
- Training: {len(train_names)} sources: the first 60% of the WikiText-2 validation articles
  (CC BY-SA 3.0, Merity et al. 2016) and {len(train_names) - 1} Project Gutenberg books (public
  domain in the US): {', '.join(n for n in train_names if n != 'wiki.valid.raw')}.
- Held out (never trained on): {'; '.join(f"{k}: {', '.join(v)}" for k, v in eval_names.items())}.

## Training procedure
- Command (trains the GPT-2-shape model, compresses it, trains the ALGPT2; resumes when rerun):
  `algpt2 experiment run {f['spec']} --out {experiment}`,
  then `python tools/ship_pretrained.py --spec {f['spec']} --run {experiment} --arm {f['arm']}
  --baseline {baseline_arm} --name {f['name']}`; this card: `python tools/ship_pretrained.py
  --spec {f['spec']} --recard {f['name']} --eval-spec {f['eval_spec']}{
  f" --run {f['baseline']['experiment']} --baseline {baseline_arm}"
  if (f['baseline'] or {}).get('run') else ''}{
  ' --compare ' + ' '.join(f['compare_args']) if f['compare_args'] else ''}`.
- {f['steps']:,} steps of {spec.batch_size} x {spec.seq_len} tokens = {f['training_tokens']:,}
  tokens seen by the ALGPT2 (and as many by the GPT-2-shape model it was compressed from);
  AdamW, cosine schedule, the spec's learning rate.
- Hardware: {f['hardware']}, 2 CPU cores, no GPU, shared with other work. Training time:
  about {hours:.1f} h for the ALGPT2 ({f['tokens_per_second']:,.0f} tokens/s
  {'in its last resumed segment' if f['resumed_from_step'] else 'measured'}).

## Evaluation
Held-out sets, windows of {f['protocol']['seq_len']} tokens with stride {f['protocol']['stride']}
(word perplexity is per whitespace-separated word, comparable across tokenizers).{note}

{header}
{chr(10).join(rows)}{rows_note}

CI check (`tests/test_pretrained.py`), token perplexity of each held-out set: {slices}.

## Samples
Greedy, `{f['greedy']['prompt']}` ({f['greedy']['max_new_tokens']} tokens, as printed):

```
{f['greedy']['text']}
```

Sampled during evaluation (top-p {g.get('top_p')}, temperature {g.get('temperature')},
seed {g.get('seed')}, {g.get('max_new_tokens')} tokens):

{chr(10).join(sample_lines)}

## Intended use and limitations
- For trying the toolkit right after install (generation, serving, export, conversion), for
  tests, and as a starting point for fine-tuning on similar prose.
- Small and briefly trained: text drifts after a sentence or two, facts are unreliable, and it
  writes in the register of its books (old spelling, archaic topics, their biases).
- Not for any decision about people, not a chat model, not instruction-tuned.
"""


if __name__ == "__main__":
    sys.exit(main())
