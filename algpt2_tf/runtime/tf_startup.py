"""TensorFlow's start-up messages, kept off the command line's screen.

`import tensorflow` prints six lines to stderr on a CPU machine: the oneDNN
notice, the CUDA-stub notice and the CPU-instructions notice, each pair twice,
then the first op prints a `cuInit` error. TF_CPP_MIN_LOG_LEVEL cannot filter
the first six: TensorFlow writes them before it initialises its (absl)
logging, and all log messages before that go to stderr. They come twice
because two of TensorFlow's native extension modules (the main one, then the
profiler's, loaded during `import tensorflow`) each carry a copy of the same
start-up code. The `cuInit` line is logged after that, and level 3 filters it.

So the command line (`algpt2_tf.cli`) imports TensorFlow through
`import_tensorflow_quietly`, unless the user set TF_CPP_MIN_LOG_LEVEL
(their choice is kept, and they see everything it lets through).
"""

import contextlib
import os
import re
import sys
import tempfile

STARTUP_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\)"
    r"|[IWE]\d{4} [\d:. ]+\d+ (port|cudart_stub|cpu_feature_guard|cuda_platform|cuda_executor"
    r"|cuda_dnn|cuda_fft|cuda_blas)\.cc:\d+\]"
    r"|To enable the following instructions:")
"""Lines of TensorFlow's start-up on a CPU machine (see the module docstring)."""

LITERT_NOISE = re.compile(
    r"(INFO|WARNING): \[\w+\.cc:\d+\]"
    r"|└ Could not load shared library "
    r"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.")
"""What LiteRT's native library logs to stderr as it loads a model on a CPU machine (its
accelerator registry, vendor plugins this machine has no hardware for, the XNNPACK
delegate) and as it tears down; it has no switch to turn these off."""


def silence_native_teardown():
    """Sends file descriptor 2 to /dev/null for the rest of the process: LiteRT logs its
    accelerator registry's teardown as the process exits, after the command's last word.
    Call it only when the command has nothing left to say."""
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


@contextlib.contextmanager
def quiet_stderr(noise):
    """Captures what native code writes to file descriptor 2 inside the block and passes
    on the lines that do not match `noise` (a compiled pattern) when it ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
            kept = [line for line in text.splitlines() if line.strip() and not noise.match(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")

def import_tensorflow_quietly():
    """Imports TensorFlow and probes its devices with its start-up lines
    captured; any other line it printed meanwhile is passed on to stderr.

    Does nothing special when TensorFlow is already imported or the user set
    TF_CPP_MIN_LOG_LEVEL. Returns the `tensorflow` module.
    """
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") is not None:
        import tensorflow as tf  # deferred: imports TensorFlow

        return tf
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # after start-up: the cuInit error, oneDNN notes
    with quiet_stderr(STARTUP_NOISE):
        import tensorflow as tf  # deferred: imports TensorFlow

        tf.config.list_physical_devices()
    return tf
