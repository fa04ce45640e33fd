#!/usr/bin/env python3
"""Export a trained ALGPT2 model: the same as `algpt2 export ...`.

    python tools/export.py --model runs/demo --format savedmodel --out saved_models/algpt2
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from algpt2_tf.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["export"] + sys.argv[1:]))
