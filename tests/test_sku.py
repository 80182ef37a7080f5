"""SKU detection and kernel-table lookup (kernels/sku.py)."""
from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kernels import sku

SAFE_ID = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
REPO = Path(__file__).resolve().parents[1]

INTEL_ICELAKE = """\
processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 106
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 avx512f \
avx512dq avx512cd avx512bw avx512vl avx512vbmi avx512_vnni avx512_bitalg avx512_vpopcntdq

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu avx2 avx512f
"""

INTEL_SAPPHIRE_RAPIDS = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 \
amx_tile amx_int8
"""

AMD_ZEN2 = """\
processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model name\t: AMD EPYC 7R32
flags\t\t: fpu sse4_2 avx f16c fma avx2 sha_ni
processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7R32
flags\t\t: fpu sse4_2 avx f16c fma avx2 sha_ni
"""

AMD_RYZEN = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD Ryzen 9 5950X 16-Core Processor
flags\t\t: sse4_2 avx avx2 fma
"""

ARM_NEOVERSE_V1 = """\
processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc \
dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm \
bf16 dgh rng
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd40
CPU revision\t: 1

processor\t: 1
Features\t: fp asimd sve
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""

KUNPENG_920 = """\
processor\t: 0
model name\t: HiSilicon Kunpeng-920
BogoMIPS\t: 200.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma dcpop \
asimddp asimdfhm
CPU implementer\t: 0x48
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd01
CPU revision\t: 0
"""


@pytest.fixture(autouse=True)
def fresh_detection(monkeypatch):
    monkeypatch.delenv(sku.SKU_ENV, raising=False)
    monkeypatch.delenv(sku.CONFIGS_ENV, raising=False)
    monkeypatch.delenv(sku.TABLE_ENV, raising=False)
    sku.detect_sku_info.cache_clear()
    yield
    sku.detect_sku_info.cache_clear()


# ---------------------------------------------------------------- this machine

def test_detection_here_is_stable_and_filename_safe():
    first = sku.detect_sku()
    sku.detect_sku_info.cache_clear()
    assert sku.detect_sku() == first
    assert SAFE_ID.match(first), first
    info = sku.detect_sku_info()
    assert info.backend == "cpu" and first.startswith("cpu-") and info.cores >= 1
    assert first.endswith("-" + info.isa_tier) and info.family == f"cpu-{info.isa_tier}"


def test_detection_on_cpu_never_imports_mindspore():
    code = ("import sys; from kernels import sku; print(sku.detect_sku()); "
            "print('mindspore' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    sku_id, imported = result.stdout.split()
    assert SAFE_ID.match(sku_id) and imported == "False"


def test_py_cpuinfo_fallback_without_proc_cpuinfo(tmp_path):
    info = sku.detect_cpu(tmp_path / "no-cpuinfo")
    assert info.backend == "cpu" and SAFE_ID.match(info.sku_id)


def test_env_override(monkeypatch):
    monkeypatch.setenv(sku.SKU_ENV, "Ascend-910B1")
    assert sku.detect_sku() == "ascend-910b1"
    assert sku.detect_sku_info().family == "ascend-910b"


# ---------------------------------------------------------------- /proc/cpuinfo samples

@pytest.mark.parametrize("text,expected_id,expected_features", [
    (INTEL_ICELAKE, "cpu-intel-xeon-platinum-8375c-avx512", {"avx2", "avx512f", "avx512_vnni"}),
    (INTEL_SAPPHIRE_RAPIDS, "cpu-intel-xeon-platinum-8488c-amx", {"avx512_bf16", "amx_tile", "amx_bf16"}),
    (AMD_ZEN2, "cpu-amd-epyc-7r32-avx2", {"avx2", "fma"}),
    (AMD_RYZEN, "cpu-amd-ryzen-9-5950x-avx2", {"avx2"}),
    (ARM_NEOVERSE_V1, "cpu-arm-neoverse-v1-sve", {"neon", "sve", "bf16", "i8mm"}),
    (KUNPENG_920, "cpu-hisilicon-kunpeng-920-neon", {"neon", "asimddp"}),
])
def test_parse_cpuinfo_samples(text, expected_id, expected_features):
    info = sku.parse_cpuinfo(text)
    assert info.sku_id == expected_id
    assert expected_features <= set(info.features)
    assert SAFE_ID.match(info.sku_id)


def test_parse_cpuinfo_details():
    intel = sku.parse_cpuinfo(INTEL_ICELAKE)
    assert (intel.vendor, intel.model, intel.cores) == ("intel", "xeon-platinum-8375c", 2)
    assert "amx_tile" not in intel.features and "sve" not in intel.features
    assert sku.parse_cpuinfo(AMD_ZEN2, cores=96).cores == 96
    assert "avx512f" not in sku.parse_cpuinfo(AMD_ZEN2).features
    arm = sku.parse_cpuinfo(ARM_NEOVERSE_V1)
    assert (arm.vendor, arm.model, arm.isa_tier) == ("arm", "neoverse-v1", "sve")
    assert sku.parse_cpuinfo("").sku_id == "cpu-unknown-unknown-generic"
    # an unknown ARM part still gives a usable id
    odd = sku.parse_cpuinfo("processor : 0\nFeatures : fp asimd\nCPU implementer : 0x41\nCPU part : 0xfff\n")
    assert odd.sku_id == "cpu-arm-part-0xfff-neon"


# ---------------------------------------------------------------- Ascend

@pytest.mark.parametrize("name,expected_id,family", [
    ("Ascend910B1", "ascend-910b1", "ascend-910b"),
    ("Ascend910B3", "ascend-910b3", "ascend-910b"),
    ("Ascend310P3", "ascend-310p3", "ascend-310p"),
    ("ascend910b", "ascend-910b", "ascend-910b"),           # MindSpore's get_ascend_soc_version() form
    ("Ascend910_9391", "ascend-910-9391", "ascend-910-93"),  # Atlas A3
])
def test_parse_soc_name(name, expected_id, family):
    info = sku.parse_soc_name(name)
    assert info.sku_id == expected_id and info.family == family and info.soc_name == name


def test_parse_soc_name_rejects_other_names():
    assert sku.parse_soc_name("") is None and sku.parse_soc_name("CPU") is None


def test_ascend_detection_when_an_npu_answers(monkeypatch):
    monkeypatch.setattr(sku, "_npu_hints", lambda: True)
    monkeypatch.setattr(sku, "soc_name_from_runtime", lambda: "Ascend910B2")
    assert sku.detect_sku() == "ascend-910b2"


def test_falls_back_to_cpu_when_no_npu_answers(monkeypatch):
    monkeypatch.setattr(sku, "_npu_hints", lambda: True)
    monkeypatch.setattr(sku, "soc_name_from_runtime", lambda: "")
    assert sku.detect_sku().startswith("cpu-")


def test_runtime_probe_is_harmless_on_cpu():
    assert sku.soc_name_from_runtime() == ""   # MindSpore here reports no Ascend SoC; nothing raises


# ---------------------------------------------------------------- table lookup

def write_table(directory: Path, name: str, ops: dict) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"ops": ops}))
    return path


def test_family_of():
    assert sku.family_of("cpu-intel-xeon-platinum-8375c-avx512") == "cpu-avx512"
    assert sku.family_of("cpu-arm-neoverse-v1-sve") == "cpu-sve"
    assert sku.family_of("cpu-something-odd") == "cpu-generic"
    assert sku.family_of("ascend-910b4") == "ascend-910b"
    assert sku.family_of("ascend-310p3") == "ascend-310p"


def test_table_lookup_order(tmp_path):
    target = "cpu-intel-xeon-platinum-8375c-avx512"
    default = tmp_path / "default.yaml"
    assert sku.kernel_table_path(target, tmp_path) == default          # nothing exists: default's path
    write_table(tmp_path, "default", {"rope": {"threads": 1}})
    assert sku.kernel_table_path(target, tmp_path) == default
    family = write_table(tmp_path, "cpu-avx512", {"rope": {"threads": 2}})
    assert sku.kernel_table_path(target, tmp_path) == family
    exact = write_table(tmp_path, target, {"rope": {"threads": 3}})
    assert sku.kernel_table_path(target, tmp_path) == exact
    write_table(tmp_path, "cpu-avx2", {"rope": {"threads": 4}})     # another family is never used
    assert sku.kernel_table_path("cpu-amd-epyc-7r32-avx2", tmp_path).name == "cpu-avx2.yaml"
    assert sku.kernel_table_path("ascend-910b1", tmp_path) == default
    assert [p.name for p in sku.kernel_table_candidates("ascend-910b1", tmp_path)] == \
        ["ascend-910b1.yaml", "ascend-910b.yaml", "default.yaml"]


def test_default_params_cover_every_op_and_class():
    assert set(sku.DEFAULT_PARAMS) == {"rope", "rms_norm", "swiglu", "gelu", "paged_attention", "expert_linear"}
    assert all(set(classes) == {"decode", "prefill"} for classes in sku.DEFAULT_PARAMS.values())
    assert sku.DEFAULT_KERNEL_TABLE == {"version": 1, "sku": None, "ops": sku.DEFAULT_PARAMS,
                                        "ascend_backends": {"rope": "builtin", "paged_attention": "builtin"}}


def test_load_kernel_table_defaults_and_merge(tmp_path):
    defaults = copy.deepcopy(sku.DEFAULT_KERNEL_TABLE)
    table = sku.load_kernel_table("cpu-amd-epyc-avx512", tmp_path)
    assert table == {"version": 1, "sku": "cpu-amd-epyc-avx512", "ops": sku.DEFAULT_PARAMS, "source": None,
                     "ascend_backends": sku.DEFAULT_KERNEL_TABLE["ascend_backends"]}
    write_table(tmp_path, "cpu-avx512", {"paged_attention": {"decode": {"key_tile": 32}, "prefill": None},
                                         "rope": None, "new_op": {"decode": {"threads": 1}}})
    table = sku.load_kernel_table("cpu-amd-epyc-avx512", tmp_path)
    expected = copy.deepcopy(sku.DEFAULT_PARAMS)
    expected["paged_attention"]["decode"]["key_tile"] = 32  # the rest, and entries left empty, keep their defaults
    expected["new_op"] = {"decode": {"threads": 1}}
    assert table["ops"] == expected
    assert table["source"] == str(tmp_path / "cpu-avx512.yaml") and table["version"] == 1
    # the defaults are never mutated by a load
    assert sku.DEFAULT_KERNEL_TABLE == defaults


def test_load_kernel_table_uses_this_device_and_env_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(sku.CONFIGS_ENV, str(tmp_path))
    write_table(tmp_path, sku.detect_sku(), {"rope": {"decode": {"threads": 2}}})
    table = sku.load_kernel_table()
    assert table["sku"] == sku.detect_sku()
    assert table["ops"]["rope"] == {"decode": {"threads": 2}, "prefill": sku.DEFAULT_PARAMS["rope"]["prefill"]}


def test_table_file_from_the_argument_or_the_environment(tmp_path, monkeypatch):
    write_table(tmp_path, "default", {"rope": {"decode": {"threads": 4}}})
    forced = write_table(tmp_path, "forced", {"rope": {"decode": {"threads": "3"}}})
    monkeypatch.setenv(sku.TABLE_ENV, str(forced))
    params = sku.load_params("cpu-x-avx2", configs_dir=tmp_path)
    assert params.source == str(forced) and params.get("rope", "decode") == {"threads": 3}  # read as ints
    other = write_table(tmp_path, "other", {})
    assert sku.load_kernel_table("cpu-x-avx2", tmp_path, path=other)["source"] == str(other)  # the argument wins
    monkeypatch.delenv(sku.TABLE_ENV)
    params = sku.load_params("cpu-x-avx2", configs_dir=tmp_path)
    assert params.source == str(tmp_path / "default.yaml") and params.get("rope", "decode") == {"threads": 4}
    missing = sku.load_params("cpu-x-avx2", path=tmp_path / "missing.yaml")
    assert missing.source == "defaults" and missing.ops == sku.DEFAULT_PARAMS and missing.sku == "cpu-x-avx2"


def test_bad_table_is_an_error(tmp_path):
    (tmp_path / "default.yaml").write_text("- not\n- a mapping\n")
    with pytest.raises(ValueError, match="mapping"):
        sku.load_kernel_table("cpu-x-avx2", tmp_path)


def test_tuned_table_path_is_the_exact_sku(tmp_path, monkeypatch):
    assert sku.tuned_table_path("Cpu-Intel-X-AVX2", tmp_path) == tmp_path / "cpu-intel-x-avx2.yaml"
    monkeypatch.setenv(sku.CONFIGS_ENV, str(tmp_path))
    assert sku.tuned_table_path() == tmp_path / f"{sku.detect_sku()}.yaml"
