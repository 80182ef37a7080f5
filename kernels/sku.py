"""Which device this is (its SKU), and the tuned kernel table for it.

The SKU id names a tuned table, configs/kernels/<sku>.yaml, so it is stable across runs and filename-safe:
- CPU: ``cpu-<vendor>-<model>-<isa tier>``, e.g. ``cpu-intel-xeon-platinum-8375c-avx512``, from /proc/cpuinfo
  (py-cpuinfo where there is no /proc/cpuinfo). The core count is reported in SkuInfo but kept out of the id,
  so the same CPU model in a VM of another size finds the same table.
- Ascend: ``ascend-<soc>``, e.g. ``ascend-910b1``, from CANN's acl.get_soc_name() or MindSpore. Detection only
  looks for an NPU when there are signs of one (device nodes, CANN environment, an importable pyACL), so on a
  CPU machine it never imports MindSpore and never fails.
``COGVLM2_SKU`` overrides detection (for tests and for forcing a table).

Table lookup falls back from the exact SKU to its family (``cpu-avx512``, ``ascend-910b``) and then to
``default.yaml``; with no file at all, ``load_kernel_table`` returns the built-in defaults. ``COGVLM2_KERNEL_CONFIG``
names a table file to load instead of the lookup. ``load_params`` is the same table as the kernels read it.
This is the only SKU detection and the only table loader of the project.
"""
from __future__ import annotations

import copy
import functools
import glob
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# Kernel backends a KernelSet comes from (kernels.registry): "auto" is, on a CPU, cpu where its library loads, else
# reference; on an Ascend device, per op what the table's `ascend_backends` says (kernels/ascend.py).
BACKENDS = ("auto", "cpu", "reference", "ascend-builtin", "ascend-custom")
# The ops an Ascend table chooses an implementation for, and the choices: MindSpore's built-in kernels or the
# project's Ascend C ops (kernels/ascend/, built by kernels.ascend_build).
ASCEND_CHOICE_OPS = ("rope", "paged_attention")
ASCEND_CHOICES = ("builtin", "custom")

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs" / "kernels"
SKU_ENV = "COGVLM2_SKU"
CONFIGS_ENV = "COGVLM2_KERNEL_CONFIGS"
TABLE_ENV = "COGVLM2_KERNEL_CONFIG"

# expert_linear's "gemm": 0 our GEMM (kernels/cpu/gemm.cc), 1 OpenBLAS's SGEMM (numpy's), 2 oneDNN's (MindSpore's
# libdnnl), 3 MindSpore's MatMul (the composite), 4 our GEMM over weights prepacked at load time (kernels.ops.
# pack_weight): whichever `cogvlm2 tune` measured fastest on this SKU. A library that is missing falls back to our
# GEMM. Prepacking is a load-time layout, one per weight: the model prepacks when either class chose 4, and every
# call on a prepacked weight runs the prepacked GEMM.
GEMM_OWN, GEMM_OPENBLAS, GEMM_ONEDNN, GEMM_MINDSPORE, GEMM_PREPACKED = 0, 1, 2, 3, 4

# Per op and shape class ("decode" or "prefill", by a call's token count: kernels.registry.shape_class), the
# kernel's tuning parameters where no table sets them. kernels/tune.py writes tables of the same shape.
DEFAULT_PARAMS: dict[str, dict[str, dict[str, int]]] = {
    "rope": {"decode": {"threads": 1}, "prefill": {"threads": 2}},
    "rms_norm": {"decode": {"threads": 1}, "prefill": {"threads": 2}},
    "swiglu": {"decode": {"threads": 1}, "prefill": {"threads": 2}},
    "gelu": {"decode": {"threads": 1}, "prefill": {"threads": 2}},
    "paged_attention": {
        "decode": {"threads": 2, "query_tile": 1, "key_tile": 64, "parallel_min_work": 1 << 20, "amx": 1},
        "prefill": {"threads": 2, "query_tile": 16, "key_tile": 128, "parallel_min_work": 1 << 20, "amx": 1},
    },
    "expert_linear": {"decode": {"threads": 2, "gemm": GEMM_PREPACKED, "k_block": 0, "n_block": 0},
                      "prefill": {"threads": 2, "gemm": GEMM_PREPACKED, "k_block": 0, "n_block": 0}},
}

