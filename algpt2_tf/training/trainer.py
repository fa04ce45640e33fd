"""Training: optimizer, schedule, callbacks and exact resume, a thin layer over `model.fit`.

A run lives in one directory:

    DIR/run.json           the options of the run (a rerun must match them)
    DIR/checkpoints/       ckpt-STEP.npz: model + optimizer variables, the last K kept
    DIR/metrics.csv        one row per logged step (`step` column first)
    DIR/logs/              TensorBoard event files
    DIR/model.keras        the final model

Rerunning the same command resumes from the newest checkpoint: weights,
optimizer state (with the step counter that drives the schedule) and the
data position (batches are a pure function of `(seed, step)`), so at most one
checkpoint interval is lost, even after `kill -9`. A checkpoint is written
to a temporary file and renamed, so a kill never leaves a torn one.
"""

import csv
import glob
import json
import math
import os
import re
import zipfile
from pydoc_data import topics

import keras
import numpy as np

from algpt2_tf.config import ALGPT2Config
from algpt2_tf.runtime import backend
from algpt2_tf.runtime.cpu_info import bf16_training_warning
from algpt2_tf.runtime.files import atomic_path, atomic_write_json, atomic_write_text, cache_root
from algpt2_tf.runtime.xla_flags import enable_elementwise_fusion
from algpt2_tf.saving import load_model
from algpt2_tf.tokenizer import GPT2Tokenizer
from algpt2_tf.training import data as data_lib
from algpt2_tf.training import distribute
from algpt2_tf.training.distillation import load_teacher
from algpt2_tf.training.options import DEFAULT_STEPS, TrainOptions  # noqa: F401  (re-exported)

NO_DECAY = ["gamma", "beta", "bias", "embeddings"]
"""Variable-name fragments excluded from weight decay: LayerNorm, biases, embeddings."""


