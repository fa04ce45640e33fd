"""Data-parallel training: the strategies `algpt2 train --distribute` runs under (TensorFlow).

- "none": the default device.
- "mirrored": `tf.distribute.MirroredStrategy` over the devices of this host:
  the first `replicas` GPUs, or, with no GPU, the CPU split into `replicas`
  logical devices (for trying it and for tests: on a CPU it adds no compute).

The global batch (`--batch-size`) is the user's unit: Keras distributes the
dataset with the strategy, so each replica reads its own slice of every
global batch, batch `s` stays a function of `(seed, s)` and a resume stays
exact. Each replica returns its share of the global batch's loss
(`ALGPT2LMHeadModel.compute_loss`: its tokens over all replicas' tokens, via
`backend.sum_over_replicas`), so the strategy's sum of the replicas'
gradients is the global batch's gradient. Variables live on every replica
and are read as one value, so checkpoints and `model.keras` are written
once, as without a strategy.
"""

import contextlib

STRATEGIES = ("none", "mirrored")


def check(kind, replicas):
    """Raises a `ValueError` naming the problem with `--distribute` / `--replicas`."""
    if kind not in STRATEGIES:
        raise ValueError(f"--distribute must be one of {', '.join(STRATEGIES)}, got {kind!r}.")
    if replicas is not None and (not isinstance(replicas, int) or replicas < 1):
        raise ValueError(f"--replicas must be a positive integer, got {replicas!r}.")
    if kind == "none" and replicas not in (None, 1):
        raise ValueError("--replicas needs --distribute mirrored.")


def make_strategy(kind, replicas=None):
    """The `tf.distribute` strategy for `kind`, or None for "none".

    Call it before TensorFlow runs anything when it has to split the CPU
    (logical devices can only be configured before the runtime starts).
    """
    check(kind, replicas)
    if kind == "none":
        return None
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        count = replicas or len(gpus)
        if count > len(gpus):
            raise ValueError(f"--replicas {count}: this host has {len(gpus)} GPU(s).")
        return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(count)])
    count = replicas or 1
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:  # (listing the logical devices would start the runtime: configure first)
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        running = len(tf.config.list_logical_devices("CPU"))
        if running != count:
            raise ValueError(f"--replicas {count} on the CPU must be set before TensorFlow "
                             f"starts (it already runs with {running} CPU device(s)).") from None
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(count)])


def scope(strategy):
    """`strategy.scope()`, or a no-op context for no strategy."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()
