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

    from algpt2_tf.experiments.quality import opening_prompts
    opening_prompts(["First paragraph has enough words to be used here.\\n\\n" * 3],
                    count=2, words=4, min_words=5)
"""

import math

import numpy as np


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
    import keras

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
