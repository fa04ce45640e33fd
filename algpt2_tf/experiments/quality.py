"""Text quality at equal perplexity: held-out prompts, sampled continuations, judge scores.

A model's sampled text can be worse than another's at the same held-out
perplexity. This module gives the pieces of that comparison:

- `opening_prompts`: the first words of held-out paragraphs (books) or
  stories (WritingPrompts), chosen evenly through the text, so every arm of
  an experiment continues the same fixed prompts (the spec's `generation`).
- `generative_perplexity`: how likely a judge model finds a continuation
  given its prompt (the mean over continuation tokens, exponentiated). A
  judge rewards text that looks like its own training data; it is not a
  human rating, and a judge favours its own family, so use two judges of
  different families.

Example:

>>> text = "A first paragraph with enough words in it.\\n\\nA second one, also long enough."
>>> opening_prompts([text], count=2, words=3, min_words=5, span=(0, 1))
['A first paragraph', 'A second one,']
"""

import math
import os

import numpy as np

from algpt2_tf.experiments.report import best_by_valid_loss, load_results
from algpt2_tf.experiments.scaling import family_and_budget
from algpt2_tf.experiments.spec import load_spec
from algpt2_tf.runtime.files import atomic_path, atomic_write_json, atomic_write_text
from algpt2_tf.saving import load_model
from algpt2_tf.tokenizer import GPT2Tokenizer


def paragraphs(text):
    """The paragraphs of a text (blocks separated by blank lines), whitespace-joined."""
    blocks, current = [], []
    for line in text.split("\n"):
        if line.strip():
            current.append(line.strip())
        elif current:
            blocks.append(" ".join(current))
            current = []
    if current:
        blocks.append(" ".join(current))
    return blocks


def opening_prompts(documents, count, words=10, min_words=30, first_paragraph_only=False,
                    span=(0.1, 0.9)):
    """`count` prompts: the first `words` words of paragraphs of `documents`.

    Candidates are paragraphs of at least `min_words` words that start with a
    letter or a quote (not headings or license text), inside the `span` of
    each document (a share of its paragraphs; books' front and back matter
    lie outside), or only each document's first such paragraph
    (`first_paragraph_only`, for short stories). `count` of them are taken at
    evenly spaced positions of the candidate list, in order.

    Args:
        documents: texts.
        count: prompts to return.
        words: words per prompt.
        min_words: the shortest paragraph a prompt may open.
        first_paragraph_only: one candidate per document.
        span: `(start, end)` shares of each document's paragraphs.
    """
    candidates = []
    for document in documents:
        blocks = paragraphs(document)
        start, end = (int(round(f * len(blocks))) for f in span)
        found = []
        for block in blocks[start:end] if not first_paragraph_only else blocks:
            tokens = block.split()
            if (len(tokens) >= min_words and (block[0].isalpha() or block[0] in "\"'“‘`")
                    and "gutenberg" not in block.lower()):
                found.append(" ".join(tokens[:words]))
                if first_paragraph_only:
                    break
        candidates.extend(found)
    if len(candidates) < count:
        raise ValueError(f"Only {len(candidates)} paragraphs qualify as prompts; {count} wanted.")
    positions = np.linspace(0, len(candidates) - 1, count).round().astype(int)
    return [candidates[i] for i in positions]


