"""Data-parallel training: how `algpt2 train --distribute` runs on several devices or hosts.

- "none": the default device.
- "mirrored" (TensorFlow): `tf.distribute.MirroredStrategy` over the devices
  of this host: the first `replicas` GPUs, or, with no GPU, the CPU split
  into `replicas` logical devices (for trying it and for tests: on a CPU it
  adds no compute).
- "jax-data-parallel" (JAX backend): `keras.distribution.DataParallel` over
  every device of every process. Several processes (one per host, or
  `algpt2 launch` on one machine) meet through `jax.distributed.initialize`
  at a coordinator: `--coordinator HOST:PORT --num-processes N --process-id
  I`, or the environment variables `ALGPT2_COORDINATOR`,
  `ALGPT2_NUM_PROCESSES`, `ALGPT2_PROCESS_ID`.

Multi-host TensorFlow (`MultiWorkerMirroredStrategy`) is refused with the
reason: Keras 3's `fit` does not run under it (`MULTI_WORKER_FINDING`).

The global batch (`--batch-size`) is the user's unit: batch `s` stays a
function of `(seed, s)`, so a resume stays exact, and each replica reads its
own slice of every global batch (a `tf.distribute` strategy slices it; with
several JAX processes, `Distributed.local_batches` keeps this process's
rows). Each replica's loss is its share of the global batch's loss
(`ALGPT2Backbone.compute_loss`; under JAX the step sees the global batch
at once), so the summed gradient is the global batch's gradient.

Variables are replicated, so checkpoints and `model.keras` are written once,
by the chief (process 0): `Distributed.is_chief`, `from_chief`.
"""

import contextlib
import dataclasses
import os
import sys
import threading

import numpy as np

STRATEGIES = ("none", "mirrored", "jax-data-parallel")

MULTI_WORKER_FINDING = (
    "--distribute multi-worker (tf.distribute.MultiWorkerMirroredStrategy) does not work with "
    "Keras 3's fit (Keras 3.15, keras-team/keras#20585): the TensorFlow trainer reduces the whole "
    "dict batch across workers in _maybe_symbolic_build (ValueError: unsupported type (dict)), "
    "and each step's scalar logs with strategy.reduce(..., axis=0) in reduce_per_replica "
    "(ValueError: Invalid reduction dimension 0 for input with 0 dimensions). Train across "
    "hosts with --backend jax --distribute jax-data-parallel (see `algpt2 launch`).")

ENVIRONMENT = {"coordinator": "ALGPT2_COORDINATOR", "num_processes": "ALGPT2_NUM_PROCESSES",
               "process_id": "ALGPT2_PROCESS_ID"}

DEFAULT_CONNECT_TIMEOUT = 300
"""Seconds a process waits for the others to join (JAX's own default) before it fails."""


def check(kind, replicas):
    """Raises a `ValueError` naming the problem with `--distribute` / `--replicas`."""
    if kind == "multi-worker":
        raise ValueError(MULTI_WORKER_FINDING)
    if kind not in STRATEGIES:
        raise ValueError(f"--distribute must be one of {', '.join(STRATEGIES)}, got {kind!r}.")
    if replicas is not None and (not isinstance(replicas, int) or replicas < 1):
        raise ValueError(f"--replicas must be a positive integer, got {replicas!r}.")
    if kind != "mirrored" and replicas not in (None, 1):
        raise ValueError("--replicas needs --distribute mirrored.")


@dataclasses.dataclass
class Cluster:
    """Where the processes of a JAX run meet: the coordinator and this process's place."""

    coordinator: str = None
    num_processes: int = 1
    process_id: int = 0
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    @classmethod
    def resolve(cls, coordinator=None, num_processes=None, process_id=None,
                connect_timeout=None, environ=None):
        """The cluster from the flags, each missing one from `ALGPT2_*` in `environ`.

        Raises:
            ValueError: a value that is not a number, a process id outside
                `[0, num_processes)`, or several processes with no coordinator.
        """
        environ = os.environ if environ is None else environ
        given = {"coordinator": coordinator, "num_processes": num_processes,
                 "process_id": process_id}
        for name, variable in ENVIRONMENT.items():
            if given[name] is None and environ.get(variable):
                given[name] = environ[variable]
        for name in ("num_processes", "process_id"):
            value = given[name]
            if value is not None:
                try:
                    given[name] = int(value)
                except ValueError:
                    raise ValueError(f"--{name.replace('_', '-')} / {ENVIRONMENT[name]} must be "
                                     f"an integer, got {value!r}.") from None
        cluster = cls(given["coordinator"], given["num_processes"] or 1, given["process_id"] or 0,
                      DEFAULT_CONNECT_TIMEOUT if connect_timeout is None else connect_timeout)
        if cluster.num_processes < 1:
            raise ValueError(f"--num-processes must be positive, got {cluster.num_processes}.")
        if not 0 <= cluster.process_id < cluster.num_processes:
            raise ValueError(f"--process-id {cluster.process_id} is outside 0..."
                             f"{cluster.num_processes - 1} (--num-processes "
                             f"{cluster.num_processes}).")
        if cluster.num_processes > 1 and not cluster.coordinator:
            raise ValueError(f"{cluster.num_processes} processes need a coordinator: "
                             "--coordinator HOST:PORT or ALGPT2_COORDINATOR.")
        if cluster.connect_timeout <= 0:
            raise ValueError(f"--connect-timeout must be positive, got {cluster.connect_timeout}.")
        return cluster


