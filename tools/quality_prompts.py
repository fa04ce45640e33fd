"""Prints the held-out prompts of the scaling experiment's quality step as JSON.

    python tools/quality_prompts.py [--data ../shared/data]

32 openings (10 words) of paragraphs of the two held-out books (16 each) and
32 of WritingPrompts stories (their first paragraph of 20 or more words):
`experiments/scaling.json`'s `generation.prompts` is this output.
"""

import argparse
import json
import os

from algpt2_tf.experiments.quality import opening_prompts
from algpt2_tf.experiments.runner import separated_documents

BOOKS = ("pd-books/carroll_alices-adventures-in-wonderland.txt", "pd-books/conrad_heart-of-darkness.txt")
STORIES = "writingprompts/writingprompts_train_stories.txt"


def quality_prompts(data):
    prompts = []
    for book in BOOKS:
        with open(os.path.join(data, book), encoding="utf-8") as f:
            prompts += opening_prompts([f.read()], 16, words=10, min_words=30)
    stories = separated_documents(os.path.join(data, STORIES), "<|endoftext|>")
    return prompts + opening_prompts(stories, 32, words=10, min_words=20, first_paragraph_only=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..",
                                                       "shared", "data"))
    print(json.dumps(quality_prompts(parser.parse_args().data), ensure_ascii=False, indent=2))
