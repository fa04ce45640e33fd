import glob
import os
import re
import subprocess
import sys

import pytest

from algpt2_tf.runtime import xla_flags
from algpt2_tf.runtime.xla_flags import (ELEMENTWISE_FUSION_FLAGS, WIDE_VECTORS_FLAG,
                                         enable_elementwise_fusion, prefer_wide_vectors)


def test_enable_elementwise_fusion_sets_tf_xla_flags(monkeypatch):
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_clustering_debug")
    enable_elementwise_fusion()
    enable_elementwise_fusion()  # idempotent
    assert os.environ["TF_XLA_FLAGS"].split() == ["--tf_xla_clustering_debug",
                                                  *ELEMENTWISE_FUSION_FLAGS]
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_ops_to_cluster=PW")
    with pytest.raises(ValueError, match="PW,PWRED,MISC"):
        enable_elementwise_fusion()


def test_prefer_wide_vectors_sets_xla_flags(monkeypatch):
    monkeypatch.setattr(xla_flags, "has_avx512", lambda: True)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert prefer_wide_vectors() and prefer_wide_vectors()  # idempotent
    assert os.environ["XLA_FLAGS"].split() == ["--xla_cpu_enable_fast_math=false",
                                               WIDE_VECTORS_FLAG]
    # The user's own choice wins.
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_prefer_vector_width=256")
    assert not prefer_wide_vectors()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_prefer_vector_width=256"
    # No AVX-512: nothing to ask for.
    monkeypatch.setattr(xla_flags, "has_avx512", lambda: False)
    monkeypatch.delenv("XLA_FLAGS")
    assert not prefer_wide_vectors() and "XLA_FLAGS" not in os.environ


GENERATE = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from algpt2_tf import ALGPT2LMHeadModel
from algpt2_tf.generation.generator import Generator
from algpt2_tf.runtime.xla_flags import prefer_wide_vectors
prefer_wide_vectors()  # the explicit process setting (the algpt2 command applies it)
Generator(ALGPT2LMHeadModel(tiny_config())).generate([[1, 2, 3]], max_new_tokens=2)
"""


def compiled_vector_widths(tmp_path):
    """The `prefer-vector-width` of the LLVM functions XLA generates for a Generator run
    (no XLA flags of the user's)."""
    dump = tmp_path / "dump"
    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={dump}")
    script = GENERATE.format(tests=os.path.dirname(__file__))
    subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True)
    widths = set()
    for path in glob.glob(str(dump / "*.ll")):
        with open(path) as f:
            widths.update(re.findall(r'"prefer-vector-width"="(\d+)"', f.read()))
    return widths


@pytest.mark.skipif(not xla_flags.has_avx512(), reason="needs a CPU with AVX-512")
def test_generator_compiles_512_bit_vector_code(tmp_path):
    # prefer_wide_vectors before the first compilation gives 512-bit code (that the
    # user's own choice in XLA_FLAGS is left as it is: the test above).
    assert compiled_vector_widths(tmp_path) == {"512"}


def test_a_generator_changes_no_process_setting(monkeypatch):
    from conftest import tiny_config

    from algpt2_tf import ALGPT2LMHeadModel
    from algpt2_tf.generation.generator import Generator

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    before = dict(os.environ)
    Generator(ALGPT2LMHeadModel(tiny_config()))
    assert dict(os.environ) == before