def generative_perplexity(judge, tokenizer, prompts, continuations, batch_size=16):
    """The judge's perplexity of `continuations` given their `prompts`.

    Every continuation token is scored given the prompt and the tokens before
    it (the judge's context is cut to its last `max_positions` tokens);
    prompt tokens are not scored. Returns `{"perplexity", "tokens",
    "per_sample"}` (per_sample: each continuation's own perplexity).

    Args:
        judge: an `ALGPT2LMHeadModel`.
        tokenizer: the judge's tokenizer (shared by the sampled models).
        prompts: prompt texts.
        continuations: the sampled text after each prompt.
        batch_size: sequences per forward pass.
    """
    import keras  # deferred: imports Keras

    limit = judge.config.max_positions
    rows = []
    for prompt, continuation in zip(prompts, continuations):
        context, full = tokenizer.encode(prompt), tokenizer.encode(prompt + continuation)
        shared = next((i for i, (a, b) in enumerate(zip(context, full)) if a != b),
                      min(len(context), len(full)))  # where the continuation's tokens start
        drop = max(0, len(full) - limit)
        rows.append((full[drop:], max(1, shared - drop)))
    total, count, per_sample = 0.0, 0, []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = np.zeros((len(chunk), width), np.int32)
        mask = np.zeros((len(chunk), width), bool)
        for i, (row, _) in enumerate(chunk):
            ids[i, :len(row)] = row
            mask[i, :len(row)] = True
        logits = keras.ops.convert_to_numpy(judge({"input_ids": ids, "attention_mask": mask},
                                                  training=False)["logits"]).astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        for i, (row, scored_from) in enumerate(chunk):
            targets = np.asarray(row[scored_from:])
            if not len(targets):
                per_sample.append(float("nan"))
                continue
            nll = -log_probs[i, np.arange(scored_from - 1, len(row) - 1), targets]
            total += float(nll.sum())
            count += len(targets)
            per_sample.append(math.exp(float(nll.mean())))
    return {"perplexity": math.exp(total / count) if count else float("nan"), "tokens": count,
            "per_sample": per_sample}


def prompt_groups(prompts, eval_texts):
    """`{set name: [prompt indices]}`: each prompt belongs to the evaluation set whose text
    holds it (whitespace ignored), so its continuation is judged beside the sampled model's
    own perplexity on that set. Prompts found in no set are left out."""
    haystacks = {name: " ".join(" ".join(texts).split()) for name, texts in eval_texts.items()}
    groups = {}
    for i, prompt in enumerate(prompts):
        needle = " ".join(prompt.split())
        name = next((n for n, text in haystacks.items() if needle in text), None)
        if name is not None:
            groups.setdefault(name, []).append(i)
    return groups


def _judge_run_dir(out, results, arm):
    """The run folder of `arm` at its chosen rate (the best validation loss of its first seed)."""
    from algpt2_tf.experiments.runner import run_dir_name  # deferred: imports Keras

    runs = [r for r in results if r["arm"] == arm]
    if not runs:
        raise ValueError(f"The judge {arm!r} has no finished run in {out}.")
    first = min(r["seed"] for r in runs)
    best = best_by_valid_loss([r for r in runs if r["seed"] == first])
    path = os.path.join(out, "arms", arm, run_dir_name(best["learning_rate"], best["seed"]))
    if not os.path.exists(os.path.join(path, "model.keras")):
        raise FileNotFoundError(f"The judge {arm!r} has no model.keras in {path} (trained in "
                                "another checkout: rerun the experiment to rebuild it).")
    return path


def gaps_at_equal_perplexity(rows, judges, names, baseline, equal_on=None):
    """How much less likely each family's samples are than the baseline family's at the same
    own held-out perplexity, per judge and held-out set.

    The baseline family's runs give a line of log judge perplexity against log own word
    perplexity (piecewise linear through its runs, in order of own perplexity). A run of
    another family whose own perplexity lies within the baseline's range gets the ratio of
    its judge perplexity to the line's at its own perplexity (> 1: worse text at equal
    perplexity); runs outside the range are left out (no extrapolation). Per family: the
    geometric mean of its runs' ratios, their range, and how many runs.

    `equal_on` names one held-out set whose own perplexity is the axis for every set's
    samples (default: each set's own): a set whose own perplexity does not fall as a
    family trains (text no arm trains on can get worse with training) does not order runs
    by how trained they are, and is a poor axis for its own samples.

    Returns `{family: {judge: {set: {"ratio", "low", "high", "runs"}}}}`, a set left out
    when no run of the family falls within the baseline's range.

    Example:
    >>> rows = [{"family": "base", "own": {"s": own}, "judges": {"j": {"s": own / 10}}}
    ...         for own in (100, 1000)] + [{"family": "x", "own": {"s": 400},
    ...                                     "judges": {"j": {"s": 80.0}}}]
    >>> gap = gaps_at_equal_perplexity(rows, ["j"], ["s"], "base")["x"]["j"]["s"]
    >>> round(gap["ratio"], 6), gap["runs"]
    (2.0, 1)
    """
    base = [r for r in rows if r["family"] == baseline]
    gaps = {}
    for family in sorted({r["family"] for r in rows} - {baseline}):
        mine = [r for r in rows if r["family"] == family]
        for judge in judges:
            for name in names:
                axis = equal_on or name
                line = sorted((math.log(r["own"][axis]), math.log(r["judges"][judge][name]))
                              for r in base)
                if len(line) < 2:
                    continue
                xs, ys = zip(*line)
                ratios = [r["judges"][judge][name]
                          / math.exp(float(np.interp(math.log(r["own"][axis]), xs, ys)))
                          for r in mine if xs[0] <= math.log(r["own"][axis]) <= xs[-1]]
                if ratios:
                    gaps.setdefault(family, {}).setdefault(judge, {})[name] = {
                        "ratio": math.exp(sum(map(math.log, ratios)) / len(ratios)),
                        "low": min(ratios), "high": max(ratios), "runs": len(ratios)}
    return gaps