# The projection parameters that decide a call's bits, not only its speed: the GEMM, the k per pass (partial sums
# are added in that order) and whether the dot products take AMX tiles. Each has one value per op for both classes,
# so that a token's result does not depend on how many tokens share its call (batching, chunked prefill).
RESULT_PARAMS = ("gemm", "k_block", "amx")

# Built-in table: what the engine uses when no tuned table exists (a table's entries are merged over it).
DEFAULT_KERNEL_TABLE: dict = {"version": 1, "sku": None, "ops": DEFAULT_PARAMS,
                              "ascend_backends": {op: "builtin" for op in ASCEND_CHOICE_OPS}}

# ISA features worth reporting (the /proc/cpuinfo spelling; ARM's "asimd" is reported as "neon").
KNOWN_FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                  "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "neon", "asimddp", "bf16",
                  "i8mm", "sve", "sve2")

# (feature that must be present, tier name), best first: the tier is the last part of a CPU SKU id.
ISA_TIERS = (("amx_tile", "amx"), ("avx512f", "avx512"), ("avx2", "avx2"), ("avx", "avx"), ("sse4_2", "sse4"),
             ("sve2", "sve2"), ("sve", "sve"), ("neon", "neon"))

X86_VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd", "HygonGenuine": "hygon", "CentaurHauls": "centaur"}
# ARM "CPU implementer" codes, and part numbers of the cores found in servers (Ascend hosts are Kunpeng 920).
ARM_IMPLEMENTERS = {"0x41": "arm", "0x48": "hisilicon", "0xc0": "ampere", "0x61": "apple", "0x51": "qualcomm",
                    "0x46": "fujitsu", "0x4e": "nvidia"}
ARM_PARTS = {("0x41", "0xd0c"): "neoverse-n1", ("0x41", "0xd40"): "neoverse-v1", ("0x41", "0xd49"): "neoverse-n2",
             ("0x41", "0xd4f"): "neoverse-v2", ("0x41", "0xd8e"): "neoverse-n3", ("0x41", "0xd84"): "neoverse-v3",
             ("0x41", "0xd08"): "cortex-a72", ("0x41", "0xd0b"): "cortex-a76", ("0x48", "0xd01"): "kunpeng-920",
             ("0x48", "0xd02"): "kunpeng-930", ("0xc0", "0xac3"): "ampereone", ("0x46", "0x001"): "a64fx"}
# Words that carry no model information in a brand string.
NOISE_WORDS = {"intel", "amd", "hygon", "r", "tm", "c", "cpu", "processor", "apu", "with", "radeon", "graphics",
               "core", "genuine"}


@dataclass(frozen=True)
class SkuInfo:
    backend: str                      # "cpu" or "ascend"
    vendor: str                       # "intel", "amd", "arm", "hisilicon", "huawei", ...
    model: str                        # filename-safe model, e.g. "xeon-platinum-8375c", "910b1"
    features: tuple[str, ...] = ()    # ISA features found (CPU only), in KNOWN_FEATURES order
    cores: int = 0                    # logical CPUs (CPU); 0 when unknown (Ascend)
    soc_name: str = ""                # raw SoC name as the runtime reports it (Ascend only)
    forced_id: str = ""               # set when COGVLM2_SKU overrides detection

    @property
    def isa_tier(self) -> str:
        return next((tier for feature, tier in ISA_TIERS if feature in self.features), "generic")

    @property
    def sku_id(self) -> str:
        if self.forced_id:
            return self.forced_id
        if self.backend == "ascend":
            return slug(f"ascend-{self.model}")
        return slug(f"cpu-{self.vendor}-{self.model}-{self.isa_tier}")

    @property
    def family(self) -> str:
        """The per-family default table's name: CPU by ISA tier, Ascend by SoC family (910b1 -> 910b)."""
        return family_of(self.sku_id)

    @property
    def has_bf16_dot(self) -> bool:
        """bf16 dot products in hardware: AVX512-BF16 or AMX-BF16 (x86), the BF16 extension (Arm)."""
        return any(f in self.features for f in ("avx512_bf16", "amx_bf16", "bf16"))


