"""Prompt batches for generation: the checks every entry point makes, left padding, and
what every generation path returns (`GenerationOutput`)."""

import dataclasses
from typing import List, Optional

import numpy as np


@dataclasses.dataclass
class GenerationOutput:
    """`text`: prompt + continuation per row (when prompts were strings);
    `ids`: prompt + new ids per row; `new_ids`: the new ids alone (the stop
    token included when one was emitted)."""

    ids: List[List[int]]
    new_ids: List[List[int]]
    text: Optional[List[str]] = None


def check_prompts(prompts, vocab_size):
    """Token-id prompts as lists of ints; an error naming the problem if one is empty or out of range."""
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts:
        raise ValueError("No prompts given.")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("A prompt is empty; give at least one token (e.g. <|endoftext|>).")
    if any(not 0 <= t < vocab_size for p in prompts for t in p):
        raise ValueError(f"Prompt token ids must be in [0, {vocab_size}).")
    return prompts


def check_max_new_tokens(max_new_tokens):
    """An error naming `max_new_tokens` unless it is a positive integer."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")


def check_fits(prompt_len, max_new_tokens, max_positions):
    """An error naming the three numbers when the prompt and its new tokens exceed the context."""
    if prompt_len + max_new_tokens > max_positions:
        raise ValueError(f"The prompt ({prompt_len} tokens) plus max_new_tokens "
                         f"({max_new_tokens}) exceeds max_positions ({max_positions}).")


def left_pad(prompts, width=None, pad_id=0):
    """`(ids, mask)`, int32 `[batch, width]`: each prompt right-aligned, `mask` 1 on its tokens.

    Args:
        prompts: lists of token ids.
        width: the padded length (default: the longest prompt).
        pad_id: the id in the padding slots (the mask hides them).

    Example:
    >>> left_pad([[5, 6, 7], [8]])[0].tolist()
    [[5, 6, 7], [0, 0, 8]]
    """
    width = width or max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = prompt
            mask[row, width - len(prompt):] = 1
    return ids, mask
