"""Runtime plumbing: the backend seam, TensorFlow start-up, XLA settings and caches, the CPU, files.

- `backend.py`: the seam to TensorFlow, torch or JAX (input checks in a graph, replicas).
- `tf_startup.py`: TensorFlow's start-up messages kept off the command line's screen.
- `xla_flags.py`: XLA settings for CPU speed, applied by an explicit call.
- `xla_cache.py`: XLA's compiled programs kept across processes, with a manifest of digests.
- `cpu_info.py`: the CPU's vendor, model, vector and matrix units and caches.
- `files.py`: the cache folder, input globs, atomic writes, digests.

Importing this package imports nothing.
"""