def slug(text: str) -> str:
    """Lower case, runs of anything but [a-z0-9] collapsed to one '-': safe in a file name on any OS."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


# ---------------------------------------------------------------- CPU

def parse_cpuinfo(text: str, cores: int | None = None) -> SkuInfo:
    """SkuInfo from the text of /proc/cpuinfo (x86 or ARM); `cores` defaults to the processor entries."""
    fields: dict[str, str] = {}
    processors = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "processor":
            processors += 1
        fields.setdefault(key, value)  # the first processor describes the package
    flags = set((fields.get("flags") or fields.get("features") or "").lower().split())
    if "asimd" in flags:
        flags.add("neon")
    features = tuple(f for f in KNOWN_FEATURES if f in flags)
    implementer = fields.get("cpu implementer", "").lower()
    if implementer:  # ARM
        vendor = ARM_IMPLEMENTERS.get(implementer, f"arm-{implementer}")
        part = fields.get("cpu part", "").lower()
        model = ARM_PARTS.get((implementer, part)) or _brand_model(fields.get("model name", "")) or f"part-{part}"
    else:
        vendor = X86_VENDORS.get(fields.get("vendor_id", ""), slug(fields.get("vendor_id", "unknown")))
        model = _brand_model(fields.get("model name", "")) or "unknown"
    return SkuInfo("cpu", slug(vendor), slug(model), features, cores or processors or (os.cpu_count() or 1))


def _brand_model(brand: str) -> str:
    """'Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz' -> 'xeon-platinum-8375c'; 'AMD EPYC 7R13 Processor' ->
    'epyc-7r13'; 'AMD Ryzen 9 5950X 16-Core Processor' -> 'ryzen-9-5950x'."""
    brand = re.sub(r"@.*$", "", brand)                           # clock speed
    brand = re.sub(r"\b\d+-core\b", "", brand, flags=re.I)       # "16-Core"
    words = [w for w in re.split(r"[^A-Za-z0-9]+", brand) if w and w.lower() not in NOISE_WORDS]
    if words and re.fullmatch(r"armv\d.*", words[0].lower()):    # "ARMv8 Processor rev 1 (v8l)": no model
        return ""
    return "-".join(words)


def detect_cpu(cpuinfo_path: str | Path = "/proc/cpuinfo") -> SkuInfo:
    cores = os.cpu_count() or 1
    try:
        return parse_cpuinfo(Path(cpuinfo_path).read_text(encoding="utf-8", errors="replace"), cores)
    except OSError:
        pass
    try:  # macOS, Windows: py-cpuinfo if installed
        import cpuinfo  # type: ignore

        info = cpuinfo.get_cpu_info()
        text = (f"vendor_id : {info.get('vendor_id_raw', '')}\nmodel name : {info.get('brand_raw', '')}\n"
                f"flags : {' '.join(info.get('flags', []))}\n")
        return parse_cpuinfo(text, cores)
    except Exception:  # noqa: BLE001  (any failure of an optional probe means "unknown")
        return SkuInfo("cpu", slug(platform.machine() or "unknown"), slug(platform.processor() or "unknown"),
                       (), cores)


# ---------------------------------------------------------------- Ascend

def ascend_family(model: str) -> str:
    """'910b1' -> '910b', '310p3' -> '310p', '910-9391' -> '910-93', '910b' -> '910b'."""
    model = slug(model)
    match = re.fullmatch(r"(\d+[a-z]+)\d*", model)
    if match:
        return match.group(1)
    match = re.fullmatch(r"(\d+)-(\d\d)\d*", model)  # Ascend910_9391 (A3) -> 910-93
    return f"{match.group(1)}-{match.group(2)}" if match else model


def parse_soc_name(name: str) -> SkuInfo | None:
    """'Ascend910B1' -> SkuInfo(model='910b1'); also MindSpore's short form 'ascend910b'."""
    match = re.fullmatch(r"\s*ascend[\s_-]*(.+?)\s*", name or "", flags=re.I)
    if not match:
        return None
    return SkuInfo("ascend", "huawei", slug(match.group(1)), soc_name=name.strip())


