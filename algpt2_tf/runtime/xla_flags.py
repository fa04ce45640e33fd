"""XLA settings that make this model faster on CPU, set through environment flags.

TF and XLA each read their flag variable (`TF_XLA_FLAGS`, `XLA_FLAGS`) once,
when they first need it, and keep what they read for the life of the process.
So these functions must run before the first model is built (element-wise
fusion) or before the first XLA compilation (wide vectors); a later call
changes nothing. The callers in this package (`algpt2 train
--fuse-elementwise`, `Generator`) call them early enough.
"""
import os

from algpt2_tf.runtime.cpu_info import has_avx512

ELEMENTWISE_FUSION_FLAGS = ("--tf_xla_auto_jit=2", "--tf_xla_cpu_global_jit",
                            "--tf_xla_ops_to_cluster=PW,PWRED,MISC")
"""TF_XLA_FLAGS of `enable_elementwise_fusion`: CPU auto-clustering of XLA's point-wise ops
(PW), softmax-like ops (PWRED) and reshapes/transposes (MISC)."""

WIDE_VECTORS_FLAG = "--xla_cpu_prefer_vector_width=512"
"""XLA_FLAGS entry of `prefer_wide_vectors`."""


def _add_flags(variable, wanted, option):
    """Appends `wanted` flags to the environment variable `variable`.

    Returns False, changing nothing, when the variable already sets `option`
    (a flag name ending in `=`) to a value other than the wanted one.
    """
    flags = os.environ.get(variable, "").split()
    if any(f.startswith(option) and f not in wanted for f in flags):
        return False
    os.environ[variable] = " ".join(flags + [f for f in wanted if f not in flags])
    return True


def enable_elementwise_fusion():
    """Lets XLA fuse the element-wise work of every TF graph, leaving matmuls to oneDNN.

    With `mixed_bfloat16` on CPU, oneDNN's bf16 matmuls are about twice as fast
    as float32, but XLA (`jit_compile=True`) computes bf16 dots in float32, so
    bf16 training runs without XLA, and its LayerNorms, GELUs, casts and
    softmaxes then run as one TF kernel per op. This turns on TF's
    auto-clustering for XLA's point-wise, softmax and reshape ops only: they are
    compiled and fused, while `MatMul`/`BatchMatMul` stay oneDNN kernels and
    reductions (`Sum`, `Mean`: the bias and LayerNorm gradients) stay TF
    kernels, because XLA:CPU reduces bf16 tensors about 8x slower (measured:
    the 12 `[4, 256, 3072]` bias-gradient sums of one step take 46 ms in XLA,
    5.8 ms in TF). Measured gain: see `benchmarks/results/train.md` (no XLA vs
    fused rows). Nothing to gain with `jit_compile=True`, which already
    compiles the whole step.

    Call it before the first model is built (the `algpt2 train
    --fuse-elementwise` flag does).

    Raises:
        ValueError: `TF_XLA_FLAGS` already sets `--tf_xla_ops_to_cluster` to
            something else.
    """
    if not _add_flags("TF_XLA_FLAGS", ELEMENTWISE_FUSION_FLAGS, "--tf_xla_ops_to_cluster="):
        raise ValueError(f"TF_XLA_FLAGS already sets --tf_xla_ops_to_cluster; element-wise "
                         f"fusion needs {ELEMENTWISE_FUSION_FLAGS[-1]}.")


def prefer_wide_vectors():
    """Makes XLA:CPU generate 512-bit vector code on CPUs with AVX-512.

    XLA's CPU compiler prefers 256-bit vectors by default, also where the CPU
    has 512-bit ones. Batch-1 decoding is a chain of matrix-vector products
    that XLA generates itself, and these run faster with the wide vectors:
    `algpt2` greedy decoding, batch 1, on a 2-core AMD EPYC (AVX-512): 184 ->
    204 tokens/s. keras-hub's GPT-2 124M, whose decoding waits on memory,
    gains nothing (48.1 -> 48.8).

    Does nothing on CPUs without AVX-512, or when `XLA_FLAGS` already chooses
    a vector width. Call it before the first XLA compilation (`Generator`
    does).

    Returns:
        Whether `XLA_FLAGS` asks for 512-bit vectors now.
    """
    if not has_avx512():
        return False
    return _add_flags("XLA_FLAGS", (WIDE_VECTORS_FLAG,), "--xla_cpu_prefer_vector_width=")