def judge_experiment(out, spec_path, judges, dest=None, log=print, baseline=None,
                     equal_on=None):
    """Scores every evaluated run's samples under each judge; writes `quality.json`,
    `quality.md` and `quality.png` into `dest` (default `out`); returns the rows.

    Args:
        out: the experiment folder (its runs sampled the spec's prompts).
        spec_path: the spec file (its evaluation sets tell which set each prompt opens).
        judges: arm names whose trained models score the text (two of different
            families, so no family only judges itself).
        dest: where the report goes.
        baseline: a family to compare every other family with at equal own perplexity
            (`gaps_at_equal_perplexity`), or None.
        equal_on: the held-out set whose own perplexity is that comparison's axis for every
            set's samples (default: each set's own).
    """
    from algpt2_tf.causal_lm import ALGPT2LMHeadModel  # deferred: imports TensorFlow, Keras
    from algpt2_tf.experiments.runner import held_out_texts  # deferred: imports Keras

    source, results = load_results(out)
    spec = load_spec(spec_path)
    if spec.source != source:
        raise ValueError(f"{spec_path} is not the spec {out} ran.")
    prompts = spec.generation["prompts"]
    groups = prompt_groups(prompts, held_out_texts(spec))
    if equal_on is not None and equal_on not in groups:
        raise ValueError(f"--equal-on {equal_on!r}: no prompt opens that held-out set; "
                         f"choose one of {', '.join(groups)}.")
    tokenizer = GPT2Tokenizer(os.path.join(out, "tokenizer"))
    runs = [r for r in results if r.get("samples")]
    rows = {(r["arm"], r["seed"], r["learning_rate"]): {
        "arm": r["arm"], "family": family_and_budget(r["arm"])[0], "seed": r["seed"],
        "tokens": r["training_tokens"], "parameters": r["parameters"],
        "own": {name: r["eval"][name]["word_perplexity"] for name in groups},
        "generation": r.get("generation"), "judges": {}} for r in runs}
    for judge in judges:
        model = load_model(_judge_run_dir(out, results, judge), ALGPT2LMHeadModel)
        log(f"Judging {len(runs)} runs' samples with {judge}")
        for r in runs:
            continuations = [s["continuation"] for s in r["samples"]]
            scores = {}
            for name, indices in groups.items():
                scores[name] = generative_perplexity(
                    model, tokenizer, [prompts[i] for i in indices],
                    [continuations[i] for i in indices])["perplexity"]
            rows[(r["arm"], r["seed"], r["learning_rate"])]["judges"][judge] = scores
    rows = sorted(rows.values(), key=lambda row: (row["family"], row["tokens"], row["seed"]))
    dest = dest or out
    os.makedirs(dest, exist_ok=True)
    gaps = (gaps_at_equal_perplexity(rows, judges, list(groups), baseline, equal_on)
            if baseline else {})
    atomic_write_json(os.path.join(dest, "quality.json"),
                      {"judges": list(judges), "groups": groups, "rows": rows,
                       "baseline": baseline, "equal_on": equal_on, "gaps": gaps})
    atomic_write_text(os.path.join(dest, "quality.md"),
                      quality_markdown(rows, judges, groups, runs, prompts, gaps, baseline,
                                       equal_on))
    quality_plot(rows, judges, list(groups), os.path.join(dest, "quality.png"))
    log(f"Quality report: {os.path.join(dest, 'quality.md')}")
    return rows


