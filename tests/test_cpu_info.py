import json

import pytest

from algpt2_tf.runtime import cpu_info
from algpt2_tf.runtime.cpu_info import bf16_training_warning, cpu_family
from algpt2_tf.runtime.cpu_info import cpu_info as read_cpu_info
from algpt2_tf.runtime.cpu_info import cpu_summary, has_avx512, has_bf16_units

XEON = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8

processor\t: 1
vendor_id\t: SomethingElse
"""


def write_cache(root, index, level, kind, size):
    folder = root / f"index{index}"
    folder.mkdir(parents=True)
    for name, value in (("level", level), ("type", kind), ("size", size)):
        (folder / name).write_text(f"{value}\n")


def test_cpu_info_reads_the_first_processor_and_its_caches(tmp_path):
    (tmp_path / "cpuinfo").write_text(XEON)
    caches = tmp_path / "cache"
    write_cache(caches, 0, 1, "Data", "48K")
    write_cache(caches, 1, 1, "Instruction", "32K")
    write_cache(caches, 2, 2, "Unified", "2048K")
    write_cache(caches, 3, 3, "Unified", "107520K")
    info = read_cpu_info(str(tmp_path / "cpuinfo"), str(caches))
    assert info["vendor"] == "GenuineIntel" and (info["family"], info["model"]) == (6, 143)
    assert info["features"] == ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
                                "amx_tile", "amx_bf16", "amx_int8"]
    assert info["cache_kb"] == {"L1d": 48, "L2": 2048, "L3": 107520}
    assert json.loads(json.dumps(info)) == info
    assert cpu_family(info) == "intel" and has_avx512(info)
    assert cpu_summary(info).startswith("Intel(R) Xeon(R) Platinum 8480+ (GenuineIntel family 6 "
                                        "model 143)")
    assert "L3 107520 KB" in cpu_summary(info)


def test_cpu_info_without_proc_files(tmp_path):
    info = read_cpu_info(str(tmp_path / "missing"), str(tmp_path / "missing-cache"))
    assert info["features"] == [] and info["cache_kb"] == {} and info["family"] is None
    assert cpu_family(info) == "other" and not has_avx512(info)
    assert "unknown CPU" in cpu_summary(info)


ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni clzero
"""

ZEN5 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu sse2 fma avx f16c avx2 avx512f avx512dq avx512_bf16 avx_vnni avx512_vnni avx512_vp2intersect
"""


@pytest.mark.parametrize("text,family,features,bf16", [
    (XEON, "intel", ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile",
                     "amx_bf16", "amx_int8"], True),
    (ZEN3, "amd", ["fma", "avx2"], False),
    (ZEN5, "amd", ["fma", "avx2", "avx512f", "avx512_bf16", "avx_vnni", "avx512_vnni"], True),
])
def test_recorded_cpus_of_three_families(tmp_path, text, family, features, bf16):
    """/proc/cpuinfo as three machines this project ran on wrote it (flags shortened)."""
    (tmp_path / "cpuinfo").write_text(text)
    info = read_cpu_info(str(tmp_path / "cpuinfo"), str(tmp_path / "no-cache"))
    assert cpu_family(info) == family
    assert set(info["features"]) == set(features)
    assert has_bf16_units(info) == bf16 and has_avx512(info) == ("avx512f" in features)


def test_bf16_training_warning_only_on_x86_cpus_without_bf16_units(tmp_path):
    (tmp_path / "xeon").write_text(XEON)
    xeon = read_cpu_info(str(tmp_path / "xeon"), str(tmp_path / "none"))
    zen3 = dict(xeon, vendor="AuthenticAMD", model_name="AMD EPYC", family=25, model=1,
                features=["avx2", "fma"])
    assert has_bf16_units(xeon) and bf16_training_warning(xeon) is None
    assert not has_bf16_units(zen3)
    assert "AMD EPYC" in bf16_training_warning(zen3) and "no bfloat16 units" in \
        bf16_training_warning(zen3)
    unknown = read_cpu_info(str(tmp_path / "missing"), str(tmp_path / "none"))
    assert bf16_training_warning(unknown) is None  # not x86 as far as we know: no claim