@keras.saving.register_keras_serializable(package="algpt2_tf")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak`, then cosine or linear decay to `peak * min_ratio`.

    Args:
        peak: the learning rate after warmup.
        warmup_steps: steps of linear warmup from 0.
        total_steps: the step at which the decay ends.
        kind: "cosine", "linear" or "constant".
        min_ratio: the final learning rate as a fraction of `peak`.
    """

    def __init__(self, peak, warmup_steps, total_steps, kind="cosine", min_ratio=0.1):
        self.peak = peak
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.kind = kind
        self.min_ratio = min_ratio

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warmup = keras.ops.cast(max(self.warmup_steps, 1), "float32")
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = keras.ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        if self.kind == "cosine":
            shape = 0.5 * (1.0 + keras.ops.cos(math.pi * progress))
        elif self.kind == "linear":
            shape = 1.0 - progress
        else:
            shape = keras.ops.ones_like(progress)
        decayed = self.peak * (self.min_ratio + (1.0 - self.min_ratio) * shape)
        if self.warmup_steps == 0:
            return decayed
        return keras.ops.where(step < self.warmup_steps, self.peak * (step + 1.0) / warmup, decayed)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "kind": self.kind, "min_ratio": self.min_ratio}


class _ClippedAfterReplicaSum:
    """Makes `global_clipnorm` clip the gradient summed over `tf.distribute` replicas.

    Keras 3.15's TensorFlow optimizer clips each replica's part of the
    gradient (`_clip_gradients`) before summing the parts
    (`_all_reduce_sum_gradients`), so with clipping active two replicas did
    not train like one device (`tests/test_distributed.py`). Here the clip
    moves after the sum; with one replica nothing changes.
    """

    @classmethod
    def of(cls, optimizer_class):
        return type(optimizer_class.__name__, (cls, optimizer_class), {})

    def _clip_after_sum(self):
        return bool(self.global_clipnorm) and backend.replicas_in_sync() > 1

    def _clip_gradients(self, grads):
        return grads if self._clip_after_sum() else super()._clip_gradients(grads)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        grads_and_vars = super()._all_reduce_sum_gradients(grads_and_vars)
        if not self._clip_after_sum():
            return grads_and_vars
        grads = super()._clip_gradients([g for g, _ in grads_and_vars])  # Keras' own clip
        return list(zip(grads, [v for _, v in grads_and_vars]))


def make_optimizer(options, total_steps):
    """AdamW or LAMB with the warmup/decay schedule, global-norm clipping,
    gradient accumulation and weight decay off for LayerNorm, biases and embeddings."""
    schedule = WarmupDecay(options.learning_rate, options.warmup_steps, total_steps,
                           options.schedule, options.min_lr_ratio)
    kwargs = dict(learning_rate=schedule, weight_decay=options.weight_decay or None,
                  global_clipnorm=options.clip_norm,
                  gradient_accumulation_steps=options.grad_accum if options.grad_accum > 1 else None)
    base = keras.optimizers.AdamW if options.optimizer == "adamw" else keras.optimizers.Lamb
    optimizer = _ClippedAfterReplicaSum.of(base)(**kwargs)
    if options.weight_decay:
        optimizer.exclude_from_weight_decay(var_names=NO_DECAY)
    return optimizer


# ---------------------------------------------------------------- checkpoints
class CheckpointManager:
    """`ckpt-STEP.npz` files holding model and optimizer variables; the newest K are kept.

    Args:
        directory: where the checkpoints live.
        keep: how many of the newest to keep.
        write: False for the processes of a distributed run other than the
            chief: they read checkpoints and check their values, never write.
        to_numpy: how to read a variable (`Distributed.to_numpy`).
    """

    PATTERN = re.compile(r"ckpt-(\d+)\.npz$")

    def __init__(self, directory, keep=3, write=True, to_numpy=keras.ops.convert_to_numpy):
        self.directory = directory
        self.keep = keep
        self.write = write
        self.to_numpy = to_numpy
        if write:
            os.makedirs(directory, exist_ok=True)
            for stale in glob.glob(os.path.join(directory, "*.tmp*")):
                os.remove(stale)  # a save cut off by a kill

    def steps(self):
        if not os.path.isdir(self.directory):
            return []
        found = [int(m.group(1)) for m in map(self.PATTERN.search, os.listdir(self.directory)) if m]
        return sorted(found)

    def path(self, step):
        return os.path.join(self.directory, f"ckpt-{step:08d}.npz")

    def newest_readable(self, log=print):
        """The step of the newest checkpoint whose file reads back whole (0: none).

        A checkpoint that does not (a truncated or damaged file: a full disk, a
        copy cut short) is set aside as `ckpt-STEP.npz.unreadable`, kept for a
        look but never resumed from, and the one before it is tried.
        """
        for step in reversed(self.steps()):
            path = self.path(step)
            try:
                with zipfile.ZipFile(path) as archive:
                    damaged = archive.testzip()  # reads every member and checks its CRC
                if damaged is not None:
                    raise zipfile.BadZipFile(f"member {damaged} is damaged")
                return step
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                if self.write:
                    os.replace(path, path + ".unreadable")
                log(f"Checkpoint {path} is unreadable ({e}); set aside as "
                    f"{os.path.basename(path)}.unreadable, trying the one before it.")
        return 0

    def save(self, step, model, optimizer):
        """Writes checkpoint `step`; returns False (writing nothing) if a weight is NaN/inf.

        Every process of a distributed run checks the values (they agree), so
        all stop together; only the writer writes.
        """
        arrays = {}
        for prefix, variables in (("model", model.variables), ("optimizer", optimizer.variables)):
            for i, v in enumerate(variables):
                arrays[f"{prefix}/{i:05d}"] = self.to_numpy(v)
        if not all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == "f"):
            return False
        if not self.write:
            return True
        with atomic_path(self.path(step), ".npz") as tmp:
            np.savez(tmp, **arrays)
        for old in self.steps()[:-self.keep]:
            os.remove(self.path(old))
        return True

    def restore(self, step, model, optimizer):
        with np.load(self.path(step)) as saved:
            for prefix, variables in (("model", model.variables), ("optimizer", optimizer.variables)):
                keys = sorted(k for k in saved.files if k.startswith(prefix + "/"))
                if len(keys) != len(variables):
                    raise ValueError(f"Checkpoint {self.path(step)} does not fit this model/optimizer "
                                     f"({len(keys)} vs {len(variables)} {prefix} variables).")
                for key, variable in zip(keys, variables):
                    variable.assign(saved[key])


class TrainingCallback(keras.callbacks.Callback):
    """Counts global steps; writes metrics.csv rows, checkpoints every interval
    (never after a non-finite loss) and stops at the last step."""

    def __init__(self, manager, metrics_path, start_step, total_steps, checkpoint_every,
                 log_every, grad_accum):
        super().__init__()
        self.manager = manager
        self.metrics_path = metrics_path  # None: another process writes them
        self.step = start_step  # optimizer steps done
        self.micro = start_step * grad_accum
        self.total_steps = total_steps
        self.checkpoint_every = checkpoint_every
        self.log_every = log_every
        self.grad_accum = grad_accum
        self.diverged_at = None
        self.fields = None

    def on_train_begin(self, logs=None):
        names = [m.name for m in self.model.metrics]
        self.fields = ["step", "learning_rate"] + names + [f"val_{n}" for n in names]
        self.last_logs = {}
        if self.metrics_path and os.path.exists(self.metrics_path):
            with open(self.metrics_path, newline="") as f:
                self.fields = next(csv.reader(f), None) or self.fields

    def _write(self, row):
        if self.metrics_path is None:
            return
        exists = os.path.exists(self.metrics_path) and os.path.getsize(self.metrics_path) > 0
        with open(self.metrics_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if not exists:
                writer.writeheader()
            writer.writerow(row)

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        self.micro += 1
        if self.micro % self.grad_accum:
            return
        self.step += 1
        loss = float(logs.get("loss", 0.0))
        self.last_logs = {k: float(v) for k, v in logs.items()}
        if not math.isfinite(loss):
            self.diverged_at = self.step
            self.model.stop_training = True
            return
        if self.step % self.log_every == 0 or self.step == self.total_steps:
            row = {"step": self.step, **self.last_logs}
            row["learning_rate"] = float(self.manager.to_numpy(self.model.optimizer.learning_rate))
            self._write(row)
        if self.step % self.checkpoint_every == 0 or self.step == self.total_steps:
            if not self.manager.save(self.step, self.model, self.model.optimizer):
                self.diverged_at = self.step
                self.model.stop_training = True
                return
        if self.step >= self.total_steps:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        val = {k: float(v) for k, v in (logs or {}).items() if k.startswith("val_")}
        if val and self.diverged_at is None:
            self._write({"step": self.step, **val})


def truncate_metrics(path, step):
    """Drops metrics rows after `step` (they belong to work a resume redoes)."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(float(r[0])) <= step]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(kept)


# ----------------------------------------------------------------- the run
def default_corpus_files(directory):
    """Writes the documentation text every Python carries (`pydoc_data.topics`)
    as a small offline corpus and returns its path."""
    path = os.path.join(directory, "pydoc_topics.txt")
    if not os.path.exists(path):
        os.makedirs(directory, exist_ok=True)
        text = "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))
        atomic_write_text(path, text + "\n")
    return [path]


def load_model_config(options, tokenizer, init_model=None):
    """The run's config (from `init_model`, the `--init-model` loaded, when given), checked
    against the tokenizer and the options."""
    if init_model is not None:
        config = init_model.config
    elif options.preset:
        config = ALGPT2Config.from_preset(options.preset)
    else:
        config = ALGPT2Config.from_json_file(options.config)
    if config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"The model's vocab_size ({config.vocab_size}) is smaller than the "
                         f"tokenizer's ({tokenizer.vocab_size}).")
    if options.seq_len > config.max_positions:
        raise ValueError(f"--seq-len {options.seq_len} exceeds the model's max_positions "
                         f"({config.max_positions}).")
    if options.sop and not config.sop_head:
        raise ValueError("--sop needs a config with sop_head=true.")
    return config


def _check_run_dir(options):
    """Creates DIR or checks that it holds this same run."""
    run_path = os.path.join(options.out, "run.json")
    if os.path.exists(run_path):
        with open(run_path, encoding="utf-8") as f:
            previous = json.load(f)
        mine = json.loads(json.dumps(options.identity()))
        diff = sorted(k for k in set(mine) | set(previous) if mine.get(k) != previous.get(k))
        if diff:
            details = "; ".join(f"{k}: {previous.get(k)!r} there, {mine.get(k)!r} now" for k in diff)
            raise ValueError(f"{options.out} holds a different run ({details}). "
                             "Use another --out, or the same options to resume.")
        return
    if os.path.isdir(options.out) and os.listdir(options.out):
        raise ValueError(f"{options.out} is not empty and holds no algpt2 run (no run.json).")
    os.makedirs(options.out, exist_ok=True)
    atomic_write_json(run_path, options.identity())


class TrainingDiverged(RuntimeError):
    pass


def _quiet(*_):
    """The log of a process that is not the chief (the chief reports for all)."""


def _compiled_model(config, options, init_model, teacher, total_steps):
    """The model to train and its built optimizer (inside the strategy's scope, if any)."""
    from algpt2_tf.causal_lm import ALGPT2LMHeadModel  # deferred: imports TensorFlow, Keras

    model = ALGPT2LMHeadModel(config)
    if init_model is not None:
        model.set_weights(init_model.get_weights())
    if teacher is not None:
        model.set_teacher(teacher, options.distill_weight, options.distill_temperature)
    if model.sop_head is not None and not options.sop:
        model.sop_head.trainable = False  # no SOP labels: nothing to learn there
    optimizer = make_optimizer(options, total_steps)
    model.compile(optimizer=optimizer, jit_compile=options.jit_compile)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def total_steps_of(options, batches_per_epoch):
    """`(optimizer steps, micro-batches)` of a run: `--steps`, or `--epochs` of the data, or
    `DEFAULT_STEPS`; each optimizer step is `grad_accum` micro-batches."""
    if options.steps:
        micro_total = options.steps * options.grad_accum
    elif options.epochs:
        micro_total = max(1, int(round(options.epochs * batches_per_epoch)))
    else:
        micro_total = DEFAULT_STEPS * options.grad_accum
    total_steps = max(1, micro_total // options.grad_accum)
    return total_steps, total_steps * options.grad_accum


def _inputs(options):
    """What a run starts from, read and checked before the run folder is touched:
    `(tokenizer, init_model, config, teacher, data)`."""
    tokenizer = GPT2Tokenizer(options.tokenizer)
    init_model = None
    if options.init_model:
        from algpt2_tf.causal_lm import ALGPT2LMHeadModel  # deferred: imports TensorFlow, Keras

        init_model = load_model(options.init_model, ALGPT2LMHeadModel)
    config = load_model_config(options, tokenizer, init_model)
    teacher = None
    if options.teacher:
        teacher = load_teacher(options.teacher, config.vocab_size, tokenizer,
                               options.teacher_precision)
    data = data_lib.training_data(options, tokenizer, default_files=default_corpus_files(
        os.path.join(cache_root(), "default_corpus")) if not options.train_files else None)
    return tokenizer, init_model, config, teacher, data


def _set_precision(options, log):
    """The run's dtype policy (undone by `train` when it ends), with a warning where bf16
    training would be slow on this CPU."""
    if options.mixed_precision == "bf16" and not keras.distribution.list_devices("gpu"):
        warning = bf16_training_warning()
        if warning:
            log(warning)
    if options.mixed_precision:
        keras.config.set_dtype_policy(
            "mixed_bfloat16" if options.mixed_precision == "bf16" else "mixed_float16")


def _fit(model, options, dist, data, valid_ds, manager, start_step, total_steps, micro_total):
    """Trains `model` from `start_step` to `total_steps` (checkpoints, metrics, TensorBoard);
    returns the `TrainingCallback`. Raises `TrainingDiverged` on a NaN/inf loss or weight."""
    truncate_metrics(os.path.join(options.out, "metrics.csv"), start_step)
    dataset = dist.local_batches(data.train_dataset(
        start_step * options.grad_accum, micro_total - start_step * options.grad_accum),
        options.batch_size)
    micro_per_epoch = options.checkpoint_every * options.grad_accum
    callback = TrainingCallback(
        manager, os.path.join(options.out, "metrics.csv") if dist.is_chief else None,
        start_step, total_steps, options.checkpoint_every, options.log_every,
        options.grad_accum)
    callbacks = [callback]
    if dist.is_chief:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(options.out, "logs"),
                                                     update_freq=options.log_every))
    model.fit(dataset, epochs=math.ceil(micro_total / micro_per_epoch),
              initial_epoch=(start_step * options.grad_accum) // micro_per_epoch,
              steps_per_epoch=micro_per_epoch,
              validation_data=valid_ds,
              callbacks=callbacks, verbose=options.verbose if dist.is_chief else 0,
              shuffle=False)  # batches are already shuffled, as a function of (seed, step)
    if callback.diverged_at is not None:
        good = manager.steps()
        raise TrainingDiverged(
            f"The loss or the weights became NaN/inf at step {callback.diverged_at}; training "
            f"stopped. The last good checkpoint is kept: "
            f"{manager.path(good[-1]) if good else 'none (diverged before the first)'}.")
    return callback


def _write_final(config, weights, final_path, log):
    """The final model: a clean float32 copy (no optimizer state, loads anywhere), written
    atomically."""
    from algpt2_tf.causal_lm import ALGPT2LMHeadModel  # deferred: imports TensorFlow, Keras

    final = ALGPT2LMHeadModel(config)
    final.set_weights(weights)
    with atomic_path(final_path, ".keras") as tmp:
        final.save(tmp)
    log(f"Model written to {final_path}")


def train(options, log=print):
    """Runs (or resumes) a training run; returns a summary dict.

    The steps: start the processes (`distribute.start`), read the inputs (`_inputs`: nothing
    in DIR is touched before they check out), claim DIR and find the step to resume from
    (the chief), build and compile the model (`_compiled_model`) and restore its checkpoint,
    train (`_fit`), write the final model (`_write_final`).

    Raises:
        ValueError: bad options or data (nothing in DIR is damaged).
        TrainingDiverged: the loss became NaN/inf; the last good checkpoint stays.
    """
    options.validate()
    # First: splitting the CPU into replicas must happen before TensorFlow runs anything, and
    # joining other JAX processes before JAX computes anything.
    dist = distribute.start(options.distribute, options.replicas, distribute.Cluster.resolve(
        options.coordinator, options.num_processes, options.process_id, options.connect_timeout),
        batch_size=options.batch_size)
    if not dist.is_chief:
        log = _quiet
    if options.fuse_elementwise:
        enable_elementwise_fusion()
    tokenizer, init_model, config, teacher, data = _inputs(options)
    valid_ds = dist.local_batches(data.valid_dataset(), options.batch_size)
    total_steps, micro_total = total_steps_of(options, data.batches_per_epoch)
    final_path = os.path.join(options.out, "model.keras")
    checkpoints = os.path.join(options.out, "checkpoints")

    def claim_run_dir():  # the chief's part: DIR is checked (and made) once; the step to resume
        _check_run_dir(options)
        if options.tokenizer:
            tokenizer.save(os.path.join(options.out, "tokenizer"))
        return CheckpointManager(checkpoints, options.keep_checkpoints).newest_readable(log)

    start_step = dist.from_chief(claim_run_dir)
    done = {"model": final_path, "steps": total_steps, "resumed_from": start_step}
    if start_step >= total_steps and os.path.exists(final_path):
        log(f"Run already complete ({total_steps} steps): {final_path}")
        dist.finish()
        return done
    manager = CheckpointManager(checkpoints, options.keep_checkpoints, write=dist.is_chief,
                                to_numpy=dist.to_numpy)
    if start_step and not os.path.exists(manager.path(start_step)):
        raise ValueError(f"Process {dist.process_id} cannot read {manager.path(start_step)}, "
                         "which the chief resumes from: every process needs the run directory "
                         "on a shared filesystem.")

    keras.utils.set_random_seed(options.seed)
    _set_precision(options, log)
    try:
        with dist.scope():
            model, optimizer = _compiled_model(config, options, init_model, teacher, total_steps)
            if start_step:
                manager.restore(start_step, model, optimizer)
                log(f"Resuming from step {start_step} ({manager.path(start_step)})")
        log(f"Training {options.preset or options.config or options.init_model} "
            f"({config.num_parameters():,} parameters"
            f"{', distilling ' + options.teacher if teacher is not None else ''}) "
            f"on {data.meta['train_tokens']:,} tokens for {total_steps} steps of "
            f"{options.batch_size * options.grad_accum} x {options.seq_len} tokens -> {options.out}")
        callback = _fit(model, options, dist, data, valid_ds, manager, start_step,
                        total_steps, micro_total)
        weights = [dist.to_numpy(v) for v in model.weights]
    finally:
        keras.config.set_dtype_policy("float32")
        dist.finish()
    if dist.num_processes > 1:  # every process says what it computed (they agree)
        print(f"Process {dist.process_id} of {dist.num_processes}: step {callback.step}, "
              f"{json.dumps(callback.last_logs, sort_keys=True)}", flush=True)
    if not dist.is_chief:
        return done
    _write_final(config, weights, final_path, log)
    return dict(done, metrics=os.path.join(options.out, "metrics.csv"))
