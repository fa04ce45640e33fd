"""Generation: one sampler family and one decode step for every path.

- `generator.py`: the compiled (XLA) decode loop, `Generator`, `generate` and the public step API
  (`prefill`, `advance`, `sample_and_advance`, `grow_caches`) that the serving engine calls too.
- `host_loop.py`: the same loop on torch and JAX (a compiled step in a Python loop).
- `token_choice.py`: the sampler (greedy, temperature, top-k, top-p, repetition penalty) in `keras.ops`.
- `sampling.py`: `SamplingParams`, seeds, and the NumPy decode loop (`host_decode`) where a path has no tensors.
- `decode_tricks.py`: the decode loop's speed tricks, passed down as arguments (`DecodePlan`).
- `prompts.py`: prompt checks, left padding and `GenerationOutput` (no TensorFlow).

Importing this package imports nothing; `sampling` and `prompts` need no TensorFlow (the LiteRT engine uses them).
"""