@dataclasses.dataclass
class Distributed:
    """How this process takes part in a training run.

    `start(...)` makes it. `strategy` is the `tf.distribute` strategy
    ("mirrored") or None; `process_id` / `num_processes` are this process's
    place among the JAX processes (0 / 1 without several).
    """

    kind: str = "none"
    strategy: object = None
    process_id: int = 0
    num_processes: int = 1

    @property
    def is_chief(self):
        """Whether this process writes the run's files (process 0)."""
        return self.process_id == 0

    def scope(self):
        """The strategy's scope (variables made in it are mirrored), or a no-op."""
        return scope(self.strategy)

    def from_chief(self, compute):
        """Runs `compute()` (which returns a non-negative int) on the chief alone;
        every process returns the chief's result.

        When `compute` raises on the chief, it raises there and every other
        process raises a `ValueError` saying so, instead of waiting for it.
        """
        if self.num_processes == 1:
            return compute()
        from jax.experimental import multihost_utils  # deferred: imports JAX

        result = 0
        if self.is_chief:
            try:
                result = int(compute())
            except BaseException:
                multihost_utils.broadcast_one_to_all(np.int64(-1))
                raise
        shared = int(multihost_utils.broadcast_one_to_all(np.int64(result)))
        if shared < 0:
            raise ValueError("Process 0 (the chief) stopped the run; its output says why.")
        return shared

    def local_batches(self, dataset, batch_size):
        """This process's rows of every global batch of `dataset` (all of them with one process)."""
        if self.num_processes == 1 or dataset is None:
            return dataset
        import tensorflow as tf  # deferred: imports TensorFlow

        rows = batch_size // self.num_processes
        first = self.process_id * rows
        return dataset.map(lambda batch: tf.nest.map_structure(
            lambda t: t[first:first + rows], batch))

    def to_numpy(self, value):
        """A variable's (or array's) value as numpy; replicated JAX arrays that span
        other processes give this process's copy."""
        import keras  # deferred: imports Keras

        value = getattr(value, "value", value)
        if not getattr(value, "is_fully_addressable", True):
            value = value.addressable_data(0)
        return np.asarray(keras.ops.convert_to_numpy(value))

    def finish(self):
        """Leaves the Keras distribution, so models made next are plain local ones."""
        if self.kind == "jax-data-parallel":
            import keras  # deferred: imports Keras

            keras.distribution.set_distribution(None)


def make_strategy(kind, replicas=None):
    """The `tf.distribute` strategy for "mirrored", or None for "none".

    Call it before TensorFlow runs anything when it has to split the CPU
    (logical devices can only be configured before the runtime starts).
    """
    check(kind, replicas)
    if kind != "mirrored":
        return None
    import tensorflow as tf  # deferred: imports TensorFlow

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


def start(kind, replicas=None, cluster=None, batch_size=None):
    """Starts this process's part of a run under `kind`; returns its `Distributed`.

    For "jax-data-parallel" with several processes this joins the others
    (`jax.distributed.initialize`, which must come before JAX computes
    anything) and sets Keras' `DataParallel` distribution. Call
    `Distributed.finish()` when the run is done.

    Raises:
        ValueError: bad options, "jax-data-parallel" off the JAX backend, or a
            global `batch_size` the processes cannot share evenly.
    """
    check(kind, replicas)
    cluster = cluster or Cluster()
    if kind != "jax-data-parallel":
        if cluster.num_processes > 1 or cluster.coordinator:
            raise ValueError("--coordinator, --num-processes and --process-id need "
                             "--distribute jax-data-parallel.")
        return Distributed(kind, strategy=make_strategy(kind, replicas))
    import keras  # deferred: imports Keras

    if keras.backend.backend() != "jax":
        raise ValueError(f"--distribute jax-data-parallel needs the JAX backend (this run uses "
                         f"{keras.backend.backend()}): run it with --backend jax.")
    if batch_size is not None and batch_size % cluster.num_processes:
        raise ValueError(f"--batch-size {batch_size} (the global batch) must divide evenly among "
                         f"{cluster.num_processes} processes.")
    if cluster.num_processes > 1:
        _join(cluster)
    import jax  # deferred: imports JAX

    keras.distribution.set_distribution(keras.distribution.DataParallel(
        devices=jax.devices(), auto_shard_dataset=False))  # local_batches shards
    return Distributed(kind, process_id=jax.process_index(), num_processes=jax.process_count())


def _join(cluster):
    """`jax.distributed.initialize`, failing with a clear message after `connect_timeout`.

    JAX aborts the process (a C++ fatal error and a stack trace) when the
    others do not come; a timer says why first and exits with status 2.
    """
    import jax  # deferred: imports JAX

    message = (f"algpt2 train: error: process {cluster.process_id} of {cluster.num_processes} "
               f"could not meet the others at the coordinator {cluster.coordinator} within "
               f"{cluster.connect_timeout:g} s. Start every process with the same --coordinator "
               f"and --num-processes, and a different --process-id.\n")

    def give_up():
        sys.stderr.write(message)
        sys.stderr.flush()
        os._exit(2)  # JAX's connecting thread cannot be interrupted

    timer = threading.Timer(cluster.connect_timeout, give_up)
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(
            cluster.coordinator, cluster.num_processes, cluster.process_id,
            initialization_timeout=int(cluster.connect_timeout) + 60,
            heartbeat_timeout_seconds=max(10, int(cluster.connect_timeout)))
    finally:
        timer.cancel()
