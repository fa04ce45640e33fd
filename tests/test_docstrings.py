"""Every docstring example in the package runs, and shows what it prints.

The serving client's example needs a live server: `test_serving.py` runs it.
"""

import doctest
import importlib

import numpy as np
import pytest

MODULES = [
    "algpt2_tf.config", "algpt2_tf.model", "algpt2_tf.causal_lm", "algpt2_tf.tokenizer",
    "algpt2_tf.generation.generator",
    "algpt2_tf.generation.prompts", "algpt2_tf.runtime.files", "algpt2_tf.experiments.text_metrics",
    "algpt2_tf.layers.adapter", "algpt2_tf.layers.attention", "algpt2_tf.layers.block",
    "algpt2_tf.layers.embedding", "algpt2_tf.layers.heads", "algpt2_tf.layers.linear",
    "algpt2_tf.export.litert", "algpt2_tf.convert.hf", "algpt2_tf.losses",
    "algpt2_tf.generation.host_loop", "algpt2_tf.serving.batching", "algpt2_tf.pretrained",
    "algpt2_tf.runtime.cpu_info", "algpt2_tf.generation.decode_tricks", "algpt2_tf.training.launch",
    "algpt2_tf.experiments.quality", "algpt2_tf.experiments.scaling", "algpt2_tf.generation.sampling",
    "algpt2_tf.generation.token_choice", "algpt2_tf.serving.litert_serving",
    "algpt2_tf.export.litert_engine", "algpt2_tf.runtime.xla_cache", "algpt2_tf.export.int4",
]


def run_examples(obj, name, extraglobs=None):
    """Runs the doctests of a module or object; returns how many examples ran."""
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(obj, name, extraglobs={"np": np, **(extraglobs or {})})
    for test in tests:
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} docstring example(s) of {name} failed (see above)"
    return sum(len(t.examples) for t in tests)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    assert run_examples(importlib.import_module(name), name) > 0


def test_every_module_with_examples_is_listed():
    import pkgutil

    import algpt2_tf

    with_examples = set()
    for info in pkgutil.walk_packages(algpt2_tf.__path__, "algpt2_tf."):
        module = importlib.import_module(info.name)
        if any(t.examples for t in doctest.DocTestFinder().find(module, info.name)):
            with_examples.add(info.name)
    assert with_examples - set(MODULES) == {"algpt2_tf.serving.client"}
