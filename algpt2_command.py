"""The `algpt2` console script: the command line without an eager TensorFlow import.

Python runs a package's `__init__.py` before any of its modules, and
`algpt2_tf/__init__.py` imports TensorFlow (to register the model with Keras)
unless ALGPT2_DEFER_TENSORFLOW=1. So the console script starts here, outside
the package: it sets that variable, imports `algpt2_tf.cli`, and removes it
again. `algpt2 --help` and `algpt2 info` then answer at once; every other
command imports TensorFlow itself (quietly, see `algpt2_tf.tf_startup`).
"""

import os
import sys


def main():
    """`algpt2 ...`: runs `algpt2_tf.cli.main` and exits with its code."""
    os.environ["ALGPT2_DEFER_TENSORFLOW"] = "1"
    try:
        from algpt2_tf.cli import main as cli_main
    finally:
        del os.environ["ALGPT2_DEFER_TENSORFLOW"]
    try:
        code = cli_main()
        sys.stdout.flush()
    except BrokenPipeError:  # `algpt2 info | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
