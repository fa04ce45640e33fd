"""Surface statistics of generated text: diversity and repetition.

Perplexity says how well a model predicts text; these say what its own text
looks like. They count whitespace-separated words, so they do not depend on
the tokenizer. Their limits: they reward variety, not sense (random words
score a perfect distinct-n), and they are only comparable between models
sampled with the same prompts, lengths and sampler.

Example:
>>> stats = text_metrics(["the cat sat", "the cat ran and the cat sat"])
>>> stats["distinct_1"], stats["distinct_2"]  # 5 distinct of 10 words, 5 of 8 word pairs
(0.5, 0.625)
>>> stats["repeated_4gram_fraction"]  # "the cat ran and" ... "and the cat sat": none repeats
0.0
"""

from collections import Counter


def ngrams(words, n):
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts, n):
    """Distinct n-grams over all n-grams of all texts (Li et al., 2016); 0 if there are none."""
    grams = [g for text in texts for g in ngrams(text.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_fraction(texts, n=4):
    """The share of n-grams that already occurred earlier in the same text
    (pooled over the texts): how much a model loops on itself."""
    repeated = total = 0
    for text in texts:
        seen = Counter()
        for gram in ngrams(text.split(), n):
            repeated += seen[gram] > 0
            seen[gram] += 1
            total += 1
    return repeated / total if total else 0.0


def text_metrics(continuations, lengths_in_tokens=None):
    """distinct-1/2/3, the repeated 4-gram fraction and the mean length of continuations.

    Args:
        continuations: the generated texts (without their prompts).
        lengths_in_tokens: the number of generated tokens of each, if known.
    """
    result = {f"distinct_{n}": distinct_n(continuations, n) for n in (1, 2, 3)}
    result["repeated_4gram_fraction"] = repeated_ngram_fraction(continuations, 4)
    result["mean_length_words"] = (sum(len(t.split()) for t in continuations)
                                   / max(len(continuations), 1))
    if lengths_in_tokens is not None:
        result["mean_length_tokens"] = sum(lengths_in_tokens) / max(len(lengths_in_tokens), 1)
    return result