def _npu_hints() -> bool:
    """Signs of an NPU worth probing: device nodes, CANN's environment, or pyACL on the path."""
    if glob.glob("/dev/davinci[0-9]*"):
        return True
    if any(os.environ.get(v) for v in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME", "ASCEND_OPP_PATH")):
        return True
    import importlib.util

    return importlib.util.find_spec("acl") is not None


def soc_name_from_runtime() -> str:
    """The SoC name from CANN or MindSpore, '' when none answers. Every probe is guarded."""
    try:  # pyACL (CANN's Python API): aclrtGetSocName, e.g. "Ascend910B1"
        import acl  # type: ignore

        name = acl.get_soc_name()
        if name:
            return str(name)
    except Exception:  # noqa: BLE001
        pass
    try:  # MindSpore 2.10's context: the SoC family it compiles for, e.g. "ascend910b" ("" on CPU)
        from mindspore._c_expression import MSContext  # type: ignore

        name = MSContext.get_instance().get_ascend_soc_version()
        if name:
            return str(name)
    except Exception:  # noqa: BLE001
        pass
    try:  # MindSpore's hal device name for an initialised Ascend device
        import mindspore  # type: ignore

        if mindspore.get_context("device_target") == "Ascend":
            return str(mindspore.hal.get_device_name(0, "Ascend"))
    except Exception:  # noqa: BLE001
        pass
    return ""


def detect_ascend() -> SkuInfo | None:
    if not _npu_hints():
        return None
    return parse_soc_name(soc_name_from_runtime())


# ---------------------------------------------------------------- detection and tables

@functools.lru_cache(maxsize=1)
def detect_sku_info() -> SkuInfo:
    forced = os.environ.get(SKU_ENV)
    if forced:
        forced = slug(forced)
        return SkuInfo("ascend" if forced.startswith("ascend-") else "cpu", "forced", forced, forced_id=forced)
    return detect_ascend() or detect_cpu()


def detect_sku() -> str:
    """This device's SKU id, e.g. 'cpu-amd-epyc-avx512' or 'ascend-910b1'."""
    return detect_sku_info().sku_id


def family_of(sku: str) -> str:
    """The family default of an SKU id: 'cpu-intel-xeon-gold-6348-avx512' -> 'cpu-avx512',
    'ascend-910b1' -> 'ascend-910b'."""
    sku = slug(sku)
    if sku.startswith("ascend-"):
        return "ascend-" + ascend_family(sku[len("ascend-"):])
    tiers = {tier for _, tier in ISA_TIERS} | {"generic"}
    last = sku.rsplit("-", 1)[-1]
    return f"cpu-{last}" if last in tiers else "cpu-generic"


def default_configs_dir() -> Path:
    """configs/kernels of this checkout, or $COGVLM2_KERNEL_CONFIGS."""
    return Path(os.environ.get(CONFIGS_ENV) or CONFIGS_DIR)


def tuned_table_path(sku: str | None = None, configs_dir: Path | str | None = None) -> Path:
    """Where `cogvlm2 tune` writes the table of `sku` (default: this device): configs/kernels/<sku>.yaml."""
    return Path(configs_dir or default_configs_dir()) / f"{slug(sku or detect_sku())}.yaml"


def kernel_table_candidates(sku: str, configs_dir: Path | str) -> list[Path]:
    """Lookup order: the exact SKU, its family default, then default.yaml."""
    names = [slug(sku), family_of(sku), "default"]
    return [Path(configs_dir) / f"{name}.yaml" for name in dict.fromkeys(names)]


def kernel_table_path(sku: str | None = None, configs_dir: Path | str | None = None) -> Path:
    """The first existing table for `sku` (default: this device) in `configs_dir` (default: configs/kernels),
    else the path of default.yaml (which may not exist: load_kernel_table then returns built-in defaults)."""
    candidates = kernel_table_candidates(sku or detect_sku(), configs_dir or default_configs_dir())
    return next((path for path in candidates if path.is_file()), candidates[-1])


def load_kernel_table(sku: str | None = None, configs_dir: Path | str | None = None,
                      path: Path | str | None = None) -> dict:
    """The table at `path`, else $COGVLM2_KERNEL_CONFIG, else the lookup's table for `sku` (default: this device),
    merged over the built-in defaults; the defaults alone when that file does not exist. The result carries 'sku'
    (the SKU asked for) and 'source' (the file read, or None)."""
    sku = sku or detect_sku()
    path = Path(path or os.environ.get(TABLE_ENV) or kernel_table_path(sku, configs_dir))
    table = copy.deepcopy(DEFAULT_KERNEL_TABLE)
    source = None
    if path.is_file():
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a kernel table must be a mapping, got {type(loaded).__name__}")
        table = _merge(table, loaded)
        source = str(path)
    table["sku"] = sku
    table["source"] = source
    return table


def _merge(base: dict, override: dict) -> dict:
    """`override` over `base`, recursively; a key left empty in the table (None) keeps its default."""
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            continue
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


@dataclass
class KernelParams:
    """The table's ops as the kernels read them: per op and shape class ("decode"/"prefill"), int parameters."""
    sku: str
    source: str  # the yaml file they came from, or "defaults"
    ops: dict[str, dict[str, dict[str, int]]] = field(default_factory=lambda: copy.deepcopy(DEFAULT_PARAMS))
    ascend_backends: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_KERNEL_TABLE["ascend_backends"]))

    def get(self, op: str, cls: str) -> dict[str, int]:
        return self.ops[op][cls]


