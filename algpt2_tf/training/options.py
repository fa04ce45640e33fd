"""`TrainOptions`: everything a training run depends on, with its defaults and checks.

The one place the defaults live: `algpt2 train`'s flags take theirs from
here. This module imports no TensorFlow, so the command line can read it
before (or without) starting TensorFlow.
"""

import dataclasses
from typing import List, Optional

DEFAULT_STEPS = 600
"""Steps of a run given neither --steps nor --epochs (the README's main job)."""
OPTIMIZERS = ("adamw", "lamb")
SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass
class TrainOptions:
    """Everything a training run depends on (the CLI flags of `algpt2 train`)."""

    out: str
    preset: Optional[str] = "algpt2-tiny"
    config: Optional[str] = None
    train_files: Optional[List[str]] = None
    valid_files: Optional[List[str]] = None
    valid_fraction: float = 0.0
    tokenizer: Optional[str] = None
    cache_dir: Optional[str] = None
    seq_len: int = 128
    batch_size: int = 8
    steps: Optional[int] = None
    epochs: Optional[float] = None
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    optimizer: str = "adamw"
    clip_norm: Optional[float] = 1.0
    grad_accum: int = 1
    mixed_precision: Optional[str] = None
    jit_compile: bool = False
    fuse_elementwise: bool = False
    sop: bool = False
    seed: int = 0
    init_model: Optional[str] = None
    teacher: Optional[str] = None
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    teacher_precision: str = "float32"
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    verbose: int = 1
    distribute: str = "none"
    replicas: Optional[int] = None
    coordinator: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    connect_timeout: Optional[float] = None

    # Options that may change between a run and its resumption.
    RESUMABLE_CHANGES = ("steps", "epochs", "checkpoint_every", "keep_checkpoints", "log_every",
                         "verbose", "cache_dir", "fuse_elementwise", "distribute", "replicas",
                         "coordinator", "num_processes", "process_id", "connect_timeout")

    def validate(self):
        from algpt2_tf.training.distribute import check  # deferred: imports NumPy (--help)

        check(self.distribute, self.replicas)
        positive = ("seq_len", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints",
                    "log_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}.")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("Give --steps or --epochs, not both.")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"--steps must be positive, got {self.steps}.")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"--epochs must be positive, got {self.epochs}.")
        if sum(bool(x) for x in (self.preset, self.config, self.init_model)) > 1:
            raise ValueError("Give one of --preset, --config and --init-model (whose config it is).")
        if not self.preset and not self.config and not self.init_model:
            raise ValueError("Give --preset NAME, --config FILE or --init-model MODEL.")
        if not self.teacher and (self.distill_weight != 1.0 or self.distill_temperature != 1.0
                                 or self.teacher_precision != "float32"):
            raise ValueError("--distill-weight, --distill-temperature and --teacher-precision "
                             "need --teacher.")
        if self.distill_weight < 0 or self.distill_temperature <= 0:
            raise ValueError("--distill-weight must be >= 0 and --distill-temperature > 0.")
        if self.teacher_precision not in ("float32", "bf16"):
            raise ValueError(f"--teacher-precision must be float32 or bf16, "
                             f"got {self.teacher_precision!r}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if self.mixed_precision not in (None, "bf16", "fp16"):
            raise ValueError(f"--mixed-precision must be bf16 or fp16, got {self.mixed_precision!r}.")
        if self.fuse_elementwise and self.jit_compile:
            raise ValueError("--fuse-elementwise and --jit-compile exclude each other "
                             "(--jit-compile already compiles the whole step).")
        if self.learning_rate <= 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("--learning-rate must be > 0, --warmup-steps and --weight-decay >= 0.")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"--clip-norm must be positive, got {self.clip_norm}.")
        if self.valid_files and self.valid_fraction:
            raise ValueError("Give --valid-files or --valid-fraction, not both.")
        if self.sop and self.seq_len % 2:
            raise ValueError(f"--sop needs an even --seq-len, got {self.seq_len}.")

    def identity(self):
        """The options that define the run (everything a resume must keep)."""
        values = dataclasses.asdict(self)
        for name in self.RESUMABLE_CHANGES + ("out",):
            values.pop(name)
        return values


def default_values():
    """`{field: default}` of every option that has one (the command line's defaults)."""
    return {f.name: f.default for f in dataclasses.fields(TrainOptions)
            if f.default is not dataclasses.MISSING}
