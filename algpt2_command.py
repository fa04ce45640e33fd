"""The `algpt2` console script: runs `algpt2_tf.cli.main`.

Importing `algpt2_tf` imports no TensorFlow, so `algpt2 --help` and `algpt2
info` answer at once; every other command imports TensorFlow itself (quietly,
see `algpt2_tf.runtime.tf_startup`).
"""

import os
import sys


def main():
    """`algpt2 ...`: runs `algpt2_tf.cli.main` and exits with its code."""
    from algpt2_tf.cli import main as cli_main

    try:
        code = cli_main()
        sys.stdout.flush()
        if "ai_edge_litert" in sys.modules:  # the process ends here: LiteRT's exit logs are noise
            from algpt2_tf.runtime.tf_startup import silence_native_teardown

            silence_native_teardown()
    except BrokenPipeError:  # `algpt2 info | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