def check_result_params(params: KernelParams) -> None:
    """ValueError naming the op and parameter where a RESULT_PARAMS entry differs between the two classes."""
    for op, classes in params.ops.items():
        decode, prefill = classes.get("decode", {}), classes.get("prefill", {})
        for name in RESULT_PARAMS:
            if decode.get(name) != prefill.get(name):
                raise ValueError(f"{params.source}: ops.{op}.{name} is {decode.get(name)} for decode but "
                                 f"{prefill.get(name)} for prefill; it sets the op's results, so both classes "
                                 "must share it (re-run `cogvlm2 tune`)")


def check_ascend_backends(choices: dict, source: str) -> dict[str, str]:
    """A table's ascend_backends: a choice in ASCEND_CHOICES for each op of ASCEND_CHOICE_OPS."""
    if not isinstance(choices, dict) or set(choices) - set(ASCEND_CHOICE_OPS):
        raise ValueError(f"{source}: ascend_backends must map ops of {ASCEND_CHOICE_OPS} to one of "
                         f"{ASCEND_CHOICES}, got {choices!r}")
    for op, choice in choices.items():
        if choice not in ASCEND_CHOICES:
            raise ValueError(f"{source}: ascend_backends.{op} must be one of {ASCEND_CHOICES}, got {choice!r}")
    return {op: choices.get(op, "builtin") for op in ASCEND_CHOICE_OPS}


def load_params(sku: str | None = None, path: Path | str | None = None,
                configs_dir: Path | str | None = None) -> KernelParams:
    """load_kernel_table(sku, configs_dir, path) as KernelParams."""
    table = load_kernel_table(sku, configs_dir, path)
    ops = {op: {cls: {name: int(value) for name, value in values.items()} for cls, values in classes.items()}
           for op, classes in table["ops"].items()}
    source = table["source"] or "defaults"
    return KernelParams(table["sku"], source, ops, check_ascend_backends(table["ascend_backends"], source))
