"""What CPU this is: the facts that decide which speed tricks pay off on it.

Benchmarks record `cpu_info()` in every results file (and name per-CPU
results after `cpu_family`); `xla_flags.prefer_wide_vectors` asks it for
AVX-512. The decode tricks' defaults measured the same on the CPU families
tried so far (`decode_tricks.DecodeTricks.for_cpu`).
Linux only (`/proc/cpuinfo` and `/sys`); elsewhere the fields are empty.

Example:
>>> info = cpu_info()
>>> sorted(info)[:3]
['cache_kb', 'family', 'features']
>>> cpu_summary({"vendor": "GenuineIntel", "model_name": "Intel(R) Xeon(R)", "family": 6,
...              "model": 143, "features": ["avx512f", "amx_bf16"], "cache_kb": {"L2": 2048},
...              "logical_cpus": 2})
'Intel(R) Xeon(R) (GenuineIntel family 6 model 143), 2 CPUs; avx512f amx_bf16; L2 2048 KB'
"""

import glob
import os

FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
            "amx_tile", "amx_bf16", "amx_int8")
"""The CPU flags that matter to this package's speed: AVX-512, VNNI (int8
dot products), BF16 and FP16 arithmetic, and AMX (tile matrix units)."""


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _cache_kb(cache_dir):
    """`{"L1d": kb, "L2": kb, "L3": kb}` of CPU 0, as the kernel reports it."""
    sizes = {}
    for index in sorted(glob.glob(os.path.join(cache_dir, "index*"))):
        level = _read(os.path.join(index, "level")).strip()
        kind = _read(os.path.join(index, "type")).strip()
        size = _read(os.path.join(index, "size")).strip().upper()
        if not level or kind == "Instruction" or not size.endswith("K"):
            continue
        name = f"L{level}" + ("d" if kind == "Data" else "")
        sizes[name] = int(size[:-1])
    return sizes


def cpu_info(cpuinfo="/proc/cpuinfo", cache_dir="/sys/devices/system/cpu/cpu0/cache"):
    """The CPU's vendor, model, the flags in `FEATURES` it has, and its cache sizes.

    Returns:
        A JSON-ready dict: `vendor`, `model_name`, `family`, `model` (ints, or
        None), `features` (the `FEATURES` present, in that order), `cache_kb`
        and `logical_cpus`.
    """
    fields = {}
    for line in _read(cpuinfo).splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())

    def number(key):
        value = fields.get(key, "")
        return int(value) if value.isdigit() else None

    return {"vendor": fields.get("vendor_id", ""), "model_name": fields.get("model name", ""),
            "family": number("cpu family"), "model": number("model"),
            "features": [f for f in FEATURES if f in flags], "cache_kb": _cache_kb(cache_dir),
            "logical_cpus": os.cpu_count()}


def cpu_summary(info):
    """One line for a results table's header."""
    caches = ", ".join(f"{name} {kb} KB" for name, kb in info.get("cache_kb", {}).items())
    text = (f"{info.get('model_name') or 'unknown CPU'} ({info.get('vendor', '')} family "
            f"{info.get('family')} model {info.get('model')}), {info.get('logical_cpus')} CPUs; "
            f"{' '.join(info.get('features', [])) or 'no AVX-512/AMX'}")
    return text + (f"; {caches}" if caches else "")


def cpu_family(info):
    """`"intel"`, `"amd"` or `"other"`: the key of per-CPU results files and README rows."""
    vendor = info.get("vendor", "")
    return {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(vendor, "other")


def has_avx512(info=None):
    """Whether the CPU has AVX-512 (the `avx512f` flag)."""
    return "avx512f" in (info or cpu_info())["features"]


def has_bf16_units(info=None):
    """Whether the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX-BF16)."""
    return bool({"avx512_bf16", "amx_bf16"} & set((info or cpu_info())["features"]))


def bf16_training_warning(info=None):
    """A warning for bfloat16 mixed precision on an x86 CPU without bfloat16
    units (None otherwise): there it converts every product and runs slower
    than float32 (`algpt2` trained at 0.66x its float32 tokens/s on AMD Zen 3,
    benchmarks/results/train_amd_zen3.json)."""
    info = info or cpu_info()
    if cpu_family(info) == "other" or has_bf16_units(info):
        return None
    return (f"Warning: this CPU ({cpu_summary(info)}) has no bfloat16 units (AVX512-BF16 or "
            "AMX): --mixed-precision bf16 trains slower than float32 on it (0.66x on AMD Zen 3). "
            "Leave it out here.")