def quality_markdown(rows, judges, groups, runs, prompts, gaps=None, baseline=None,
                     equal_on=None, samples_per_arm=3):
    names = list(groups)
    header = ["arm", "seed", "train tokens"] + [f"own {n} word ppl" for n in names]
    for judge in judges:
        header += [f"{judge} on {n} samples" for n in names]
    header += ["distinct-1/2/3", "rep-4", "len"]
    lines = ["# Text quality at equal perplexity", "",
             "Generative perplexity: how likely a judge model finds each run's sampled "
             "continuations (top-p 0.9, fixed seed) of held-out prompts, grouped by the set the "
             "prompt opens, beside the run's own held-out word perplexity on that set. At equal "
             "own perplexity, a family whose samples the judges find less likely writes worse "
             "text by this measure. A judge rewards text like its own training data and is not "
             "a human rating; a judge also favours its own family, hence two judges of different "
             "families.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["arm"], str(row["seed"]), f"{row['tokens']:,}"]
        cells += [f"{row['own'][n]:,.1f}" for n in names]
        for judge in judges:
            cells += [f"{row['judges'][judge][n]:,.1f}" for n in names]
        g = row["generation"] or {}
        cells += [f"{g.get('distinct_1', 0):.2f}/{g.get('distinct_2', 0):.2f}/"
                  f"{g.get('distinct_3', 0):.2f}", f"{g.get('repeated_4gram_fraction', 0):.3f}",
                  f"{g.get('mean_length_tokens', 0):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if gaps:
        lines += ["", f"## At equal perplexity: judge perplexity relative to {baseline}", "",
                  f"Each run's judge perplexity over {baseline}'s line (log-log, through its runs) "
                  f"at the run's own held-out perplexity "
                  f"({'on ' + equal_on + ', for every set' if equal_on else 'on the set'}): above 1, the family's samples are less "
                  f"likely than {baseline}'s at the same perplexity. Geometric mean over the "
                  f"family's runs within {baseline}'s range of own perplexity (the range of the "
                  f"runs in brackets, their number after it); a judge favours its own family.", "",
                  "| family | " + " | ".join(f"{judge} on {n} samples" for judge in judges
                                             for n in names) + " |",
                  "|---|" + "---|" * (len(judges) * len(names))]
        for family, by_judge in gaps.items():
            cells = []
            for judge in judges:
                for n in names:
                    g = by_judge.get(judge, {}).get(n)
                    cells.append(f"{g['ratio']:.2f} ({g['low']:.2f}-{g['high']:.2f}, {g['runs']})"
                                 if g else "-")
            lines.append(f"| {family} | " + " | ".join(cells) + " |")
    picks = [indices[0] for indices in groups.values()]  # the first prompt of every set,
    last = list(groups.values())[-1] if groups else []  # and one from the middle of the last
    if len(last) > 1:
        picks.append(last[len(last) // 2])
    picks = picks[:samples_per_arm]
    lines += ["", f"## Samples ({len(picks)} prompts, every arm's first seed)", ""]
    for i in picks:
        lines += [f"**Prompt:** {prompts[i]}", "", "| arm | continuation |", "|---|---|"]
        seen = set()
        for r in sorted(runs, key=lambda r: (r["training_tokens"], r["arm"], r["seed"])):
            if r["arm"] in seen:
                continue
            seen.add(r["arm"])
            text = r["samples"][i]["continuation"].replace("\n", " ").replace("|", "\\|").strip()
            lines.append(f"| {r['arm']} | {text} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def quality_plot(rows, judges, names, path):
    import matplotlib  # deferred: imports matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: imports matplotlib

    fig, axes = plt.subplots(len(judges), len(names), figsize=(5 * len(names), 4 * len(judges)),
                             squeeze=False)
    families = sorted({r["family"] for r in rows})
    for j, judge in enumerate(judges):
        for k, name in enumerate(names):
            ax = axes[j][k]
            for i, family in enumerate(families):
                mine = sorted((r for r in rows if r["family"] == family),
                              key=lambda r: r["own"][name])
                ax.plot([r["own"][name] for r in mine],
                        [r["judges"][judge][name] for r in mine], "o-", color=f"C{i}",
                        label=family)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(f"own held-out word perplexity ({name})")
            ax.set_ylabel(f"{judge}'s perplexity of the samples")
            ax.set_title(f"{name} prompts, judged by {judge}", fontsize=9)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
