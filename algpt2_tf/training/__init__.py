"""Training: options, the trainer, data, data parallelism, distillation and compression.

- `options.py`: `TrainOptions`, the options of a run and their defaults (no TensorFlow).
- `trainer.py`: `train` (optimizer, schedule, checkpoints, exact resume), a thin layer over `model.fit`.
- `data.py`: `tf.data` pipelines: files -> cached ids -> packed blocks / SOP pairs.
- `distribute.py`: data parallel, mirrored (TensorFlow, one host) or over JAX processes.
- `launch.py`: `algpt2 launch`, one data-parallel run as N local processes.
- `distillation.py`: the KL-to-a-teacher term and loading a teacher.
- `compression.py`: a trained model -> an ALGPT2 student (shared-block, SVD and low-rank-delta init).

Importing this package imports nothing.
"""
