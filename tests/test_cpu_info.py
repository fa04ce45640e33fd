import json

from algpt2_tf import cpu_info
from algpt2_tf.cpu_info import (bf16_training_warning, cpu_family, cpu_info as read_cpu_info,
                                cpu_summary, has_avx512, has_bf16_units)

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


def test_this_machine_is_described():
    info = read_cpu_info()
    assert set(info) == {"vendor", "model_name", "family", "model", "features", "cache_kb",
                         "logical_cpus"}
    assert set(info["features"]) <= set(cpu_info.FEATURES)


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
